"""Image sources: an ImageFolder directory, a .tar.gz of one, CIFAR-10, or synthetic images.

Every source is a map-style dataset of ``(image, label)``; pretraining ignores labels,
evaluation uses them. Every process of a job builds its own sources, so what lands in the
cache (an extracted archive, the CIFAR-10 download) is made by one process at a time
under a lock file beside it, and the others reuse it. Archives are extracted atomically
(into a temporary folder renamed when complete), so an interrupted extraction never
leaves a half-filled dataset behind.

``option`` arguments name the setting that gave the path (``data.path``,
``monitor.val_path``, ``--train-data`` ...), so that errors name it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ssl_xcit.errors import UserError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class UnreadableImage(UserError):
    """An image file that cannot be decoded; ``path`` names it.

    Raised in a DataLoader worker, it reaches the main process as torch re-raises worker
    errors: rebuilt from a multi-line report (``Caught UnreadableImage in DataLoader worker
    ... Original Traceback ...``). The report's last line is this error's own one line,
    which becomes the message again.
    """

    def __init__(self, path: str, reason: object = None) -> None:
        if reason is None:  # torch's re-raise of a worker's error: the report is the only argument
            line = str(path).strip().splitlines()[-1]
            path, _, reason = line.partition("unreadable image ")[2].rpartition(": ")
        super().__init__(f"unreadable image {path}: {reason}")
        self.path, self.reason = str(path), str(reason)

    def __reduce__(self) -> tuple:  # raised in data-loader workers: must survive pickling
        return type(self), (self.path, self.reason)


DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises for a file that is not a decodable image (truncated, corrupt, not an image, too big)."""


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, or raise :class:`UnreadableImage` naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except DECODE_ERRORS as err:
        raise UnreadableImage(path, err) from err


