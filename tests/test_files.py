"""Atomic writes: a whole file or the previous one, with the permissions a plain open() gives."""

import os
import stat

import pytest

from ssl_xcit.files import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask_like_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "f.txt", "old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
