"""What a pretraining run does about images that cannot be decoded (``data.on_bad_image``).

The loader never crashes on one: a worker that cannot decode image ``i`` decodes the next
readable one instead (``i+1``, ``i+2`` ... with ``i``'s augmentation seed, so a resumed run
draws the same replacement) and names the bad file in the batch's ``"bad"`` entry. In the
main process, at the start of each batch, the rank that meets one notes it with the stop
controller, which decides for every rank at its next decision point:

- ``fail`` (default): every rank stops there and nothing after the batch that held the file
  is saved, so the previous ``last.ckpt`` is the restart point; the run ends with one line
  naming the file. Fix or remove it and run the same command again.
- ``skip``: the replacement is trained on; each bad file is written once to
  ``<run.dir>/bad_images.txt`` and counted (``data/bad_images``); once more than
  ``data.max_bad_fraction`` of the dataset is unreadable, every rank stops at the next
  decision point with ``last.ckpt`` written there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ssl_xcit.pretrain.module import logs_this_step
from ssl_xcit.pretrain.stop import StopController

BAD_IMAGES_FILE = "bad_images.txt"


def bad_paths(batch: Any) -> list[str]:
    """The unreadable files a collated batch replaced (its ``"bad"`` entry: one string per
    sample, newline-separated paths, empty when the sample's own image was read)."""
    if not isinstance(batch, dict):
        return []
    return [path for entry in batch.get("bad", ()) for path in entry.split("\n") if path]


class BadImagePolicy(pl.Callback):
    """Acts on the batch's bad files before the batch is trained (see the module docstring);
    no collective and no device read: the stop controller decides for every rank.

    Args:
        mode: ``fail`` or ``skip``.
        max_fraction: largest share of ``dataset_size`` that ``skip`` tolerates.
        dataset_size: images in the pretraining set.
        run_dir: where ``bad_images.txt`` goes.
        stop: the run's stop controller.
    """

    def __init__(self, mode: str, max_fraction: float, dataset_size: int, run_dir: Path, stop: StopController) -> None:
        self.mode, self.max_fraction, self.dataset_size = mode, max_fraction, dataset_size
        self.file, self.stop = run_dir / BAD_IMAGES_FILE, stop
        self.seen: set[str] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.file.is_file():  # a resumed run: files already reported stay reported once
            self.seen = set(self.file.read_text().splitlines())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        paths = bad_paths(batch)
        if paths and self.mode == "fail":
            self.stop.note(trainer, "bad_image", f"data: unreadable image {paths[0]} in the batch of step "
                                                 f"{trainer.global_step}: fix or remove it, or set data.on_bad_image skip")
        new = sorted(set(paths) - self.seen)
        if self.mode == "skip" and new:
            self._record(new)
            if len(self.seen) > self.max_fraction * self.dataset_size:
                self.stop.note(trainer, "too_many_bad_images",
                               f"data: {len(self.seen)} of {self.dataset_size} images are unreadable (listed in "
                               f"{self.file}), more than data.max_bad_fraction {self.max_fraction}: fix the data, "
                               "or raise data.max_bad_fraction")
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
