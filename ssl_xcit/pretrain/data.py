"""The pretraining DataModule: a labelled source seen through the multi-crop augmentation."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_xcit.pretrain.augment import MultiCropAugmentation
from ssl_xcit.pretrain.config import AugmentConfig, DataConfig
from ssl_xcit.compat import batches_done
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.preemption import ignore_stop_signals
from ssl_xcit.pretrain.sampler import ResumableDistributedSampler
from ssl_xcit.image_sources import ImageFolderSource, UnreadableImage, build_source


class MultiCropDataset(Dataset):
    """``(index, seed)`` → the crops of image ``index``, every random choice drawn from ``seed``.

    A sample is ``{"crops": [3×S×S uint8] * n_crops, "bad": ""}``, augmented but not yet
    normalised (the module does that on the training device); ``on_device``: the crops only
    cut, resized and flipped, plus their colour parameters ``"params"``, which the module
    applies on the training device. An image that cannot be decoded is replaced by the
    next readable one, augmented with the same seed, and named in ``"bad"`` (see
    :mod:`ssl_xcit.pretrain.bad_images`).
    """

    def __init__(self, source: Dataset, augmentation: MultiCropAugmentation, on_device: bool = False) -> None:
        self.source, self.augmentation, self.on_device = source, augmentation, on_device

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def _image(self, index: int) -> Any:
        """The file path of an image-folder source (decoded by the augmentation, at reduced
        size where the crops allow), else the source's decoded image."""
        source = self.source
        while isinstance(source, Subset):
            source, index = source.dataset, source.indices[index]
        if isinstance(source, ImageFolderSource):
            return source.path(index)
        return source[index][0]

    def _augment(self, index: int, seed: int) -> dict[str, Any]:
        image = self._image(index)
        if self.on_device:
            return self.augmentation.geometric(image, seed)
        return {"crops": self.augmentation.worker_crops(image, seed)}

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        bad: list[str] = []
        for candidate in range(index, index + len(self)):
            try:
                sample = self._augment(candidate % len(self), seed)
            except UnreadableImage as err:
                bad.append(err.path)
                continue
            return {**sample, "bad": "\n".join(bad)}
        raise UserError(f"data.path: none of the {len(self)} images can be decoded, e.g. {bad[0]}")


class PretrainDataModule(pl.LightningDataModule):
    """Builds the source once, then one resumable distributed loader of multi-crop batches."""

    def __init__(self, data: DataConfig, augment: AugmentConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.augment_cfg, self.seed = data, augment, seed
        self.dataset: Optional[MultiCropDataset] = None
        self.sampler: Optional[ResumableDistributedSampler] = None
        self._resume_state: Optional[dict[str, int]] = None

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            source = build_source(
                self.cfg.path,
                self.cfg.split,
                self.cfg.cache_dir,
                self.cfg.max_images,
                self.seed,
                self.cfg.synthetic_size,
                self.cfg.synthetic_resolution,
            )
            self.dataset = MultiCropDataset(source, MultiCropAugmentation(self.augment_cfg),
                                            on_device=self.augment_cfg.device == "train")

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "setup() must run first"
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if self.sampler is None:
            self.sampler = ResumableDistributedSampler(
                len(self.dataset), self.cfg.batch_size_per_device, world, rank, self.seed
            )
            if self._resume_state is not None:
                check_same_global_batch(self._resume_state, self.cfg.batch_size_per_device, world)
                self.sampler.resume_at(self._resume_state["epoch"], self._resume_state["batches_done"])
        if self.sampler.batches_per_epoch == 0:
            raise UserError(
                f"data: {len(self.dataset)} images make no full global batch of "
                f"{self.cfg.batch_size_per_device} x {world} processes; lower data.batch_size_per_device"
            )
        workers = self.cfg.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size_per_device,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG out of it
        )

    def state_dict(self) -> dict[str, int]:
        """Where the data stream stands: the epoch, the global batches it has fully trained on,
        and the global batch's size and split (which a resume must keep, see
        :func:`check_same_global_batch`).

        Checkpoints are written from ``on_train_batch_end`` (the batch is processed but not
        yet counted as completed) or at the epoch end, so ``processed`` is the count.
        """
        world = self.trainer.world_size
        return {"epoch": self.trainer.current_epoch, "batches_done": batches_done(self.trainer),
                "global_batch_size": self.cfg.batch_size_per_device * world, "world_size": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_state = dict(state)


def check_same_global_batch(state: dict[str, int], batch_size_per_device: int, world_size: int) -> None:
    """A run resumes only at the global batch it was trained with.

    Its data position, schedules and learning rate are counted in global batches, and every
    global batch is the same block of the epoch's permutation whatever the number of processes
    that share it, so the same global batch over another number of processes continues the run
    exactly in samples (the same images, crops and schedules; float sums in another order). A
    different global batch would shift all three: refused, naming both sizes.
    """
    saved = state.get("global_batch_size")
    now = batch_size_per_device * world_size
    if saved is None or saved == now:
        return
    old_world = state.get("world_size", 1)
    hint = (f"set --data.batch_size_per_device {saved // world_size} to keep it over {world_size} process(es)"
            if saved % world_size == 0 else f"run on a number of processes that divides {saved}")
    raise UserError(f"resume: last.ckpt was trained with a global batch of {saved} ({old_world} process(es) x "
                    f"{saved // old_world}); this run's is {now} ({world_size} x {batch_size_per_device}): {hint}, "
                    "or start a new run from it with --model.init")
