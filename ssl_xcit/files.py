"""Files that are never half-written: every writer of the project goes through :func:`atomic_write`.

A temporary file unique to the writing process is filled beside the target, flushed to
disk, then renamed over it. A reader (or a resumed job) sees either the previous complete
file or the new one, even if the process is killed mid-write, and two processes writing
the same target never share a temporary name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch


def _umask() -> int:
    """The process's umask, read where Linux shows it (/proc/self/status) rather than by setting
    it, which would race with files other threads create meanwhile; set and restored elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a fresh temporary file beside ``path``, fsync, rename over ``path``.
    The file gets the permissions ``open`` would give it (0666 less the umask), not the
    owner-only ones of a temporary file, so a shared run folder stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, payload: Any) -> Path:
    """Indented, key-sorted JSON with a final newline."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))
