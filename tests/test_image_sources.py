
import pytest
import torch

from ssl_xcit.errors import UserError
from ssl_xcit.image_sources import build_source, extract_archive, resolve_image_folder


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
    assert len(a) == 50 and a.indices == b.indices


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
        build_source(str(path), None, str(tmp_path / "cache"))
    assert str(path) in str(err.value)


def test_missing_split_lists_what_exists(cifar_slice):
    with pytest.raises(UserError, match=r"data.split: no folder 'val'.*test, train"):
        build_source(str(cifar_slice), "val", "/unused")


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
