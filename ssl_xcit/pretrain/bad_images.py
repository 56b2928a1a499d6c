"""What a pretraining run does about images that cannot be decoded (``data.on_bad_image``).

The loader never crashes on one: a worker that cannot decode image ``i`` decodes the next
readable one instead (``i+1``, ``i+2`` ... with ``i``'s augmentation seed, so a resumed run
draws the same replacement) and names the bad file in the batch's ``"bad"`` entry. In the
main process, at the start of each batch, before anything of it is trained:

- ``fail`` (default): every rank agrees to stop, ``last.ckpt`` is written for the steps
  trained so far and the run ends with one line naming the file. Fix or remove the file
  and run the same command again: it continues with that very batch.
- ``skip``: the replacement is trained on; each bad file is written once to
  ``<run.dir>/bad_images.txt`` and counted (``data/bad_images``); the run stops the same
  clean way if more than ``data.max_bad_fraction`` of the dataset is unreadable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.checkpointing import RunCheckpoints
from ssl_xcit.pretrain.module import logs_this_step

BAD_IMAGES_FILE = "bad_images.txt"


def bad_paths(batch: Any) -> list[str]:
    """The unreadable files a collated batch replaced (its ``"bad"`` entry: one string per
    sample, newline-separated paths, empty when the sample's own image was read)."""
    if not isinstance(batch, dict):
        return []
    return [path for entry in batch.get("bad", ()) for path in entry.split("\n") if path]


class BadImagePolicy(pl.Callback):
    """Acts on the batch's bad files before the batch is trained (see the module docstring).

    Args:
        mode: ``fail`` or ``skip``.
        max_fraction: largest share of ``dataset_size`` that ``skip`` tolerates.
        dataset_size: images in the pretraining set.
        run_dir: where ``bad_images.txt`` goes.
        checkpoints: the run's checkpoint writer, for the stop's ``last.ckpt``.
    """

    def __init__(self, mode: str, max_fraction: float, dataset_size: int, run_dir: Path,
                 checkpoints: RunCheckpoints) -> None:
        self.mode, self.max_fraction, self.dataset_size = mode, max_fraction, dataset_size
        self.file, self.checkpoints = run_dir / BAD_IMAGES_FILE, checkpoints
        self.seen: set[str] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.file.is_file():  # a resumed run: files already reported stay reported once
            self.seen = set(self.file.read_text().splitlines())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        paths = bad_paths(batch)
        new = sorted(set(paths) - self.seen)
        if self.mode == "skip" and new:
            self._record(new)
        # every rank takes part in each decision (one boolean all-reduce), bad files or not
        if self.mode == "fail" and trainer.strategy.reduce_boolean_decision(bool(paths), all=False):
            self._stop(trainer, f"unreadable image {paths[0]}" if paths else "an unreadable image on another rank",
                       "fix or remove it, or set data.on_bad_image skip")
        too_many = len(self.seen) > self.max_fraction * self.dataset_size
        if self.mode == "skip" and trainer.strategy.reduce_boolean_decision(too_many, all=False):
            self._stop(trainer, f"{len(self.seen)} of {self.dataset_size} images are unreadable (listed in "
                                f"{self.file}), more than data.max_bad_fraction {self.max_fraction}",
                       "fix the data, or raise data.max_bad_fraction")
        if self.mode == "skip" and logs_this_step(trainer):
            pl_module.log("data/bad_images", float(len(self.seen)))

    def _record(self, new: list[str]) -> None:
        """Append the new paths in one write (ranks append to the same file)."""
        self.seen.update(new)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(f"{path}\n" for path in new).encode())
        finally:
            os.close(fd)

    def _stop(self, trainer: pl.Trainer, what: str, remedy: str) -> None:
        """``last.ckpt`` of the steps trained so far (nothing of this batch), then stop."""
        self.checkpoints.save(trainer)
        raise UserError(f"data: {what}; {self.checkpoints.last} holds step {trainer.global_step}: {remedy}, "
                        "then run the same command again to continue from there")
