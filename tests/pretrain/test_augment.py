import torch
from torchvision.transforms import v2

from ssl_xcit.pretrain.augment import MultiCropAugmentation
from ssl_xcit.pretrain.config import AugmentConfig


def _image(size=48, channels=3):
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8)


def test_crop_counts_sizes_and_dtype():
    aug = MultiCropAugmentation(AugmentConfig(global_crops_size=32, local_crops_size=16, local_crops_number=6))
    crops = aug(_image())
    assert len(crops) == aug.n_crops == 8
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_grayscale_input_becomes_rgb():
    crops = MultiCropAugmentation(AugmentConfig(global_crops_size=32, local_crops_size=16))(_image(channels=1))
    assert crops[0].shape[0] == 3


def test_same_seed_same_crops():
    aug = MultiCropAugmentation(AugmentConfig(global_crops_size=32, local_crops_size=16, local_crops_number=2))
    image = _image()
    torch.manual_seed(3)
    a = aug(image)
    torch.manual_seed(3)
    b = aug(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _kinds(pipeline):
    out = []
    for t in pipeline.transforms:
        out.append((type(t).__name__, t.p if isinstance(t, v2.RandomApply) else getattr(t, "p", None)))
        if isinstance(t, v2.RandomApply):
            out.append((type(t.transforms[0]).__name__, None))
    return out


def test_dino_probabilities_per_crop():
    aug = MultiCropAugmentation(AugmentConfig())
    g1, g2, local = _kinds(aug.global1), _kinds(aug.global2), _kinds(aug.local)
    blur_p = lambda kinds: kinds[[n for n, _ in kinds].index("GaussianBlur") - 1][1]  # noqa: E731
    assert (blur_p(g1), blur_p(g2), blur_p(local)) == (1.0, 0.1, 0.5)
    assert ("RandomSolarize", 0.2) in g2
    assert not any(n == "RandomSolarize" for n, _ in g1 + local)
    for kinds in (g1, g2, local):
        assert ("RandomHorizontalFlip", 0.5) in kinds and ("RandomGrayscale", 0.2) in kinds
        assert ("RandomApply", 0.8) in kinds and ("ColorJitter", None) in kinds


def test_normalisation_uses_configured_statistics():
    cfg = AugmentConfig(global_crops_size=16, local_crops_size=16, local_crops_number=0, color_jitter_p=0,
                        grayscale_p=0, blur_p_global1=0, blur_p_global2=0, solarize_p_global2=0,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), global_crops_scale=(1.0, 1.0))
    flat = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    crops = MultiCropAugmentation(cfg)(flat)
    assert torch.allclose(crops[0], torch.ones_like(crops[0]))
