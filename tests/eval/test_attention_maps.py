"""Class-attention maps and patch PCA of XCiT, against computations written out by hand."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_xcit.backbones import build_backbone
from ssl_xcit.eval.attention_maps import class_attention_maps, class_token_attention, last_class_attention, mass_mask
from ssl_xcit.eval.patch_pca import foreground, last_block_patch_features, pca_colours


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(arch, 0.0, depth=2).eval()


@pytest.mark.parametrize("arch,patch", [("xcit_nano_12_p8_224", 8), ("xcit_nano_12_p16_224", 16)])
@pytest.mark.parametrize("height,width", [(2, 2), (3, 5), (6, 4)])  # in patches
def test_maps_cover_the_patch_grid_and_each_head_sums_to_one(arch, patch, height, width):
    model = tiny(arch)
    maps = class_attention_maps(model, torch.randn(2, 3, height * patch, width * patch))
    assert maps.shape == (2, model.cls_attn_blocks[-1].attn.num_heads, height, width)
    assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2, maps.shape[1]), atol=1e-5)
    assert (maps >= 0).all()


def test_a_size_off_the_patch_grid_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        class_attention_maps(tiny("xcit_nano_12_p8_224"), torch.randn(1, 3, 30, 32))


def test_the_row_equals_a_hand_computed_softmax_and_reproduces_the_blocks_output():
    model = tiny("xcit_nano_12_p8_224")
    attn = last_class_attention(model)
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("tokens", args[0]))
    attn.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 24))
        row = class_token_attention(attn, seen["tokens"])  # (1, h, 1 + N)
    tokens, heads = seen["tokens"][0], attn.num_heads
    d = tokens.shape[-1] // heads
    wq, wk, wv = attn.q.weight, attn.k.weight, attn.v.weight
    with torch.no_grad():
        for h in range(heads):  # one head, one token at a time
            q = wq[h * d:(h + 1) * d] @ tokens[0]
            logits = [float(q @ (wk[h * d:(h + 1) * d] @ t)) / math.sqrt(d) for t in tokens]
            expect = np.exp(np.array(logits) - max(logits))
            assert np.allclose(row[0, h].numpy(), expect / expect.sum(), atol=1e-5)
        # the block's own output is the projection of the attention-weighted values
        values = (tokens @ wv.T).reshape(len(tokens), heads, d)  # (1+N, h, d)
        mixed = torch.einsum("hn,nhd->hd", row[0], values).reshape(1, 1, -1)
        assert torch.allclose(attn.proj(mixed), seen["out"], atol=1e-5)


@pytest.mark.parametrize("keep", [0.1, 0.6, 0.9, 1.0])
def test_the_mask_holds_the_mass_with_the_fewest_patches(keep):
    maps = torch.rand(3, 5, 7) ** 4
    maps /= maps.sum(dim=(-2, -1), keepdim=True)
    mask = mass_mask(maps, keep)
    for m, k in zip(maps, mask):
        kept = m[k]
        assert kept.sum() >= keep - 1e-6
        # without its weakest patch the mask would hold less than asked, and nothing outside beats it
        assert kept.sum() - kept.min() < keep or math.isclose(kept.sum() - kept.min(), keep, abs_tol=1e-6)
        assert (~k).sum() == 0 or m[~k].max() <= kept.min()


def test_patch_features_come_from_the_last_block_on_the_patch_grid():
    model = tiny("xcit_nano_12_p8_224")
    features = last_block_patch_features(model, torch.randn(2, 3, 40, 24))
    assert features.shape == (2, 5, 3, 128)


def test_foreground_is_the_side_away_from_the_border_and_colours_are_rgb():
    features = torch.randn(2, 6, 6, 16) * 0.1
    features[:, 2:4, 2:4] += torch.linspace(1, 2, 16)  # an 'object' in the middle of each image
    mask = foreground(features)
    assert mask[:, 2:4, 2:4].all() and not mask[:, 0].any() and not mask[:, :, 0].any()
    colours = pca_colours(features)
    assert colours.shape == (2, 6, 6, 3) and colours.min() >= 0 and colours.max() <= 1
    assert (colours[~mask] == 0).all()


def test_attention_command_writes_pictures_that_decode(tiny_checkpoint, cifar_slice, tmp_path):
    from ssl_xcit.cli import main

    images = sorted((cifar_slice / "test" / "cat").iterdir())[:2]
    out = tmp_path / "pictures"
    assert main(["attention", "--checkpoint", str(tiny_checkpoint), "--images", *map(str, images),
                 "--out", str(out), "--size", "64", "--pca"]) == 0
    for image in images:
        with Image.open(out / f"{image.stem}_attention.png") as picture:
            assert picture.format == "PNG" and picture.width > picture.height > 100
        with Image.open(out / f"{image.stem}_pca.png") as picture:
            assert picture.size == (512, 256) and picture.mode == "RGB"  # the image beside its colours, x4


def test_output_names_stay_unique_and_readable():
    from pathlib import Path

    from ssl_xcit.eval.visualise import output_names

    assert output_names([Path("a/cat.jpg"), Path("a/dog.jpg")]) == ["cat", "dog"]
    assert output_names([Path("cat/0007.jpg"), Path("dog/0007.jpg")]) == ["cat_0007", "dog_0007"]
    assert output_names([Path("x/cat/1.jpg"), Path("y/cat/1.jpg"), Path("z/2.jpg")]) == ["000_cat_1", "001_cat_1", "2"]


def test_attention_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    from ssl_xcit.cli import main

    assert main(["attention", "--checkpoint", str(tiny_checkpoint), "--images", str(tmp_path / "none.jpg"),
                 "--out", str(tmp_path)]) == 2
    assert "--images: " in capsys.readouterr().err
