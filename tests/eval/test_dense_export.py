"""Dense export: shapes at two sizes, values against hooked tokens, resume, sliding windows, refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_xcit.cli import main
from ssl_xcit.errors import UserError
from ssl_xcit.eval.dense_export import export_dense, input_size, patch_features, sliding_patch_features
from ssl_xcit.eval.dense_store import DenseStoreWriter, load_dense_store
from ssl_xcit.eval.feature_store import FeatureError
from ssl_xcit.eval.visualise import to_tensor
from ssl_xcit.weights import load_backbone

TINY = ["--checkpoint", "random", "--arch", "xcit_nano_12_p8_224", "--backbone-kwargs", "{depth: 2}",
        "--num-workers", "0", "--progress", "false"]


def tiny():
    return load_backbone("random", arch="xcit_nano_12_p8_224", random_overrides={"depth": 2})


@pytest.mark.parametrize("height,width", [(48, 64), (64, 96)])
def test_shapes_at_two_sizes(camvid_slice, tmp_path, height, width):
    assert main(["dense-export", *TINY, "--images", str(camvid_slice / "images"), "--height", str(height),
                 "--width", str(width), "--out", str(tmp_path / "store")]) == 0
    store = load_dense_store(tmp_path / "store")
    assert store.features.shape == (12, height // 8, width // 8, 128) and store.features.dtype == np.float16
    assert store.meta["grid"] == [height // 8, width // 8] and store.meta["size"] == [height, width]
    assert [p.rsplit("/", 1)[1] for p in store.paths] == sorted(p.name for p in (camvid_slice / "images").iterdir())
    assert np.isfinite(np.asarray(store.features, dtype=np.float32)).all()


def last_block_tokens(model, image: torch.Tensor) -> torch.Tensor:
    """(h, w, C): what the last XCA block outputs for ``image`` (a forward hook), through the final norm."""
    caught = []
    handle = model.blocks[-1].register_forward_hook(lambda module, args, out: caught.append(out))
    with torch.no_grad():
        model(image)
        handle.remove()
        h, w = image.shape[-2] // 8, image.shape[-1] // 8
        return model.norm(caught[0])[0].reshape(h, w, -1)


def test_native_size_features_are_the_last_blocks_normed_tokens(camvid_slice, tmp_path):
    (tmp_path / "two.txt").write_text("\n".join(sorted(p.stem for p in (camvid_slice / "images").iterdir())[:2]))
    assert main(["dense-export", *TINY, "--images", str(camvid_slice / "images"), "--split-list",
                 str(tmp_path / "two.txt"), "--out", str(tmp_path / "store")]) == 0
    store = load_dense_store(tmp_path / "store")
    assert store.features.shape == (2, 45, 60, 128)  # CamVid's 480x360 is on the grid of patch 8: no resize
    loaded = tiny()
    for row, path in enumerate(store.paths):
        expected = last_block_tokens(loaded.model, to_tensor(Image.open(path).convert("RGB"), loaded))
        assert np.allclose(store.features[row], expected.numpy(), atol=2e-2, rtol=1e-2)  # float16 storage


class Interrupt(Exception):
    pass


def test_resumed_export_equals_uninterrupted(camvid_slice, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in (camvid_slice / "images").iterdir())
    kwargs = dict(size=(48, 64), batch_size=4, num_workers=0, progress=False)
    export_dense(tiny(), paths, tmp_path / "whole", **kwargs)
    real, calls = DenseStoreWriter.write_grids, {"n": 0}

    def write_then_die(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        real(self, *args, **kw)

    monkeypatch.setattr(DenseStoreWriter, "write_grids", write_then_die)
    with pytest.raises(Interrupt):
        export_dense(tiny(), paths, tmp_path / "resumed", **kwargs)
    with pytest.raises(FeatureError, match="incomplete"):
        load_dense_store(tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "progress.json").read_text())["rows_done"] == 4
    monkeypatch.setattr(DenseStoreWriter, "write_grids", real)
    export_dense(tiny(), paths, tmp_path / "resumed", **kwargs)
    for name in ("features.npy", "labels.npy", "paths.txt", "meta.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_sliding_windows_average_the_windows_over_each_patch():
    model = tiny().model
    torch.manual_seed(0)
    image = torch.randn(1, 3, 64, 96)
    slid = sliding_patch_features(model, image, window=64, stride=48)  # windows at x = 0 and 32 (flush right)
    left, right = patch_features(model, image[..., :64]), patch_features(model, image[..., 32:])
    assert slid.shape == (1, 8, 12, 128)
    assert torch.allclose(slid[0, :, :4], left[0, :, :4], atol=1e-5)  # x 0-31: the left window alone
    assert torch.allclose(slid[0, :, 4:8], (left[0, :, 4:] + right[0, :, :4]) / 2, atol=1e-5)  # both
    assert torch.allclose(slid[0, :, 8:], right[0, :, 4:], atol=1e-5)
    whole = sliding_patch_features(model, image, window=128, stride=64)  # a window larger than the image
    assert torch.allclose(whole, patch_features(model, image), atol=1e-5)


def test_images_of_several_sizes_need_a_size(horse_slice, tmp_path, capsys):
    args = ["dense-export", *TINY, "--images", str(horse_slice / "images"), "--out", str(tmp_path / "s")]
    assert main(args) == 2
    assert "images differ in size" in capsys.readouterr().err
    assert main(args + ["--height", "40", "--width", "48"]) == 0
    assert load_dense_store(tmp_path / "s").features.shape == (4, 5, 6, 128)


@pytest.mark.parametrize("height,width,window,culprit", [(50, 64, None, "--height 50 --width 64"),
                                                         (48, None, None, "--height and --width go together"),
                                                         (48, 64, 20, "--window 20")])
def test_sizes_off_the_patch_grid_are_refused(camvid_slice, height, width, window, culprit):
    paths = [str(next((camvid_slice / "images").iterdir()))]
    with pytest.raises(UserError, match=culprit):
        input_size(paths, 8, height, width, window)
