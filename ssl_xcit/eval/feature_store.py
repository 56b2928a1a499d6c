"""The on-disk feature store written by ``ssl-xcit export``, and the feature-array contract.

A store is a folder holding

* ``features.npy``: float32 ``(N, D)``, a preallocated ``.npy`` filled in chunks, so it
  can be opened with ``np.load(..., mmap_mode="r")`` without reading it into memory;
* ``labels.npy``: int64 ``(N,)``;
* ``paths.txt``: the N source paths, one per line;
* ``meta.json``: the caller's dict (checkpoint, arch, transform, dim, normalized, ...).

``meta.json`` is written last and atomically, so a folder holding it is complete. While
an export runs, ``progress.json`` (also replaced atomically, after every chunk's data is
flushed) records how many rows are done, so an interrupted export resumes from the first
unfinished row. The array checks at the bottom are shared by k-NN and the linear probe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssl_xcit.errors import UserError
from ssl_xcit.files import atomic_write_json

FEATURES, LABELS, PATHS, META, PROGRESS = "features.npy", "labels.npy", "paths.txt", "meta.json", "progress.json"
_SCAN_ROWS = 65536  # rows per chunk when scanning a memmap, so the scan stays in bounded memory


class FeatureError(UserError, ValueError):
    """Bad features, labels or feature store; the message names the culprit."""


def _json_roundtrip(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as it will read back from disk (tuples become lists); raises if unserialisable."""
    try:
        return json.loads(json.dumps(meta))
    except TypeError as err:
        raise FeatureError(f"feature store meta is not JSON-serialisable: {err}") from err


