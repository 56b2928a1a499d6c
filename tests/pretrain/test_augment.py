import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as TF

from ssl_xcit.pretrain import augment_ops as ops
from ssl_xcit.pretrain.augment import MultiCropAugmentation, color_on_device
from ssl_xcit.pretrain.augment_params import RATIO, sample_crops
from ssl_xcit.pretrain.config import AugmentConfig

SMALL = dict(global_crops_size=32, local_crops_size=16, local_crops_number=6)
GEOMETRY_ONLY = dict(color_jitter_p=0, grayscale_p=0, blur_p_global1=0, blur_p_global2=0, blur_p_local=0,
                     solarize_p_global2=0)  # crop, resize and flip alone
EVERY_OP = dict(global_crops_size=32, local_crops_size=16, local_crops_number=3, color_jitter_p=0.9, grayscale_p=0.3,
                blur_p_global2=0.5, solarize_p_global2=0.5)
# Tensor methods that copy a value to the host (a host sync when the tensor is on a GPU)
HOST_READS = ("nonzero", "tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")


def _image(size=48, channels=3, seed=0):
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _unnormalise(crop, cfg):
    return crop * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)


def _on_device(aug, samples, device="cpu"):
    batch = default_collate([aug.geometric(image, seed) for image, seed in samples])
    batch = {"crops": [c.to(device) for c in batch["crops"]], "params": batch["params"].to(device)}
    return [c.cpu() for c in color_on_device(batch, aug.cfg)]


# -- outputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["workers", "train"])
def test_crop_counts_sizes_dtype_and_range(path):
    cfg = AugmentConfig(**SMALL)
    aug = MultiCropAugmentation(cfg)
    crops = aug(_image(), 1) if path == "workers" else [c[0] for c in _on_device(aug, [(_image(), 1)])]
    assert len(crops) == aug.n_crops == 8
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    for c in crops:  # normalised from [0, 1]
        pixels = _unnormalise(c, cfg)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_worker_share_of_the_device_path_is_uint8_crops_and_parameter_rows():
    out = MultiCropAugmentation(AugmentConfig(**SMALL)).geometric(_image(), 1)
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    assert all(c.dtype == torch.uint8 for c in out["crops"])
    assert out["params"].shape == (8, ops.TAPS + 13)  # the taps of σ = 2: ±6


def test_workers_ship_uint8_crops_that_normalise_to_the_crops():
    aug = MultiCropAugmentation(AugmentConfig(**SMALL, blur_p_local=1.0))
    shipped, crops = aug.worker_crops(_image(), 2), aug(_image(), 2)
    assert [c.dtype for c in shipped] == [torch.uint8] * 8
    for u8, crop in zip(shipped, crops):  # (x / 255 - mean) / std, written out per channel
        expected = torch.stack([(u8[ch].double() / 255 - aug.cfg.mean[ch]) / aug.cfg.std[ch] for ch in range(3)])
        torch.testing.assert_close(crop.double(), expected, rtol=0, atol=1e-5)


def test_grayscale_input_becomes_rgb():
    crops = MultiCropAugmentation(AugmentConfig(**SMALL))(_image(channels=1), 0)
    assert crops[0].shape[0] == 3


def test_same_seed_same_crops_other_seed_other_crops():
    aug = MultiCropAugmentation(AugmentConfig(**SMALL))
    a, b, c = aug(_image(), 3), aug(_image(), 3), aug(_image(), 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_normalisation_uses_configured_statistics():
    cfg = AugmentConfig(global_crops_size=16, local_crops_size=16, local_crops_number=0, **GEOMETRY_ONLY,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), global_crops_scale=(1.0, 1.0))
    flat = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    for crops in (MultiCropAugmentation(cfg)(flat, 0), [c[0] for c in _on_device(MultiCropAugmentation(cfg), [(flat, 0)])]):
        assert torch.allclose(crops[0], torch.ones_like(crops[0]))


