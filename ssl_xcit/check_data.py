"""``ssl-xcit check-data PATH``: find the images that cannot be decoded, before a run meets them.

Every image file under the dataset (a folder or a .tar.gz of one; all splits unless
``--split`` picks one) is decoded in full, as training and export decode it, in parallel.
The unreadable ones are printed with the reason, then their count; the exit code is 1
when there is any, so a job script can refuse to start.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Optional, Sequence

from torchvision.datasets.folder import IMG_EXTENSIONS

from ssl_xcit.errors import UserError
from ssl_xcit.image_sources import UnreadableImage, load_rgb, resolve_image_folder
from ssl_xcit.options import parse_options


@dataclass
class CheckDataOptions:
    """Which images to check and how many processes decode them."""

    path: Optional[str] = None
    """An ImageFolder directory or a .tar.gz of one (also given as the first argument)."""
    split: Optional[str] = None
    """Only this sub-folder (e.g. train); default: every image under the dataset."""
    workers: int = os.cpu_count() or 1
    """Decoding processes."""
    cache_dir: str = "~/.cache/ssl-xcit"
    """Where archives are extracted."""


def image_files(root: Path) -> list[Path]:
    """Every file under ``root`` with an image extension ImageFolder reads, in sorted order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be decoded, or None when it can."""
    try:
        load_rgb(str(path))
    except UnreadableImage as err:
        return str(err)
    return None


def unreadable(files: Sequence[Path], workers: int) -> list[str]:
    """The problems of ``files`` (one line each), decoding in ``workers`` processes."""
    if workers <= 1:
        found = map(problem, files)
        return [p for p in found if p]
    with Pool(workers) as pool:
        return [p for p in pool.imap(problem, files, chunksize=64) if p]


def check_data_command(argv: Sequence[str]) -> int:
    argv = ["--path", *argv] if argv and not argv[0].startswith("-") else list(argv)
    opts = parse_options(CheckDataOptions, argv, "ssl-xcit check-data", __doc__.splitlines()[0]).options
    if not opts.path:
        raise UserError("check-data needs the dataset: ssl-xcit check-data PATH")
    root = resolve_image_folder(opts.path, opts.split, opts.cache_dir, default_splits=(), option="--path")
    files = image_files(root)
    if not files:
        raise UserError(f"--path: no image files under {root}")
    problems = unreadable(files, opts.workers)
    for line in problems:
        print(line)
    print(f"{len(files)} images checked under {root}: {len(problems)} unreadable",
          file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0
