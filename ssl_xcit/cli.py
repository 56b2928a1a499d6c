"""The ``ssl-xcit`` command: maps each subcommand's name to the function that runs it."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Sequence

from ssl_xcit.errors import RunStopped, UserError

# name -> (module, function, one-line summary); modules are imported only when their command runs
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("ssl_xcit.pretrain.command", "pretrain_command",
                 "DINO pretraining of an XCiT (--config configs/X.yaml [--section.key value ...])"),
    "export": ("ssl_xcit.eval.commands", "export_command", "frozen features of a backbone over a labelled dataset"),
    "export-backbone": ("ssl_xcit.eval.commands", "export_backbone_command",
                        "the backbone as safetensors for timm.create_model"),
    "knn": ("ssl_xcit.eval.commands", "knn_command", "weighted k-NN classification (DINO protocol) on frozen features"),
    "linear": ("ssl_xcit.eval.commands", "linear_command", "linear probe on frozen features"),
    "submit": ("ssl_xcit.launch.submit", "submit_command", "pretraining on a SLURM cluster through submitit"),
    "attention": ("ssl_xcit.eval.visualise", "attention_command",
                  "class-attention maps (and --pca patch-feature colours) of images as PNG"),
    "report": ("ssl_xcit.pretrain.report", "report_command", "a run's training curves as a PNG or HTML page"),
    "check-data": ("ssl_xcit.check_data", "check_data_command",
                   "find the images of a dataset that cannot be decoded (PATH [--split S] [--workers N])"),
    "dense-export": ("ssl_xcit.eval.dense_export", "dense_export_command",
                     "per-patch features of a frozen backbone over a folder of images, at any size"),
    "segment": ("ssl_xcit.eval.segment_command", "segment_command",
                "linear segmentation probe on frozen patch features: mIoU, per-class IoU, pixel accuracy"),
    "foreground": ("ssl_xcit.eval.foreground", "foreground_command",
                   "foreground discovery from class attention: IoU against binary masks"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return ("usage: ssl-xcit COMMAND [--config FILE] [--key value ...]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`ssl-xcit COMMAND --help` explains each command's options.")


def command(name: str) -> Callable[[Sequence[str]], int]:
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"ssl-xcit: unknown command '{name}'\n{usage()}", file=sys.stderr)
        return 2
    from ssl_xcit.devices import bind_local_gpu  # here, not at the top: `ssl-xcit --help` needs no torch

    try:
        bind_local_gpu()
        return command(name)(rest)
    except SystemExit as done:  # --help and --print-config print, then exit through argparse
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    except UserError as err:
        print(f"ssl-xcit {name}: error: {err}", file=sys.stderr)
        return 2
    except (RunStopped, FloatingPointError) as err:
        print(f"ssl-xcit {name}: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
