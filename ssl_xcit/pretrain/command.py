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
    """Train; on SIGTERM or SIGUSR2, save ``last.ckpt`` at the next decision point (at most a
    logging interval away) and exit with 128 + the signal's number (running the same command
    again continues)."""
    import signal

    from pytorch_lightning.utilities import rank_zero_info

    from ssl_xcit.pretrain.preemption import PreemptionFlag
    from ssl_xcit.pretrain.run import run_pretraining
    from ssl_xcit.pretrain.stop import StopController

    parsed = parse_pretrain_args(argv)
    folder = run_dir(parsed)
    stop = StopController(PreemptionFlag())
    with stop.flag.installed():
        last = run_pretraining(parsed.options, folder, parsed.dump(), stop=stop)
    if stop.stopped_by_signal:
        assert stop.decision is not None
        rank_zero_info(f"{stop.decision.message} at step {stop.decision.step}: {last} holds it; "
                       "run the same command again to continue")
        return 128 + (stop.flag.received or [signal.SIGTERM])[0]
    rank_zero_info(f"run folder: {folder}\nlast checkpoint: {last}")
    return 0
