"""``ssl-xcit pretrain``: the typed config from recipes and overrides, then the run."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ssl_xcit.options import Parsed, parse_options
from ssl_xcit.pretrain.config import PretrainConfig

PROG = "ssl-xcit pretrain"
DESCRIPTION = "DINO pretraining of an XCiT: --config configs/X.yaml [--section.key value ...]."


def parse_pretrain_args(argv: Sequence[str]) -> Parsed[PretrainConfig]:
    """argv → (config, namespace, parser). ``--resume`` is short for ``--run.resume true``."""
    argv = [token for a in argv for token in (("--run.resume", "true") if a == "--resume" else (a,))]
    return parse_options(PretrainConfig, argv, PROG, DESCRIPTION)


def run_dir(parsed: Parsed[PretrainConfig]) -> Path:
    """``run.dir``, or ``runs/<name of the last --config file>``."""
    return Path(parsed.options.run.dir or Path("runs") / parsed.config_name())


def pretrain_command(argv: Sequence[str]) -> int:
    from pytorch_lightning.utilities import rank_zero_info

    from ssl_xcit.pretrain.run import run_pretraining

    parsed = parse_pretrain_args(argv)
    folder = run_dir(parsed)
    last = run_pretraining(parsed.options, folder, parsed.dump())
    rank_zero_info(f"run folder: {folder}\nlast checkpoint: {last}")
    return 0
