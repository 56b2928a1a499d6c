
"""Image sources: splits, archives extracted once per cache even by processes racing for it,
CIFAR-10 offline, and a listing held in numpy arrays that matches torchvision's ImageFolder."""

import errno
import gc
import io
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tarfile
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from ssl_xcit.errors import UserError
from ssl_xcit.image_sources import build_source, extract_archive, resolve_image_folder

FORK = multiprocessing.get_context("fork")


def test_image_folder_with_train_split_is_found(cifar_slice):
    source = build_source(str(cifar_slice), None, "/unused")
    assert len(source) == 300 and len(source.classes) == 10
    image, label = source[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0


def test_explicit_split(cifar_slice):
    assert len(build_source(str(cifar_slice), "test", "/unused")) == 100


def test_archive_is_extracted_once(cifar_slice_archive, tmp_path, monkeypatch):
    first = extract_archive(cifar_slice_archive, tmp_path)
    monkeypatch.setattr("tarfile.open", lambda *a, **k: pytest.fail("extracted a second time"))
    assert extract_archive(cifar_slice_archive, tmp_path) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".extract-")]
    root = resolve_image_folder(str(cifar_slice_archive), "train", str(tmp_path))
    assert root.name == "train" and root.parent.name == "CIFAR-10-images"


def test_max_images_is_a_fixed_subset(cifar_slice):
    a = build_source(str(cifar_slice), "train", "/unused", max_images=50, seed=1)
    b = build_source(str(cifar_slice), "train", "/unused", max_images=50, seed=1)
    assert len(a) == 50 and np.array_equal(a.indices, b.indices)


