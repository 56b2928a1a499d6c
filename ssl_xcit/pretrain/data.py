"""The pretraining DataModule: a labelled source seen through the multi-crop augmentation."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_xcit.pretrain.augment import MultiCropAugmentation
from ssl_xcit.pretrain.config import AugmentConfig, DataConfig
from ssl_xcit.compat import batches_done
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.sampler import ResumableDistributedSampler
from ssl_xcit.image_sources import build_source


class MultiCropDataset(Dataset):
    """``(index, seed)`` → the list of crops of image ``index``, drawn with RNG seeded by ``seed``."""

    def __init__(self, source: Dataset, augmentation: MultiCropAugmentation) -> None:
        self.source, self.augmentation = source, augmentation

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        index, seed = key
        image, _ = self.source[index]
        # torchvision's random transforms draw from the global RNG: seed it for this sample
        # only, leaving the process's own stream (drop path) untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.augmentation(image)


class PretrainDataModule(pl.LightningDataModule):
    """Builds the source once, then one resumable distributed loader of multi-crop batches."""

    def __init__(self, data: DataConfig, augment: AugmentConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.augment_cfg, self.seed = data, augment, seed
        self.dataset: Optional[MultiCropDataset] = None
        self.sampler: Optional[ResumableDistributedSampler] = None
        self._resume_position: Optional[tuple[int, int]] = None

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
            self.dataset = MultiCropDataset(source, MultiCropAugmentation(self.augment_cfg))

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "setup() must run first"
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if self.sampler is None:
            self.sampler = ResumableDistributedSampler(
                len(self.dataset), self.cfg.batch_size_per_device, world, rank, self.seed
            )
            if self._resume_position is not None:
                self.sampler.resume_at(*self._resume_position)
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
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG out of it
        )

    def state_dict(self) -> dict[str, int]:
        """Where the data stream stands: the epoch and the batches it has fully trained on.

        Checkpoints are written from ``on_train_batch_end`` (the batch is processed but not
        yet counted as completed) or at the epoch end, so ``processed`` is the count.
        """
        return {"epoch": self.trainer.current_epoch, "batches_done": batches_done(self.trainer)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_position = (state["epoch"], state["batches_done"])
