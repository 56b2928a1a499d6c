"""A distributed sampler whose order is a pure function of (seed, epoch, rank), resumable mid-epoch.

Each epoch is a seeded permutation of the dataset cut to a whole number of global batches
and dealt round-robin to the ranks (every rank gets the same number of full batches).
Every index comes with its own augmentation seed, derived from (seed, epoch, index), so
the crops of a sample do not depend on the number of data-loader workers or on where a
run was interrupted. ``start_batch`` skips the batches an interrupted epoch already used.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of sample ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)`` for this rank's share of one epoch.

    Args:
        dataset_size: number of samples.
        batch_size: per-rank batch size; each rank yields whole batches only.
        num_replicas: world size.
        rank: this process's rank.
        seed: run seed.
    """

    def __init__(self, dataset_size: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = dataset_size // (batch_size * num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; a new epoch starts from its first batch
        unless it is the epoch a resume is positioned in."""
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Position the sampler after ``batches_done`` batches of ``epoch``; after a whole
        epoch, at the start of the next one.

        The next epoch must be set here, not left to ``set_epoch``: a DataLoader with
        workers starts drawing indices as soon as its iterator exists, which Lightning
        creates before it calls ``set_epoch`` on resume.
        """
        if batches_done >= self.batches_per_epoch:
            epoch, batches_done = epoch + 1, 0
        self.epoch, self.start_batch = epoch, batches_done

    def __len__(self) -> int:
        """The whole epoch's share, also when resuming mid-epoch: Lightning counts the
        batches already done in its own restored progress."""
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        order = torch.randperm(self.dataset_size, generator=gen)
        used = self.batches_per_epoch * self.batch_size * self.num_replicas
        mine = order[:used][self.rank :: self.num_replicas]
        for index in mine[self.start_batch * self.batch_size :].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)