def test_synthetic_is_deterministic():
    source = build_source("synthetic", None, "/unused", synthetic_size=4, synthetic_resolution=16)
    assert torch.equal(source[2][0], source[2][0]) and source[2][0].shape == (3, 16, 16)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no images"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "not a .tar.gz"),
    ],
)
def test_bad_paths_name_the_culprit(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(UserError, match=expected) as err:
        build_source(str(path), None, str(tmp_path / "cache"), option="--train-data")
    assert str(path) in str(err.value) and str(err.value).startswith("--train-data: ")


def test_missing_split_lists_what_exists(cifar_slice):
    with pytest.raises(UserError, match=r"^monitor.val_path: no split folder 'val'.*test, train"):
        build_source(str(cifar_slice), "val", "/unused", option="monitor.val_path")


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "data" / "cls" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg")
    source = build_source(str(tmp_path / "data"), None, "/unused")
    with pytest.raises(UserError, match="unreadable image .*broken.jpg"):
        source[0]


def test_missing_data_path_is_named():
    with pytest.raises(UserError, match="data.path is required"):
        build_source(None, None, "/unused")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class _Stderr(io.StringIO):
    """A child's stderr that also raises ``event`` once the child says it waits for a lock."""

    def __init__(self, event) -> None:
        super().__init__()
        self.event = event

    def write(self, text: str) -> int:
        if "waiting for another process" in text:
            self.event.set()
        return super().write(text)


def _extract_after_barrier(archive: Path, cache: Path, barrier, someone_waits, results) -> None:
    """A child process: extract ``archive`` the moment the other child does. Its extraction
    stalls until a process says it waits on the lock (10 s at most), so the two overlap."""
    real = tarfile.TarFile.extractall

    def stalled(self, *args, **kwargs):
        someone_waits.wait(timeout=10)
        results.put(("extracted", os.getpid()))
        return real(self, *args, **kwargs)

    tarfile.TarFile.extractall = stalled
    sys.stderr = _Stderr(someone_waits)
    barrier.wait()
    try:
        target = extract_archive(archive, cache)
        results.put(("done", str(target), _files(target), sys.stderr.getvalue()))
    except BaseException as err:
        results.put(("failed", repr(err), [], sys.stderr.getvalue()))


def test_processes_racing_for_an_archive_extract_it_once(cifar_slice, cifar_slice_archive, tmp_path):
    barrier, someone_waits, results = FORK.Barrier(2), FORK.Event(), FORK.Queue()
    children = [FORK.Process(target=_extract_after_barrier,
                             args=(cifar_slice_archive, tmp_path, barrier, someone_waits, results)) for _ in range(2)]
    for child in children:
        child.start()
    reports = [results.get(timeout=60)]
    while sum(r[0] != "extracted" for r in reports) < 2:
        reports.append(results.get(timeout=60))
    for child in children:
        child.join(timeout=60)
    finished = [r for r in reports if r[0] != "extracted"]
    assert [r[0] for r in finished] == ["done", "done"], finished
    assert finished[0][1] == finished[1][1]
    assert finished[0][2] == finished[1][2] == ["CIFAR-10-images/" + f for f in _files(cifar_slice)]
    assert len([r for r in reports if r[0] == "extracted"]) == 1
    assert sorted(r[3].count("waiting for another process's extraction") for r in finished) == [0, 1]
    target = Path(finished[0][1]).name
    assert sorted(p.name for p in tmp_path.iterdir()) == [target, target + ".lock"]


def test_a_target_made_meanwhile_by_another_node_is_success(cifar_slice, cifar_slice_archive, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    name = extract_archive(cifar_slice_archive, tmp_path / "elsewhere").name  # the folder's name in any cache
    real = tarfile.TarFile.extractall

    def racing(self, path, **kwargs):  # a node this lock does not reach renames its copy into place first
        real(self, path, **kwargs)
        real(self, tmp_path / "other-node", **kwargs)
        os.replace(tmp_path / "other-node", cache / name)

    monkeypatch.setattr(tarfile.TarFile, "extractall", racing)
    assert extract_archive(cifar_slice_archive, cache) == cache / name
    assert _files(cache / name) == ["CIFAR-10-images/" + f for f in _files(cifar_slice)]
    assert sorted(p.name for p in cache.iterdir()) == [name, name + ".lock"]


def test_a_failed_extraction_leaves_no_target(cifar_slice_archive, tmp_path, monkeypatch):
    real = tarfile.TarFile.extractall

    def disk_full(self, path, **kwargs):
        real(self, path, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", disk_full)
    with pytest.raises(UserError, match=r"^monitor.train_path: cannot extract .*No space left"):
        extract_archive(cifar_slice_archive, tmp_path, option="monitor.train_path")
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("*.lock")]


def _extract_then_die(archive: Path, cache: Path) -> None:
    def killed(self, path, **kwargs):
        self.extract(self.getmembers()[5], path, filter="data")
        os.kill(os.getpid(), signal.SIGKILL)

    tarfile.TarFile.extractall = killed
    extract_archive(archive, cache)


def test_a_killed_extraction_leaves_no_target_and_frees_the_lock(cifar_slice, cifar_slice_archive, tmp_path, capsys):
    child = FORK.Process(target=_extract_then_die, args=(cifar_slice_archive, tmp_path))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock")]
    target = extract_archive(cifar_slice_archive, tmp_path)
    assert _files(target) == ["CIFAR-10-images/" + f for f in _files(cifar_slice)]
    assert "waiting" not in capsys.readouterr().err


def test_a_cache_without_file_locks_still_extracts(cifar_slice, cifar_slice_archive, tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_locks)
    target = extract_archive(cifar_slice_archive, tmp_path)
    assert _files(target) == ["CIFAR-10-images/" + f for f in _files(cifar_slice)]
    assert "cannot be locked (" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["data.path", "monitor.val_path", "--test-data"])
def test_offline_cifar10_says_what_to_do_in_one_line(tmp_path, monkeypatch, option):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as err:
        build_source("cifar10", None, str(tmp_path), option=option)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{option}: cifar10 could not be downloaded")
    assert "name resolution" in message
    assert f"point {option} at a local copy: an ImageFolder folder or a .tar.gz of one" in message
    assert "every other option set to cifar10" in message  # the monitor's path needs the same override


@pytest.fixture()
def awkward_tree(cifar_slice, tmp_path) -> Path:
    """Two classes of real JPEGs plus what a listing can get wrong: a nested folder, a
    non-image file, upper-case and non-ASCII names, a name that is not valid UTF-8."""
    root = tmp_path / "tree"
    for name in ("cat", "dog"):
        shutil.copytree(cifar_slice / "train" / name, root / name)
    jpg = next((root / "cat").iterdir())
    (root / "cat" / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(jpg, root / "cat" / "nested" / "deeper" / "x.jpg")
    shutil.copy(jpg, root / "dog" / "été 1.JPEG")
    shutil.copy(jpg, os.path.join(os.fsencode(root / "dog"), b"\xff\xfe.png"))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_listing_is_torchvisions(awkward_tree):
    source = build_source(str(awkward_tree), None, "/unused")
    reference = ImageFolder(str(awkward_tree))
    assert source.classes == reference.classes
    assert source.paths == [path for path, _ in reference.samples]
    assert source.labels.tolist() == reference.targets
    image, label = source[len(source) - 1]
    assert label == reference.targets[-1] and image.mode == "RGB" and image.size == reference[len(source) - 1][0].size


def _objects_reached(root: object) -> int:
    """The Python objects ``root`` holds, directly or not (classes, modules and functions left out)."""
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return len(seen)


def test_listing_holds_no_object_per_sample(cifar_slice):
    """As many Python objects for 100 images as for 300, and for subsets of 20 as of 50: the
    per-sample data sits in numpy arrays of bytes and integers (no object arrays)."""
    train, test = (build_source(str(cifar_slice), split, "/unused") for split in ("train", "test"))
    assert (len(train), len(test)) == (300, 100)
    assert _objects_reached(train) == _objects_reached(test)
    small, large = (build_source(str(cifar_slice), "train", "/unused", max_images=n) for n in (20, 50))
    assert _objects_reached(small) == _objects_reached(large)
    arrays = [value for value in vars(train).values() if isinstance(value, np.ndarray)] + [large.indices]
    assert len(arrays) == 3 and {a.dtype.kind for a in arrays} == {"S", "i"}
