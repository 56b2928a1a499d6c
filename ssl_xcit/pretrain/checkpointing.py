"""Checkpoint files that are never half-written, and the run folder's checkpoint layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ssl_xcit.files import atomic_torch_save

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with an atomic write (temporary file + rename)."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(checkpoint, Path(path))


def last_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """``checkpoint_dir/last.ckpt`` if it exists."""
    path = checkpoint_dir / LAST
    return path if path.is_file() else None


class LastCheckpoint(pl.Callback):
    """Keeps ``last.ckpt`` current: every ``every_n_steps`` optimizer steps, after the last
    batch of each epoch, and after the batch at which training stops.

    Every save happens in ``on_train_batch_end``, the one point from which Lightning's
    loops restart exactly (also at an epoch's last batch); ModelCheckpoint cannot combine
    step and epoch triggers.
    """

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every_n_steps = path, every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if (
            (self.every_n_steps > 0 and step % self.every_n_steps == 0)
            or batch_idx + 1 == trainer.num_training_batches
            or step == trainer.max_steps
            or trainer.should_stop
        ):
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizer, loops, callbacks