class FeatureStoreWriter:
    """Fills a feature store chunk by chunk, resuming an interrupted export.

    Chunks must arrive in row order: ``write(start_row=rows_done, ...)``. After each chunk
    the arrays and ``paths.txt`` are flushed to disk before ``progress.json`` is replaced,
    so the recorded progress never runs ahead of the data. On resume, ``paths.txt`` is cut
    back to the recorded length and rows past ``rows_done`` are simply written again.

    Args:
        out_dir: the store's folder (created if missing).
        num_rows: N, rows the finished store will hold.
        dim: D, the feature dimension.
        meta: JSON-serialisable description of the features, written to ``meta.json``.
        overwrite: replace a finished or mismatching store instead of raising.

    Raises:
        FeatureError: the folder holds a finished store, or a partial one written with a
            different ``num_rows``, ``dim`` or ``meta`` (unless ``overwrite``).
    """

    def __init__(
        self, out_dir: str | os.PathLike, num_rows: int, dim: int, meta: dict[str, Any], overwrite: bool = False
    ) -> None:
        if num_rows < 1 or dim < 1:
            raise FeatureError(f"feature store needs num_rows >= 1 and dim >= 1, got num_rows={num_rows}, dim={dim}")
        self.root = Path(out_dir)
        self.num_rows, self.dim, self.meta = num_rows, dim, _json_roundtrip(meta)
        self.root.mkdir(parents=True, exist_ok=True)
        progress = self._read_existing(overwrite)
        if progress is None:
            self._create()
        else:
            self._rows_done, self._paths_bytes = progress["rows_done"], progress["paths_bytes"]
            self._features = np.load(self.root / FEATURES, mmap_mode="r+")
            self._labels = np.load(self.root / LABELS, mmap_mode="r+")
            with open(self.root / PATHS, "r+b") as f:
                f.truncate(self._paths_bytes)

    @property
    def rows_done(self) -> int:
        """Rows already on disk; the next ``write`` must start here."""
        return self._rows_done

    def _read_existing(self, overwrite: bool) -> dict[str, Any] | None:
        """The progress record of a resumable partial store, or None to start afresh."""
        if (self.root / META).exists() and not overwrite:
            raise FeatureError(f"{self.root} already holds a finished feature store; pass overwrite=True to replace it")
        if not (self.root / PROGRESS).exists() or overwrite:
            return None
        progress = json.loads((self.root / PROGRESS).read_text())
        differ = {key: value for key, value in self._settings().items() if progress[key] != value}
        if differ:
            details = "; ".join(f"{key}: on disk {progress[key]!r}, requested {value!r}" for key, value in differ.items())
            raise FeatureError(
                f"{self.root} holds a partial feature store written with different settings "
                f"({details}); pass overwrite=True to start over"
            )
        return progress

    def _create(self) -> None:
        for name in (META, PROGRESS):
            (self.root / name).unlink(missing_ok=True)
        shape = (self.num_rows, self.dim)
        self._features = np.lib.format.open_memmap(self.root / FEATURES, mode="w+", dtype=np.float32, shape=shape)
        self._labels = np.lib.format.open_memmap(self.root / LABELS, mode="w+", dtype=np.int64, shape=shape[:1])
        (self.root / PATHS).write_bytes(b"")
        self._rows_done, self._paths_bytes = 0, 0
        self._save_progress()

    def _settings(self) -> dict[str, Any]:
        """What a partial store must have been started with to be resumed by this writer."""
        return {"num_rows": self.num_rows, "dim": self.dim, "meta": self.meta}

    def _save_progress(self) -> None:
        done = {"rows_done": self._rows_done, "paths_bytes": self._paths_bytes}
        atomic_write_json(self.root / PROGRESS, {**self._settings(), **done})

    def write(self, start_row: int, features: np.ndarray, labels: np.ndarray, paths: Sequence[str]) -> None:
        """Writes rows ``[start_row, start_row + n)`` and records them as done.

        Args:
            start_row: must equal ``rows_done``.
            features: ``(n, D)`` finite values, stored as float32.
            labels: ``(n,)`` integer class indices.
            paths: the n source paths (no newlines).
        """
        n = len(features)
        if start_row != self._rows_done:
            raise FeatureError(
                f"chunk starts at row {start_row} but the store has {self._rows_done} rows done; write chunks in order"
            )
        if np.shape(features) != (n, self.dim) or np.shape(labels) != (n,) or len(paths) != n:
            raise FeatureError(
                f"chunk at row {start_row}: features {np.shape(features)}, labels {np.shape(labels)} and "
                f"{len(paths)} paths do not match (n, {self.dim}), (n,), n"
            )
        if start_row + n > self.num_rows:
            raise FeatureError(f"chunk rows [{start_row}, {start_row + n}) run past the store's {self.num_rows} rows")
        bad = first_nonfinite_row(features)
        if bad is not None:
            raise FeatureError(f"non-finite feature in row {start_row + bad} (chunk starting at row {start_row})")
        if any("\n" in p or "\r" in p for p in paths):
            raise FeatureError(f"a path in the chunk at row {start_row} contains a newline")
        self._features[start_row : start_row + n] = features
        self._labels[start_row : start_row + n] = labels
        self._features.flush()
        self._labels.flush()
        with open(self.root / PATHS, "ab") as f:
            f.write("".join(p + "\n" for p in paths).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            self._paths_bytes = f.tell()
        self._rows_done = start_row + n
        self._save_progress()

    def finish(self) -> None:
        """Marks the store complete by writing ``meta.json``; every row must be written."""
        if self._rows_done != self.num_rows:
            raise FeatureError(f"cannot finish {self.root}: {self._rows_done} of {self.num_rows} rows written")
        del self._features, self._labels  # close the memmaps before declaring completion
        atomic_write_json(self.root / META, self.meta)
        (self.root / PROGRESS).unlink()


@dataclass(frozen=True)
class FeatureStore:
    """A finished feature store, loaded.

    Attributes:
        root: the store's folder.
        features: ``(N, D)`` float32, memory-mapped read-only.
        labels: ``(N,)`` int64.
        paths: the N source paths.
        meta: the dict given to the writer.
    """

    root: Path
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    meta: dict[str, Any]

    @property
    def dim(self) -> int:
        return self.features.shape[1]


def load_feature_store(root: str | os.PathLike, check_finite: bool = True) -> FeatureStore:
    """Opens a finished store, checking that its files agree with each other.

    Args:
        root: the store's folder.
        check_finite: scan the features (in chunks) for NaN/inf.

    Raises:
        FeatureError: folder or file missing, store incomplete, shapes that disagree, or a
            non-finite feature (naming its row).
    """
    root = Path(root)
    if not root.is_dir():
        raise FeatureError(f"feature store folder {root} does not exist")
    if not (root / META).exists():
        done = json.loads((root / PROGRESS).read_text())["rows_done"] if (root / PROGRESS).exists() else "unknown"
        raise FeatureError(
            f"feature store {root} is incomplete (no {META}; rows done: {done}); rerun the export to resume it"
        )
    for name in (FEATURES, LABELS, PATHS):
        if not (root / name).exists():
            raise FeatureError(f"feature store {root} has no {name}")
    features = np.load(root / FEATURES, mmap_mode="r")
    labels = np.load(root / LABELS)
    paths = (root / PATHS).read_text(encoding="utf-8").splitlines()
    if features.ndim != 2 or features.dtype != np.float32:
        raise FeatureError(f"{root / FEATURES} must be float32 (N, D), got {features.dtype} {features.shape}")
    if labels.shape != (len(features),) or len(paths) != len(features):
        raise FeatureError(
            f"feature store {root} disagrees with itself: "
            f"features {features.shape}, labels {labels.shape}, {len(paths)} paths"
        )
    if check_finite:
        validate_features(str(root / FEATURES), features)
    meta = json.loads((root / META).read_text())
    return FeatureStore(root, features, labels.astype(np.int64, copy=False), paths, meta)


def check_compatible(a: FeatureStore, b: FeatureStore) -> None:
    """Raises if two stores (e.g. train and test) cannot be compared: different dim or arch."""
    if a.dim != b.dim:
        raise FeatureError(f"feature stores differ in dim: {a.root} has {a.dim}, {b.root} has {b.dim}")
    if a.meta.get("arch") != b.meta.get("arch"):
        raise FeatureError(
            f"feature stores differ in arch: {a.root} has {a.meta.get('arch')!r}, {b.root} has {b.meta.get('arch')!r}"
        )


def first_nonfinite_row(features: np.ndarray) -> int | None:
    """Index of the first row of ``features`` (any shape ``(N, ...)``) holding NaN/inf, else None."""
    for start in range(0, len(features), _SCAN_ROWS):
        chunk = np.asarray(features[start : start + _SCAN_ROWS])
        bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def validate_features(name: str, features: np.ndarray) -> None:
    """Raises unless ``features`` is a non-empty, finite ``(N, D)`` array; ``name`` labels it."""
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise FeatureError(f"{name} must be a non-empty (N, D) array, got shape {features.shape}")
    bad = first_nonfinite_row(features)
    if bad is not None:
        raise FeatureError(f"{name} has a non-finite value in row {bad}")


def validate_labelled(name: str, features: np.ndarray, labels: np.ndarray) -> None:
    """Raises unless ``features`` is valid and ``labels`` holds one class index >= 0 per row."""
    validate_features(f"{name} features", features)
    if labels.shape != (len(features),):
        raise FeatureError(f"{name} labels have shape {labels.shape} but there are {len(features)} {name} features")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise FeatureError(
            f"{name} labels must be integer class indices >= 0, got dtype {labels.dtype}, min {labels.min()}"
        )


def validate_train_test(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray
) -> None:
    """Raises unless both splits are valid and share the feature dimension."""
    validate_labelled("train", train_features, train_labels)
    validate_labelled("test", test_features, test_labels)
    if train_features.shape[1] != test_features.shape[1]:
        raise FeatureError(
            f"feature dims differ: train features have dim {train_features.shape[1]}, "
            f"test features have dim {test_features.shape[1]}"
        )
