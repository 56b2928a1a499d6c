"""Feature export across the processes of a ``torchrun`` launch.

Rank r exports the contiguous rows ``shard_range(N, r, world)`` into its own resumable
shard store; after a barrier, rank 0 streams the shards into the final store, in dataset
order, and removes them. A resumed launch with the same world size continues each shard
where it stopped (a different world size is refused by the shard stores' settings check).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from ssl_xcit.devices import default_device
from ssl_xcit.weights import LoadedBackbone
from ssl_xcit.eval.feature_store import FeatureStoreWriter, load_feature_store
from ssl_xcit.eval.export import export_features

MERGE_CHUNK_ROWS = 65536


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def shard_range(num_rows: int, rank: int, world: int) -> range:
    """Rows of ``rank``: contiguous, sizes differing by at most one, covering [0, num_rows)."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


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
