"""The dense feature store: one grid of patch features per image, memory-mappable and resumable.

A dense store is a feature store (:mod:`ssl_xcit.eval.feature_store`) whose rows are
whole patch grids:

* ``features.npy``: float16 ``(N, h, w, C)``, image n's patch features at grid row i,
  column j (h = H / p, w = W / p for an input of H x W pixels and patch p; C the channels,
  times the number of blocks when several are concatenated); opened with
  ``np.load(..., mmap_mode="r")`` it is never read whole into memory;
* ``labels.npy``: int64 ``(N,)``, all -1 (images carry no label here; masks stay in their folder);
* ``paths.txt``: the N source images, one per line;
* ``meta.json``: the writer's dict plus ``grid`` ``[h, w]``, ``channels`` C and ``dtype``.

Every image of a store has the same grid: images are resized to one size before their
features are taken. Writing, resuming and the completion marker are the feature store's
own (:class:`~ssl_xcit.eval.feature_store.FeatureStoreWriter`), with each grid flattened
to one row of h·w·C values on the way in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssl_xcit.eval.feature_store import FEATURES, META, PATHS, PROGRESS, FeatureError, FeatureStoreWriter

DTYPE = np.float16  # patch features are many: half the disk and page cache, ample precision for a probe


class DenseStoreWriter(FeatureStoreWriter):
    """Fills a dense store image by image (in order), resuming an interrupted export.

    Args:
        out_dir: the store's folder.
        num_rows: N, images the finished store will hold.
        grid: (h, w, C) of every image's features.
        meta: JSON-serialisable description, written to ``meta.json`` with the grid added.
        overwrite: replace a finished or mismatching store instead of raising.
    """

    def __init__(self, out_dir: str | os.PathLike, num_rows: int, grid: tuple[int, int, int], meta: dict[str, Any],
                 overwrite: bool = False) -> None:
        self.grid = tuple(int(g) for g in grid)
        h, w, c = self.grid
        meta = {**meta, "grid": [h, w], "channels": c, "dtype": np.dtype(DTYPE).name}
        super().__init__(out_dir, num_rows, h * w * c, meta, overwrite)
        self._features = self._features.reshape(num_rows, -1)  # a flat view: the parent writes (n, h·w·C) rows

    def _create(self) -> None:
        super()._create()
        self._features = np.lib.format.open_memmap(self.root / FEATURES, mode="w+", dtype=DTYPE,
                                                   shape=(self.num_rows, *self.grid))

    def write_grids(self, start_row: int, grids: np.ndarray, paths: Sequence[str]) -> None:
        """Writes images ``[start_row, start_row + n)``: ``grids`` (n, h, w, C), finite."""
        if tuple(grids.shape[1:]) != self.grid:
            raise FeatureError(f"chunk at row {start_row}: grids of shape {tuple(grids.shape[1:])}, "
                               f"the store holds {self.grid}")
        self.write(start_row, grids.reshape(len(grids), -1), np.full(len(grids), -1, dtype=np.int64), paths)


@dataclass(frozen=True)
class DenseStore:
    """A finished dense store: ``features`` (N, h, w, C) float16 memory-mapped read-only,
    the N source ``paths`` and the ``meta`` dict."""

    root: Path
    features: np.ndarray
    paths: list[str]
    meta: dict[str, Any]

    @property
    def grid(self) -> tuple[int, int]:
        return self.features.shape[1], self.features.shape[2]

    @property
    def channels(self) -> int:
        return self.features.shape[3]


def load_dense_store(root: str | os.PathLike) -> DenseStore:
    """Opens a finished dense store, checking its array against its meta and paths.

    Raises:
        FeatureError: folder missing, store incomplete, or files that disagree.
    """
    root = Path(root)
    if not (root / META).exists():
        state = "is incomplete (rerun the export to resume it)" if (root / PROGRESS).exists() else "does not exist"
        raise FeatureError(f"dense feature store {root} {state}")
    meta = json.loads((root / META).read_text())
    features = np.load(root / FEATURES, mmap_mode="r")
    paths = (root / PATHS).read_text(encoding="utf-8").splitlines()
    expected = (len(paths), *meta.get("grid", ()), meta.get("channels"))
    if features.dtype != DTYPE or features.shape != expected:
        raise FeatureError(f"{root / FEATURES} is {features.dtype} {features.shape}; its meta and paths say "
                           f"{np.dtype(DTYPE).name} {expected}: not a dense store")
    return DenseStore(root, features, paths, meta)
