"""``python -m tests.kill_switch WHEN -- ssl-xcit ARGS``: the ssl-xcit CLI, stopped at one chosen point.

WHEN is ``ACTION@POINT``:
- ACTION: ``kill`` (SIGKILL this process: a crash, nothing runs after) or ``term`` / ``usr2``
  (the signal to this process and to its data-loader workers, as SLURM signals every
  process of a job step; the run goes on until it stops by itself);
- POINT: ``save:K`` (right after ``last.ckpt`` is written for step K), ``epoch-start:E``
  (epoch E begins: the previous epoch's end-of-epoch work is done), ``monitor:E`` (in the
  middle of epoch E's k-NN monitor) or ``step:K`` (in the middle of step K's backward pass).

Only the test suite uses this; nothing of it is in the package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytorch_lightning as pl

from ssl_xcit.cli import main
from ssl_xcit.pretrain import checkpointing, knn_monitor, run

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr2": signal.SIGUSR2}


def fire(action: str) -> None:
    if action != "kill":  # every process of the step: the workers too
        subprocess.run(["pkill", f"-{SIGNALS[action].name[3:]}", "-P", str(os.getpid())], check=False)
    os.kill(os.getpid(), SIGNALS[action])


class Trigger(pl.Callback):
    def __init__(self, action: str, point: str, value: int) -> None:
        self.action, self.point, self.value = action, point, value

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.point == "epoch-start" and trainer.current_epoch == self.value:
            fire(self.action)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.point == "step" and trainer.global_step == self.value - 1:
            fire(self.action)


def install(when: str) -> None:
    action, _, where = when.partition("@")
    point, _, value = where.partition(":")
    k = int(value)
    trigger = Trigger(action, point, k)
    monitor_callbacks = run.monitor_callbacks
    run.monitor_callbacks = lambda cfg: monitor_callbacks(cfg) + [trigger]  # type: ignore[assignment]

    save = checkpointing.RunCheckpoints.save

    def save_then_fire(self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save(self, trainer, pl_module)
        if point == "save" and trainer.global_step == k:
            fire(action)

    checkpointing.RunCheckpoints.save = save_then_fire  # type: ignore[method-assign]

    evaluate = knn_monitor.KNNMonitor.evaluate

    def evaluate_and_fire(self: Any, backbone: Any, device: Any) -> Any:
        result = evaluate(self, backbone, device)
        epoch = getattr(self, "_epoch_for_test", None)
        if point == "monitor" and epoch == k:
            fire(action)
        return result

    on_epoch_end = knn_monitor.KNNMonitor.on_train_epoch_end

    def note_epoch(self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_for_test = trainer.current_epoch
        on_epoch_end(self, trainer, pl_module)

    knn_monitor.KNNMonitor.evaluate = evaluate_and_fire  # type: ignore[method-assign]
    knn_monitor.KNNMonitor.on_train_epoch_end = note_epoch  # type: ignore[method-assign]


if __name__ == "__main__":
    when, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    install(when)
    sys.exit(main(argv))
