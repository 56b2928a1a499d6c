"""Images and masks named by stem, split lists and class names: the layout of dense evaluation sets.

::

    images/<stem>.jpg        masks/<stem>.png       (an 8- or 16-bit single-channel PNG of class
    splits/train.txt                                 indices, the image's size; same stem)
    splits/val.txt           (optional)
    splits/test.txt          classes.txt            ("<index> <name>" per line, or "<name>")

A split list holds one stem per line. Without ``val.txt`` the validation images are carved
(seeded) from the training list; without split lists at all, test and validation are
carved from every image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from ssl_xcit.errors import UserError


def image_stems(folder: Path, option: str = "--images") -> dict[str, Path]:
    """Stem → file of every image directly in ``folder``.

    Raises:
        UserError: the folder is missing, holds no image, or two images share a stem.
    """
    if not folder.is_dir():
        raise UserError(f"{option}: {folder} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMG_EXTENSIONS:
            if path.stem in found:
                raise UserError(f"{option}: {found[path.stem].name} and {path.name} share the stem {path.stem}")
            found[path.stem] = path
    if not found:
        raise UserError(f"{option}: no image in {folder}")
    return found


def read_stems(path: Path, option: str) -> list[str]:
    """The stems listed one per line in ``path`` (blank lines skipped, extensions dropped)."""
    if not path.is_file():
        raise UserError(f"{option}: {path} does not exist")
    return [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]


def select(files: dict[str, Path], stems: Sequence[str], option: str) -> list[str]:
    """The files of ``stems``, in their order; a stem without a file is refused."""
    missing = [s for s in stems if s not in files]
    if missing:
        raise UserError(f"{option}: {len(missing)} listed stems have no file (first: {missing[0]})")
    return [str(files[s]) for s in stems]


def _carve(stems: list[str], fraction: float, rng: np.random.Generator, what: str) -> tuple[list[str], list[str]]:
    """(rest, carved): a seeded ``fraction`` of ``stems`` (at least one, never all) taken out."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--{what}-fraction: a share in (0, 1), got {fraction}")
    n = min(max(1, round(fraction * len(stems))), len(stems) - 1)
    if n < 1:
        raise UserError(f"--{what}-fraction: {len(stems)} images are too few to carve a {what} split from")
    order = rng.permutation(len(stems))
    carved = set(order[:n].tolist())
    return [s for i, s in enumerate(stems) if i not in carved], [s for i, s in enumerate(stems) if i in carved]


def split_stems(all_stems: Sequence[str], splits: Optional[Path], val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list[str]]:
    """{"train", "val", "test"} → stems, from ``splits/{train,val,test}.txt`` or carved (seeded).

    Raises:
        UserError: a list is missing, or the splits overlap.
    """
    rng = np.random.default_rng(seed)
    if splits is None:
        rest, test = _carve(sorted(all_stems), test_fraction, rng, "test")
        train, val = _carve(rest, val_fraction, rng, "val")
    else:
        train, test = read_stems(splits / "train.txt", "--splits"), read_stems(splits / "test.txt", "--splits")
        if (splits / "val.txt").is_file():
            val = read_stems(splits / "val.txt", "--splits")
        else:
            train, val = _carve(train, val_fraction, rng, "val")
    parts = {"train": train, "val": val, "test": test}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = set(parts[a]) & set(parts[b])
        if shared:
            raise UserError(f"--splits: {len(shared)} images are in both {a} and {b} (e.g. {sorted(shared)[0]})")
    return parts


def read_class_names(path: Path, ignore_label: Optional[int]) -> list[str]:
    """Names of classes 0 .. K-1 from ``path`` ("<index> <name>" or "<name>" per line); the
    line of ``ignore_label``, if listed, is not a class.

    Raises:
        UserError: a missing file, or indices that are not 0 .. K-1.
    """
    if not path.is_file():
        raise UserError(f"--classes: {path} does not exist")
    names: dict[int, str] = {}
    for number, line in enumerate(l.strip() for l in path.read_text().splitlines() if l.strip()):
        first, _, rest = line.partition(" ")
        index, name = (int(first), rest.strip()) if first.isdigit() and rest.strip() else (number, line)
        if index != ignore_label:
            names[index] = name
    if sorted(names) != list(range(len(names))):
        raise UserError(f"--classes: {path} lists indices {sorted(names)}, not 0 .. K-1 (the ignore label "
                        f"{ignore_label} aside)")
    return [names[i] for i in range(len(names))]


def read_mask(path: str, num_classes: int, ignore_label: Optional[int]) -> np.ndarray:
    """(H, W) class indices of a mask PNG, checked to be in [0, K) or the ignore label.

    Raises:
        UserError: not a single-channel image, or a value that is no class.
    """
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise UserError(f"--masks: {path} is a {image.mode} image; masks are single-channel class indices")
        mask = np.asarray(image)
    bad = (mask >= num_classes) & (mask != (-1 if ignore_label is None else ignore_label))
    if bad.any():
        raise UserError(f"--masks: {path} holds the value {int(mask[bad][0])}, neither a class of 0 .. "
                        f"{num_classes - 1} nor --ignore-label {ignore_label}")
    return mask
