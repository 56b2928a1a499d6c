"""The run folder's checkpoints: never half-written, written at restartable points, and a
failed write stops the run on every rank (through the stop controller) instead of leaving
some of them waiting.

Layout: ``checkpoints/last.ckpt`` (the restart point) and ``checkpoints/epochNNNN.ckpt``
(a kept copy every ``run.saveckp_freq`` epochs).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ssl_xcit.files import atomic_torch_save, atomic_write
from ssl_xcit.pretrain.stop import StopController

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with an atomic write (temporary file + rename).

    A write that fails (disk full, permission) leaves the previous file whole and is
    recorded in :attr:`failure` instead of raised: the writing rank must still reach the
    barrier the other ranks wait at; :class:`RunCheckpoints` then notes it with the stop
    controller, which stops every rank.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failure: Optional[str] = None

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        try:
            atomic_torch_save(checkpoint, Path(path))
        except OSError as err:
            self.failure = f"could not write checkpoint {path}: {err.strerror or err}"


def last_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """``checkpoint_dir/last.ckpt`` if it exists."""
    path = checkpoint_dir / LAST
    return path if path.is_file() else None


def kept_copy_name(epoch: int) -> str:
    return f"epoch{epoch:04d}.ckpt"


class RunCheckpoints(pl.Callback):
    """Keeps ``last.ckpt`` current: every ``every_n_steps`` optimizer steps, after the last
    batch of each epoch and of the run, and at a stop whose state may be saved; and copies it
    to ``epochNNNN.ckpt`` after the last batch of every ``keep_every_n_epochs``-th epoch.

    Every save happens in ``on_train_batch_end``, a point from which Lightning's loops
    restart exactly (also at an epoch's last batch), after the stop controller's decision
    for that step (so no state a stop forbids is ever saved), and is followed by another
    decision (so a failed write stops every rank at once).
    """

    def __init__(self, checkpoint_dir: Path, stop: StopController, every_n_steps: int,
                 keep_every_n_epochs: int = 0) -> None:
        self.dir, self.stop = checkpoint_dir, stop
        self.every_n_steps, self.keep_every_n_epochs = every_n_steps, keep_every_n_epochs
        self.saved_step: Optional[int] = None

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        epoch_end = batch_idx + 1 == trainer.num_training_batches
        due = (self.every_n_steps > 0 and step % self.every_n_steps == 0) or epoch_end or step == trainer.max_steps
        if not self.stop.may_save or not (due or trainer.should_stop):
            return
        self.save(trainer, pl_module)
        keep = self.keep_every_n_epochs > 0 and (trainer.current_epoch + 1) % self.keep_every_n_epochs == 0
        if epoch_end and keep and self.stop.may_save:
            self.keep_copy(trainer, pl_module, self.dir / kept_copy_name(trainer.current_epoch))

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write ``last.ckpt`` (full state: weights, optimizer, loops, callbacks, RNG); a failed
        write is noted and decided at once, so every rank stops naming the file."""
        io = _atomic_io(trainer)
        io.failure = None
        trainer.save_checkpoint(self.last, weights_only=False)  # rank 0 writes; every rank passes its barrier
        if io.failure is None:
            self.saved_step = trainer.global_step
        self._decide_on(trainer, pl_module, io.failure)

    def keep_copy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> None:
        """Copy ``last.ckpt`` to ``path`` (rank 0 writes, atomically)."""
        failure = None
        if trainer.is_global_zero:
            try:
                atomic_write(path, lambda f: _copy_into(self.last, f))
            except OSError as err:
                failure = f"could not write checkpoint {path}: {err.strerror or err}"
        self._decide_on(trainer, pl_module, failure)

    def _decide_on(self, trainer: pl.Trainer, pl_module: pl.LightningModule, failure: Optional[str]) -> None:
        if failure is not None:
            self.stop.note(trainer, "write_failed", f"{failure} (its previous version, if any, is whole)")
        self.stop.decide(trainer, pl_module)

    def describe_restart_point(self) -> str:
        """Where a re-run continues from, in words."""
        if self.saved_step is None and not self.last.is_file():
            return "no checkpoint was written: a re-run starts from the beginning"
        step = "" if self.saved_step is None else f" (step {self.saved_step})"
        return f"{self.last}{step} is the restart point"


def _copy_into(source: Path, f: Any) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def _atomic_io(trainer: pl.Trainer) -> AtomicCheckpointIO:
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO), "build_trainer installs AtomicCheckpointIO"
    return io
