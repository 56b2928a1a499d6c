"""The ``ssl-xcit`` command: one subcommand per job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from ssl_xcit.errors import UserError

USAGE = """usage: ssl-xcit COMMAND [options]

commands:
  pretrain   DINO pretraining of an XCiT (--config configs/X.yaml [--section.key value ...])
  export     frozen features of a backbone over a labelled dataset
  export-backbone  the backbone as safetensors for timm.create_model
  knn        weighted k-NN classification on feature stores
  linear     linear probe on feature stores
  submit     pretraining on a SLURM cluster through submitit

`ssl-xcit COMMAND --help` shows each command's options."""


def pretrain_command(argv: Sequence[str]) -> int:
    from pytorch_lightning.utilities import rank_zero_info

    from ssl_xcit.options import config_name, dump_config, parse_pretrain_args
    from ssl_xcit.pretrain.run import run_pretraining

    cfg, namespace, parser = parse_pretrain_args(argv)
    resolved = dump_config(parser, namespace)
    if namespace.print_config:
        print(resolved, end="")
        return 0
    run_dir = Path(cfg.run.dir or Path("runs") / config_name(namespace))
    last = run_pretraining(cfg, run_dir, resolved)
    rank_zero_info(f"run folder: {run_dir}\nlast checkpoint: {last}")
    return 0


def commands() -> dict[str, Callable[[Sequence[str]], int]]:
    from ssl_xcit.eval import commands as eval_cli
    from ssl_xcit.launch import submit as submit_cli

    return {
        "pretrain": pretrain_command,
        "export": eval_cli.export_command,
        "export-backbone": eval_cli.export_backbone_command,
        "knn": eval_cli.knn_command,
        "linear": eval_cli.linear_command,
        "submit": submit_cli.submit_command,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in table:
        print(f"ssl-xcit: unknown command '{name}'\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return table[name](rest)
    except UserError as err:
        print(f"ssl-xcit {name}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"ssl-xcit {name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