# -- the sampled parameters follow the configured distributions ---------------------------
def _binomial_ok(hits, n, p):
    return abs(hits - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_sampled_parameters_follow_the_dino_distributions():
    cfg = AugmentConfig()
    draws = [sample_crops(cfg, 300, 400, seed) for seed in range(1500)]
    n = len(draws)
    g1, g2, local = [d[0] for d in draws], [d[1] for d in draws], [c for d in draws for c in d[2:]]
    for crops, size, scale in ((g1 + g2, 224, cfg.global_crops_scale), (local, 96, cfg.local_crops_scale)):
        assert all(c.size == size for c in crops)
        area = np.array([c.box[2] * c.box[3] / (300 * 400) for c in crops])
        ratio = np.array([c.box[3] / c.box[2] for c in crops])
        assert area.min() >= scale[0] * 0.97 and area.max() <= scale[1] * 1.03
        assert area.min() < scale[0] + 0.05 and area.max() > scale[1] - 0.05  # the range is covered
        assert ratio.min() >= RATIO[0] * 0.97 and ratio.max() <= RATIO[1] * 1.03
        assert all(0 <= c.box[0] <= 300 - c.box[2] and 0 <= c.box[1] <= 400 - c.box[3] for c in crops)
        assert _binomial_ok(sum(c.flip for c in crops), len(crops), cfg.flip_p)
        assert _binomial_ok(sum(c.jitter for c in crops), len(crops), cfg.color_jitter_p)
        assert _binomial_ok(sum(c.gray for c in crops), len(crops), cfg.grayscale_p)
    for crops, p in ((g1, cfg.blur_p_global1), (g2, cfg.blur_p_global2), (local, cfg.blur_p_local)):
        assert _binomial_ok(sum(c.sigma > 0 for c in crops), len(crops), p)
        sigmas = [c.sigma for c in crops if c.sigma > 0]
        assert min(sigmas) >= cfg.blur_sigma[0] and max(sigmas) <= cfg.blur_sigma[1]
    assert _binomial_ok(sum(c.solarize for c in g2), n, cfg.solarize_p_global2)
    assert not any(c.solarize for c in g1 + local)
    jittered = [c for d in draws for c in d if c.jitter]
    b, k, s, h = (np.array(v) for v in zip(*(c.factors for c in jittered)))
    for values, (lo, hi) in ((b, (0.6, 1.4)), (k, (0.6, 1.4)), (s, (0.8, 1.2)), (h, (-0.1, 0.1))):
        assert values.min() >= lo and values.max() <= hi and values.min() < lo + 0.01 and values.max() > hi - 0.01
    assert all(sorted(c.order) == [0, 1, 2, 3] for c in jittered)
    assert len({c.order for c in jittered}) == 24  # every order occurs
    assert all(c.factors == (1.0, 1.0, 1.0, 0.0) for d in draws for c in d if not c.jitter)


def test_configured_probabilities_are_honoured():
    cfg = AugmentConfig(flip_p=0.0, color_jitter_p=1.0, grayscale_p=1.0, blur_p_global1=0.0, blur_p_local=1.0,
                        solarize_p_global2=1.0, local_crops_number=3, color_jitter=(0.0, 0.5, 0.0, 0.0))
    crops = sample_crops(cfg, 100, 100, 7)
    assert len(crops) == 5 and not any(c.flip for c in crops) and all(c.jitter and c.gray for c in crops)
    assert crops[0].sigma == 0 and all(c.sigma > 0 for c in crops[2:]) and crops[1].solarize
    assert all(c.factors[0] == 1.0 and c.factors[2] == 1.0 and c.factors[3] == 0.0 for c in crops)


# -- each operation against an independent computation ------------------------------------
def _pil(seed=0, size=40):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _planes(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


def test_luma_and_saturation_equal_pil():
    img = _pil()
    assert torch.equal(ops.luma(_planes(img))[0], torch.from_numpy(np.array(img.convert("L"))).float())
    for s in (0.8, 1.13, 1.2):
        expected = _planes(ImageEnhance.Color(img).enhance(s))
        assert torch.equal(ops.saturation(_planes(img), torch.tensor(s)), expected)


def test_brightness_and_contrast_within_one_level_of_pil():
    """PIL's ImageEnhance truncates where ours rounds to nearest: at most one level apart."""
    img, x = _pil(1), _planes(_pil(1))
    for f in (0.6, 0.93, 1.4):
        assert (ops.brightness(x, torch.tensor(f)) - _planes(ImageEnhance.Brightness(img).enhance(f))).abs().max() <= 1
        center = ops.contrast_center(ops.mean_luma(x))
        assert (ops.contrast(x, torch.tensor(f), center) - _planes(ImageEnhance.Contrast(img).enhance(f))).abs().max() <= 1


def test_hue_is_the_exact_hsv_rotation_rounded():
    x = _planes(_pil(2, 24))
    x[:, 0] = x[0, 0]  # grey pixels
    x[1, 1], x[2, 2], x[2, 3] = x[0, 1], x[1, 2], x[0, 3]  # two channels tie: R=G, G=B, R=B
    x[1, 4] = x[0, 4] = x[2, 4] + 1  # the largest two tie, one level above the third
    for shift in (0.07, -0.1, 0.31):
        out = ops.hue(x, torch.tensor(shift))
        ref = torch.tensor([[colorsys.hsv_to_rgb((h + shift) % 1.0, s, v) for h, s, v in
                             (colorsys.rgb_to_hsv(*(x[:, i, j] / 255).tolist()) for j in range(24))] for i in range(24)])
        assert (out - ref.permute(2, 0, 1) * 255).abs().max() <= 0.5 + 1e-3


def test_blur_equals_torchvision_gaussian_blur_inside_the_border():
    x = _planes(_pil(3, 48))[None]
    for sigma in (0.1, 0.7, 2.0):
        k = len(ops.gaussian_kernel(sigma))
        ours = ops.gaussian_blur(x, [sigma])
        ref = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        r = k // 2
        assert torch.allclose(ours[..., r:-r, r:-r], ref[..., r:-r, r:-r], atol=1e-3)


def test_blur_alone_equals_blur_in_a_batch_of_other_sigmas():
    x = torch.stack([_planes(_pil(i, 32)) for i in range(3)])
    batched = ops.gaussian_blur(x, [0.3, 2.0, 1.1])
    for i, s in enumerate([0.3, 2.0, 1.1]):
        assert torch.equal(batched[i : i + 1], ops.gaussian_blur(x[i : i + 1], [s]))


def test_crops_are_pils_bicubic_resize_of_the_box():
    """The geometry of the classic pipeline (torchvision's RandomResizedCrop on PIL: cut the
    box, resize it bicubic), flipped when sampled, down- and upsampling. The reference is
    PIL's two-pass resample written out: the horizontal pass, rounded to 8 bits, then the
    vertical one (this order; Pillow 13 runs the vertical pass first for some box shapes,
    which changes values only where the first pass clips an overshoot)."""
    img = _pil(6, 24).resize((80, 64), Image.BICUBIC)  # smooth, not square
    cfg = AugmentConfig(global_crops_size=48, local_crops_size=24, local_crops_number=4, **GEOMETRY_ONLY)
    aug = MultiCropAugmentation(cfg)
    diffs = []
    for seed in range(8):
        for c, crop in zip(sample_crops(cfg, 64, 80, seed), aug.worker_crops(img, seed)):
            top, left, h, w = c.box
            box = img.crop((left, top, left + w, top + h))
            ref = box.resize((c.size, h), Image.BICUBIC).resize((c.size, c.size), Image.BICUBIC)
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT) if c.flip else ref
            diffs.append((crop.int() - _planes(ref).int()).abs().flatten())
    diffs = torch.cat(diffs)
    assert diffs.max() <= 2 and (diffs > 1).float().mean() < 1e-3  # PIL's 22-bit fixed point vs torch's


def test_solarize_equals_pil():
    img = _pil(4)
    assert torch.equal(ops.solarize(_planes(img)), _planes(ImageOps.solarize(img, 128)))


# -- the two paths agree ------------------------------------------------------------------
def test_on_device_path_equals_worker_path_on_real_jpegs(cifar_slice):
    """Same seeds → the same crops bit for bit (tolerance 0 on CPU): both paths run the same
    float32 operations on the same whole-number pixels; only the batching differs."""
    cfg = AugmentConfig(global_crops_size=32, local_crops_size=16, local_crops_number=4, blur_p_global2=0.5,
                        solarize_p_global2=0.5)
    aug = MultiCropAugmentation(cfg)
    paths = sorted(str(p) for p in (cifar_slice / "train").rglob("*.jpg"))[:24]
    samples = [(p, 1000 + i) for i, p in enumerate(paths)]
    device = _on_device(aug, samples)
    for i, (path, seed) in enumerate(samples):
        worker = aug(path, seed)
        for j, crop in enumerate(worker):
            assert torch.equal(crop, device[j][i]), f"sample {i} crop {j}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_path_on_cuda_equals_worker_path_on_cpu():
    """The device share on CUDA against the whole recipe on the CPU, same seeds, DINO's
    parameters (blur, solarize, every jitter op): the same rounded pixels, so the normalised
    values agree to float rounding; 1e-4 is 1/170 of a level (on an H200 no value of 37
    million differed by half a level, on 64 Imagenette samples)."""
    aug = MultiCropAugmentation(AugmentConfig(global_crops_size=48, local_crops_size=24, local_crops_number=3))
    samples = [(_image(64, seed=s), s) for s in range(32)]
    device = _on_device(aug, samples, "cuda")
    for i, (image, seed) in enumerate(samples):
        for j, crop in enumerate(aug(image, seed)):
            torch.testing.assert_close(device[j][i], crop, rtol=0, atol=1e-4, msg=f"sample {i} crop {j}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_path_on_cuda_makes_no_host_sync():
    """torch's sync debug mode raises on any operation that waits for the GPU; the first call
    makes the per-device constants (their one copy), the second must not wait."""
    aug = MultiCropAugmentation(AugmentConfig(**EVERY_OP))
    batch = default_collate([aug.geometric(_image(48, seed=s), s) for s in range(8)])
    batch = {"crops": [c.cuda() for c in batch["crops"]], "params": batch["params"].cuda()}
    color_on_device(batch, aug.cfg)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        color_on_device(batch, aug.cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_on_device_path_equals_worker_path_with_dino_parameters():
    aug = MultiCropAugmentation(AugmentConfig(global_crops_size=48, local_crops_size=24, local_crops_number=3))
    samples = [(_image(64, seed=s), s) for s in range(16)]
    device = _on_device(aug, samples)
    for i, (image, seed) in enumerate(samples):
        assert all(torch.equal(c, device[j][i]) for j, c in enumerate(aug(image, seed)))


def _refuse(name):
    def method(*args, **kwargs):
        raise AssertionError(f"Tensor.{name} read a value back to the host")
    return method


def test_on_device_path_reads_nothing_back_to_the_host(monkeypatch):
    """With every host-reading Tensor method made to raise, the device share still runs and
    gives the workers path's pixels (every op, every jitter order, on 32 samples)."""
    aug = MultiCropAugmentation(AugmentConfig(**EVERY_OP))
    samples = [(_image(48, seed=s), s) for s in range(32)]
    batch = default_collate([aug.geometric(image, seed) for image, seed in samples])
    expected = [aug(image, seed) for image, seed in samples]
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, _refuse(name))
    device = color_on_device(batch, aug.cfg)
    monkeypatch.undo()
    for i, crops in enumerate(expected):
        assert all(torch.equal(c, device[j][i]) for j, c in enumerate(crops)), f"sample {i}"


@pytest.mark.parametrize("blur", [True, False])
def test_on_device_path_needs_no_values_to_run(blur):
    """On the meta device (shapes, no values) an op whose output shape or control flow
    depends on values (nonzero, boolean indexing, item) cannot run: the device share runs
    there, so it makes no such op, with and without blur taps."""
    cfg = AugmentConfig(**EVERY_OP) if blur else AugmentConfig(**{**EVERY_OP, **GEOMETRY_ONLY})
    aug = MultiCropAugmentation(cfg)
    batch = default_collate([aug.geometric(_image(48, seed=s), s) for s in range(4)])
    on_meta = {"crops": [c.to("meta") for c in batch["crops"]], "params": batch["params"].to("meta")}
    out = color_on_device(on_meta, cfg)
    assert [tuple(c.shape) for c in out] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3


def test_on_device_path_equals_worker_path_without_blur():
    """A recipe that never blurs ships a single identity tap per crop: same pixels."""
    cfg = AugmentConfig(**{**EVERY_OP, "blur_p_global1": 0.0, "blur_p_global2": 0.0, "blur_p_local": 0.0})
    aug = MultiCropAugmentation(cfg)
    samples = [(_image(48, seed=s), s) for s in range(16)]
    device = _on_device(aug, samples)
    assert device[0].shape[0] == 16 and aug.geometric(_image(), 0)["params"].shape[1] == ops.TAPS + 1
    for i, (image, seed) in enumerate(samples):
        assert all(torch.equal(c, device[j][i]) for j, c in enumerate(aug(image, seed)))


def test_padded_taps_blur_as_the_kernel_itself_and_sigma_zero_is_the_identity():
    x = torch.stack([_planes(_pil(i, 24)) for i in range(3)])
    taps = torch.stack([ops.gaussian_taps(s, 6) for s in (0.0, 0.5, 2.0)])
    out = ops.blur(x, taps)
    assert torch.equal(out[0], x[0])
    for i, s in ((1, 0.5), (2, 2.0)):  # against the separable kernel written out as a 2-D convolution
        k = ops.gaussian_kernel(s).double()
        r = len(k) // 2
        padded = torch.nn.functional.pad(x[i : i + 1].double(), (r, r, r, r), mode="replicate")
        ref = torch.nn.functional.conv2d(padded, torch.outer(k, k).expand(3, 1, -1, -1), groups=3)[0]
        assert (out[i].double() - ref).abs().max() < 1e-3


def test_jpeg_is_decoded_at_reduced_size_when_every_crop_allows_it(tmp_path):
    path = tmp_path / "big.jpg"
    _pil(5, 100).resize((800, 800), Image.BICUBIC).save(path, quality=95)  # smooth
    cfg = AugmentConfig(global_crops_size=64, local_crops_size=32, local_crops_number=2, global_crops_scale=(0.9, 1.0),
                        local_crops_scale=(0.5, 0.6), **GEOMETRY_ONLY)
    aug = MultiCropAugmentation(cfg)
    from ssl_xcit.pretrain.augment import _cut, _decode, open_image

    full, _, _ = _decode(open_image(str(path)), [])  # no crops: full size
    assert tuple(full.shape) == (800, 800, 3)
    for seed in range(3):
        img = open_image(str(path))
        crops = aug.sample(img, seed)
        reduced, sx, sy = _decode(img, crops)
        assert reduced.width == 100 and sx == sy == 100 / 800  # 1/8: every box spans >= 8x its crop
        # each box keeps its fractional edges at 1/8: within the DCT downscale's blur of the crop
        # cut from the full-size decode (rounding the edges to whole pixels there moves crops by
        # up to half a pixel and gave mean differences up to 14 levels)
        for c, crop in zip(crops, aug.worker_crops(str(path), seed)):
            assert crop.shape == (3, c.size, c.size)
            assert (crop.float() - _cut(full, c, 1.0, 1.0).float()).abs().mean() < 3