@contextmanager
def cache_lock(target: Path, task: str) -> Iterator[None]:
    """Hold the lock file ``<target>.lock`` beside ``target`` while ``task`` (e.g. "extraction
    of X into Y") makes it.

    A process that finds the lock held says so once on stderr and waits: for the holder to
    finish, or to die (the kernel drops a dead process's ``flock``). On a file system
    without ``flock`` every process goes ahead unlocked; the atomic rename keeps that
    correct, only slower.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process's {task} ({lock.name})", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            print(f"{lock.name} cannot be locked ({err}): this process does the {task} itself", file=sys.stderr,
                  flush=True)
        yield


def extract_archive(archive: Path, cache_dir: Path, option: str = "data.path") -> Path:
    """Extract ``archive`` once into ``cache_dir`` and return the extracted folder.

    The folder is keyed by the archive's name, size and mtime, so a changed archive is
    extracted again and an unchanged one never twice. Processes that share ``cache_dir``
    take turns (:func:`cache_lock`): the first extracts, the others find the folder made.
    """
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / f"{archive.name.split('.')[0]}-{key}"
    if not target.is_dir():
        with cache_lock(target, f"extraction of {archive} into {target}"):
            if not target.is_dir():  # made while this process waited for the lock
                _extract_atomically(archive, target, option)
    return target


def _extract_atomically(archive: Path, target: Path, option: str) -> None:
    """Extract into a staging folder beside ``target``, renamed to ``target`` when complete."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        os.replace(staging, target)
    except (tarfile.TarError, OSError) as err:
        # A process this lock does not reach (another node on a shared cache) may have
        # renamed its complete copy into place first: that is the dataset, not an error.
        if not target.is_dir():
            raise UserError(f"{option}: cannot extract {archive}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _descend_single_folders(root: Path) -> Path:
    """Skip wrapper folders (an archive often holds one top folder around the data), but
    never into a class folder: a wrapper holds exactly one folder, which holds folders."""
    while True:
        children = [c for c in root.iterdir() if not c.name.startswith(".")]
        if len(children) == 1 and children[0].is_dir() and any(c.is_dir() for c in children[0].iterdir()):
            root = children[0]
        else:
            return root


def resolve_image_folder(
    path: str,
    split: Optional[str],
    cache_dir: str,
    default_splits: tuple[str, ...] = ("train",),
    option: str = "data.path",
) -> Path:
    """The ImageFolder root that ``path`` (a folder or archive) and ``split`` designate.

    With no ``split``, the first of ``default_splits`` present is used, else the folder itself.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise UserError(f"{option}: {path} does not exist")
    if source.is_file():
        if not source.name.endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"{option}: {path} is a file but not a .tar.gz/.tar archive")
        source = extract_archive(source, Path(cache_dir).expanduser(), option)
    root = _descend_single_folders(source)
    if split is not None:
        if not (root / split).is_dir():
            found = sorted(c.name for c in root.iterdir() if c.is_dir())
            raise UserError(f"{option}: no split folder '{split}' in {root} (found: {', '.join(found) or 'nothing'})")
        return root / split
    for name in default_splits:
        if (root / name).is_dir():
            return root / name
    return root


class ImageFolderSource(Dataset):
    """The images of a folder of class folders, listed as torchvision's ImageFolder lists them.

    Classes are the sorted sub-folders (label = position); samples are the files with an
    image extension under each, sorted, links followed. The listing is kept in two numpy
    arrays only: each path relative to ``root`` as fixed-width bytes (decoded on access)
    and the int64 labels. Per-sample Python objects (a list of (path, label) tuples) would
    have their reference counts written by every forked data-loader worker that reads
    them, copying their memory pages into each worker; numpy buffers are only read, so the
    workers of a process share one copy.
    """

    def __init__(self, root: Path, option: str = "data.path") -> None:
        self.root = os.fspath(root)
        try:
            self.classes, class_to_idx = find_classes(self.root)
            samples = make_dataset(self.root, class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as err:
            raise UserError(f"{option}: no images in {root} ({err})") from err
        prefix = len(os.path.join(self.root, ""))
        self._relative_paths = np.array([os.fsencode(path[prefix:]) for path, _ in samples], dtype=np.bytes_)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        """The file of sample ``index``."""
        return os.path.join(self.root, os.fsdecode(self._relative_paths[index]))

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.path(index)), int(self.labels[index])

    @property
    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]


class SyntheticSource(Dataset):
    """Deterministic random RGB images (uint8, C×H×W) for smoke and throughput runs."""

    def __init__(self, size: int, resolution: int, num_classes: int = 10) -> None:
        self.size, self.resolution, self.num_classes = size, resolution, num_classes
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(int(index))  # numpy integers index too (e.g. a Subset's rows)
        image = torch.randint(0, 256, (3, self.resolution, self.resolution), dtype=torch.uint8, generator=gen)
        return image, index % self.num_classes

    @property
    def paths(self) -> list[str]:
        return [f"synthetic/{i}" for i in range(self.size)]


def _cifar10(cache_dir: str, train: bool, option: str) -> Dataset:
    root = Path(cache_dir).expanduser() / "cifar10"
    try:
        return datasets.CIFAR10(str(root), train=train)
    except RuntimeError:  # not downloaded yet (or damaged): fetched below, one process at a time
        pass
    try:
        with cache_lock(root, f"download of cifar10 into {root}"):
            return datasets.CIFAR10(str(root), train=train, download=True)
    except (OSError, RuntimeError, tarfile.TarError) as err:  # URLError offline, RuntimeError on a bad checksum
        reason = " ".join(str(err).split())
        raise UserError(
            f"{option}: cifar10 could not be downloaded into {root} ({reason}); without network, point {option} "
            "at a local copy: an ImageFolder folder or a .tar.gz of one (e.g. the CIFAR-10 JPEG archive), and every "
            "other option set to cifar10 (e.g. monitor.train_path) likewise"
        ) from err


def build_source(
    path: Optional[str],
    split: Optional[str],
    cache_dir: str,
    max_images: Optional[int] = None,
    seed: int = 0,
    synthetic_size: int = 2048,
    synthetic_resolution: int = 256,
    default_splits: tuple[str, ...] = ("train",),
    option: str = "data.path",
) -> Any:
    """The labelled dataset ``path`` names, optionally cut to a fixed random subset.

    ``default_splits`` are tried in order when no ``split`` is given (("val", "test") for
    evaluation sets). ``option`` is the setting that gave ``path``, named by every error.
    A subset's indices are a numpy array, for the reason :class:`ImageFolderSource` gives.
    """
    if not path:
        raise UserError(f"{option} is required (an ImageFolder directory, a .tar.gz of one, cifar10 or synthetic)")
    if path == "synthetic":
        source: Any = SyntheticSource(synthetic_size, synthetic_resolution)
    elif path == "cifar10":
        source = _cifar10(cache_dir, (split or default_splits[0]) == "train", option)
    else:
        source = ImageFolderSource(resolve_image_folder(path, split, cache_dir, default_splits, option), option)
    if max_images is not None and max_images < len(source):
        keep = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:max_images]
        source = Subset(source, np.sort(keep.numpy()))
    return source


def describe(source: Any) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of a source, without decoding any image."""
    if isinstance(source, Subset):
        paths, labels, classes = describe(source.dataset)
        return [paths[i] for i in source.indices], [labels[i] for i in source.indices], classes
    if isinstance(source, ImageFolderSource):
        return source.paths, source.labels.tolist(), list(source.classes)
    if isinstance(source, SyntheticSource):
        return source.paths, [i % source.num_classes for i in range(len(source))], source.classes
    if isinstance(source, datasets.CIFAR10):
        split = "train" if source.train else "test"
        return [f"cifar10/{split}/{i}" for i in range(len(source))], list(source.targets), list(source.classes)
    raise TypeError(f"unknown source type {type(source).__name__}")
