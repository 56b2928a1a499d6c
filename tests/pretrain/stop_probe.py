"""Run by test_stop_ddp.py as a script: CPU pretraining (2 processes with ``--trainer.devices 2``,
gloo) with a NaN loss injected on one rank at one step, or a signal to every rank at one step;
each rank writes what it saw and how the run ended to ``OUT/rank<r>.pt``. Lightning relaunches
this file per rank.

    python stop_probe.py OUT [--nan RANK:STEP] [--signal-at STEP] [--count-syncs] -- PRETRAIN ARGS
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: tests.helpers
import ssl_xcit.pretrain.loss as loss_module  # noqa: E402
from ssl_xcit.pretrain.command import parse_pretrain_args  # noqa: E402
from ssl_xcit.pretrain.module import logs_this_step  # noqa: E402
from ssl_xcit.pretrain.preemption import PreemptionFlag  # noqa: E402
from ssl_xcit.pretrain.run import run_pretraining  # noqa: E402
from ssl_xcit.pretrain.stop import StopController  # noqa: E402

POISON = {"now": False}


def poisoned_cross_entropy(real):
    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        return value * float("nan") if POISON["now"] else value
    return loss


class Observe(pl.Callback):
    """Per step: whether it was skipped (read in the test, after the step), the lr, a checksum of
    every sample's first crop (which images the step trained on), the center's finiteness."""

    def __init__(self, nan_at: tuple[int, int] | None, signal_at: int | None) -> None:
        self.nan_at, self.signal_at = nan_at, signal_at
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        POISON["now"] = self.nan_at == (trainer.global_rank, trainer.global_step)
        if self.signal_at == trainer.global_step:
            os.kill(os.getpid(), signal.SIGUSR2)
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]
        self._samples = [float(crop.double().sum()) for crop in batch["crops"][0]]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # tensors kept: no read in the step
        self.steps.append({"step": trainer.global_step - 1, "skipped": module._skip.clone(), "lr": self._lr,
                           "samples": self._samples, "center_finite": module.loss_fn.center.isfinite().all()})

    def plain(self) -> list[dict]:
        return [{**s, "skipped": bool(s["skipped"]), "center_finite": bool(s["center_finite"])} for s in self.steps]


class CountSyncs(pl.Callback):
    """Counts, per step, host reads of tensors (item, tolist, bool, float, int, numpy) and calls
    of torch.distributed collectives, from this callback's batch start to the end of the last
    callback's batch end (the progress bar's)."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
    COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
                   "barrier", "reduce", "gather", "scatter", "reduce_scatter", "all_to_all")

    def __init__(self) -> None:
        self.active, self.current, self.per_step = False, [], {}
        for name in self.READS:
            self._wrap(torch.Tensor, name, "read")
        for name in self.COLLECTIVES:
            self._wrap(dist, name, "collective")

    def _wrap(self, owner, name, kind):
        real = getattr(owner, name)
        counter = self

        def counted(*args, **kwargs):
            if counter.active:
                shape = tuple(args[0].shape) if kind == "collective" and args and torch.is_tensor(args[0]) else None
                counter.current.append((kind, name, shape, "".join(traceback.format_stack(limit=6)[:-1])))
            return real(*args, **kwargs)

        setattr(owner, name, counted)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.active, self.current = True, []
        self._logs = logs_this_step(trainer)

    def window_end(self, trainer):
        self.active = False
        self.per_step[trainer.global_step - 1] = {"logs": self._logs, "events": self.current}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--nan", default=None, help="RANK:STEP")
    parser.add_argument("--signal-at", type=int, default=None)
    parser.add_argument("--count-syncs", action="store_true")
    probe, rest = parser.parse_known_args()
    pretrain_args = rest[rest.index("--") + 1:] if "--" in rest else rest
    cfg = parse_pretrain_args(pretrain_args).options
    loss_module.dino_cross_entropy = poisoned_cross_entropy(loss_module.dino_cross_entropy)
    nan_at = tuple(int(x) for x in probe.nan.split(":")) if probe.nan else None
    observe = Observe(nan_at, probe.signal_at)
    callbacks: list[pl.Callback] = [observe]
    counter = CountSyncs() if probe.count_syncs else None
    if counter is not None:
        from ssl_xcit.pretrain.run import LoggingCadenceProgressBar

        callbacks.append(counter)
        real_end = LoggingCadenceProgressBar.on_train_batch_end

        def end_then_stop_counting(self, trainer, *args, **kwargs):
            real_end(self, trainer, *args, **kwargs)
            counter.window_end(trainer)

        LoggingCadenceProgressBar.on_train_batch_end = end_then_stop_counting
    stop = StopController(PreemptionFlag(signal.SIGUSR2))
    ended = "finished"
    try:
        run_pretraining(cfg, Path(cfg.run.dir), extra_callbacks=callbacks, stop=stop)
    except (FloatingPointError, Exception) as err:  # noqa: BLE001 - the test reads what ended it
        ended = f"{type(err).__name__}: {err}"
    rank = int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", 0))
    decision = stop.decision
    torch.save({"ended": ended, "steps": observe.plain(), "syncs": counter.per_step if counter else None,
                "decision": None if decision is None else vars(decision)}, probe.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
