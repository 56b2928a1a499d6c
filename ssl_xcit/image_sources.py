"""Image sources: an ImageFolder directory, a .tar.gz of one, CIFAR-10, or synthetic images.

Every source is a map-style dataset of ``(image, label)``; pretraining ignores labels,
evaluation uses them. Archives are extracted once into the cache, atomically (into a
temporary folder renamed when complete), so an interrupted extraction never leaves a
half-filled dataset behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets

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


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract ``archive`` once into ``cache_dir`` and return the extracted folder.

    The folder is keyed by the archive's name, size and mtime, so a changed archive is
    extracted again and an unchanged one never twice.
    """
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / f"{archive.name.split('.')[0]}-{key}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        os.replace(staging, target)
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"data.path: cannot extract {archive}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    path: str, split: Optional[str], cache_dir: str, default_splits: tuple[str, ...] = ("train",)
) -> Path:
    """The ImageFolder root that ``path`` (a folder or archive) and ``split`` designate.

    With no ``split``, the first of ``default_splits`` present is used, else the folder itself.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise UserError(f"data.path: {path} does not exist")
    if source.is_file():
        if not source.name.endswith(ARCHIVE_SUFFIXES):
            raise UserError(f"data.path: {path} is a file but not a .tar.gz/.tar archive")
        source = extract_archive(source, Path(cache_dir).expanduser())
    root = _descend_single_folders(source)
    if split is not None:
        if not (root / split).is_dir():
            found = sorted(c.name for c in root.iterdir() if c.is_dir())
            raise UserError(f"data.split: no folder '{split}' in {root} (found: {', '.join(found) or 'nothing'})")
        return root / split
    for name in default_splits:
        if (root / name).is_dir():
            return root / name
    return root


class ImageFolderSource(datasets.ImageFolder):
    """torchvision's ImageFolder whose errors name the folder or image at fault."""

    def __init__(self, root: Path) -> None:
        try:
            super().__init__(str(root), loader=load_rgb)
        except FileNotFoundError as err:
            raise UserError(f"data.path: no images in {root} ({err})") from err

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]


class SyntheticSource(Dataset):
    """Deterministic random RGB images (uint8, C×H×W) for smoke and throughput runs."""

    def __init__(self, size: int, resolution: int, num_classes: int = 10) -> None:
        self.size, self.resolution, self.num_classes = size, resolution, num_classes
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, self.resolution, self.resolution), dtype=torch.uint8, generator=gen)
        return image, index % self.num_classes

    @property
    def paths(self) -> list[str]:
        return [f"synthetic/{i}" for i in range(self.size)]


def _cifar10(cache_dir: str, train: bool) -> Dataset:
    root = Path(cache_dir).expanduser() / "cifar10"
    try:
        return datasets.CIFAR10(str(root), train=train, download=True)
    except Exception as err:  # torchvision raises URLError, RuntimeError ... offline
        raise UserError(f"data.path: cifar10 could not be downloaded into {root}: {err}") from err


def build_source(
    path: Optional[str],
    split: Optional[str],
    cache_dir: str,
    max_images: Optional[int] = None,
    seed: int = 0,
    synthetic_size: int = 2048,
    synthetic_resolution: int = 256,
    default_splits: tuple[str, ...] = ("train",),
) -> Any:
    """The labelled dataset ``path`` names, optionally cut to a fixed random subset.

    ``default_splits`` are tried in order when no ``split`` is given (("val", "test") for
    evaluation sets).
    """
    if not path:
        raise UserError("data.path is required (an ImageFolder directory, a .tar.gz of one, cifar10 or synthetic)")
    if path == "synthetic":
        source: Any = SyntheticSource(synthetic_size, synthetic_resolution)
    elif path == "cifar10":
        source = _cifar10(cache_dir, train=(split or default_splits[0]) == "train")
    else:
        source = ImageFolderSource(resolve_image_folder(path, split, cache_dir, default_splits))
    if max_images is not None and max_images < len(source):
        keep = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:max_images]
        source = Subset(source, sorted(keep.tolist()))
    return source


def describe(source: Any) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of a source, without decoding any image."""
    if isinstance(source, Subset):
        paths, labels, classes = describe(source.dataset)
        return [paths[i] for i in source.indices], [labels[i] for i in source.indices], classes
    if isinstance(source, datasets.ImageFolder):
        return [p for p, _ in source.samples], list(source.targets), list(source.classes)
    if isinstance(source, SyntheticSource):
        return source.paths, [i % source.num_classes for i in range(len(source))], source.classes
    if isinstance(source, datasets.CIFAR10):
        split = "train" if source.train else "test"
        return [f"cifar10/{split}/{i}" for i in range(len(source))], list(source.targets), list(source.classes)
    raise TypeError(f"unknown source type {type(source).__name__}")
