"""Features across the processes of a ``torch.distributed`` job.

Rank r computes the contiguous rows ``shard_range(N, r, world)``. For an export
(``torchrun``), each rank writes its rows into its own resumable shard store; after a
barrier, rank 0 streams the shards into the final store, in dataset order, and removes
them. A resumed launch with the same world size continues each shard where it stopped (a
different world size is refused by the shard stores' settings check). For small sets held
in memory (the pretraining monitor's), :func:`compute_features_sharded` gathers the rows
of every rank instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from ssl_xcit.devices import default_device
from ssl_xcit.weights import LoadedBackbone
from ssl_xcit.eval.feature_store import FeatureStoreWriter, load_feature_store
from ssl_xcit.eval.export import compute_features, export_features

MERGE_CHUNK_ROWS = 65536


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def shard_range(num_rows: int, rank: int, world: int) -> range:
    """Rows of ``rank``: contiguous, sizes differing by at most one, covering [0, num_rows)."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_shards(local: torch.Tensor, num_rows: int) -> torch.Tensor:
    """All rows of a (num_rows, ...) tensor from each rank's ``shard_range`` rows, in order, on every rank.

    One ``all_gather`` of ``local`` padded to the largest shard: a tensor on the
    process group's device (CPU for gloo, the rank's GPU for NCCL).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    assert len(local) == len(shard_range(num_rows, rank, world))
    padded = local.new_zeros((-(-num_rows // world), *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: len(shard_range(num_rows, r, world))] for r, part in enumerate(parts)])


def compute_features_sharded(
    model: nn.Module, dataset: Dataset, device: torch.device, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~ssl_xcit.eval.export.compute_features` shared by the processes of ``torch.distributed``.

    Every rank must call it with the same dataset: rank r computes the rows
    ``shard_range(N, r, world)``, and one collective gives every rank all N (features (N, D)
    float32, labels (N,) int64) in dataset order. Outside ``torch.distributed`` (or with one
    process) it is ``compute_features`` itself and calls no collective.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute_features(model, dataset, device=device, **kwargs)
    rows = shard_range(len(dataset), dist.get_rank(), dist.get_world_size())  # type: ignore[arg-type]
    # a rank without rows (fewer rows than ranks) computes row 0 and drops it: the gather needs its width D
    features, labels = compute_features(model, Subset(dataset, rows or range(1)), device=device, **kwargs)
    assert labels.max(initial=0) < 2**24
    # labels travel as one more float32 column (exact below 2**24): one collective per set
    packed = np.concatenate([features, labels[:, None].astype(np.float32)], axis=1)[: len(rows)]
    gathered = gather_shards(torch.from_numpy(packed).to(device), len(dataset)).cpu().numpy()  # type: ignore[arg-type]
    return np.ascontiguousarray(gathered[:, :-1]), gathered[:, -1].astype(np.int64)


def merge_shards(shard_dirs: list[Path], out_dir: Path, meta: dict[str, Any]) -> None:
    """Concatenate finished shard stores into one store at ``out_dir``."""
    shards = [load_feature_store(d, check_finite=False) for d in shard_dirs]
    writer = FeatureStoreWriter(out_dir, sum(len(s.labels) for s in shards), shards[0].dim, meta)
    row = 0
    for shard in shards:
        for start in range(0, len(shard.labels), MERGE_CHUNK_ROWS):
            stop = min(start + MERGE_CHUNK_ROWS, len(shard.labels))
            if row >= writer.rows_done:  # a merge interrupted earlier resumes too
                writer.write(row, shard.features[start:stop], shard.labels[start:stop], shard.paths[start:stop])
            row += stop - start
    writer.finish()


def export_features_sharded(loaded: LoadedBackbone, source: Dataset, out_dir: Path, **kwargs: Any) -> Path:
    """:func:`export_features` split over the launched processes (one GPU each when there are GPUs)."""
    rank, world, local_rank = launched_world()
    device = default_device(local_rank=local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows = shard_range(len(source), rank, world)  # type: ignore[arg-type]
    shard_dirs = [out_dir / ".shards" / f"rank{r}-of-{world}" for r in range(world)]
    meta = dict(kwargs.pop("meta", None) or {})
    shard_meta = {**meta, "shard": [rows.start, rows.stop], "world_size": world}
    export_features(loaded, Subset(source, rows), shard_dirs[rank], device=device, meta=shard_meta,
                    progress=kwargs.pop("progress", True) and rank == 0, **kwargs)
    dist.barrier()
    if rank == 0:
        merged = {k: v for k, v in load_feature_store(shard_dirs[0], check_finite=False).meta.items()
                  if k not in ("shard",)}
        merge_shards(shard_dirs, out_dir, {**merged, "world_size": world})
        shutil.rmtree(out_dir / ".shards")
    dist.barrier()
    return out_dir
