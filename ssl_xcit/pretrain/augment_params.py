"""Step (a) of the multi-crop augmentation: every random choice of one sample's crops.

:func:`sample_crops` draws, from the sample's own seed alone, the crop box, flip, colour
jitter (on/off, four factors, order), grayscale, blur σ and solarisation of each of the
2 global and ``local_crops_number`` local crops, into plain :class:`CropParams`. The
worker path and the on-device path both apply these, so they see the same crops and a
resumed run draws the same ones.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ssl_xcit.pretrain import augment_ops as ops
from ssl_xcit.pretrain.config import AugmentConfig

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (DINO keeps torchvision's default)


@dataclass(frozen=True)
class CropParams:
    size: int
    """Output side in pixels."""
    box: tuple[int, int, int, int]
    """top, left, height, width in pixels of the full-resolution source image."""
    flip: bool
    jitter: bool
    """Colour jitter applied (probability ``color_jitter_p``)."""
    factors: tuple[float, float, float, float]
    """Brightness, contrast, saturation factors and hue shift in turns (1, 1, 1, 0: identity)."""
    order: tuple[int, int, int, int]
    """Order of the four jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    gray: bool
    sigma: float
    """Gaussian-blur σ in pixels of the crop; 0: no blur."""
    solarize: bool

    def color_row(self, blur_radius: int) -> list[float]:
        """The colour parameters as one row of :data:`augment_ops` columns, ending with the
        2·blur_radius + 1 taps of this crop's blur (the identity when it is not blurred)."""
        row = [float(self.jitter), *self.factors, *map(float, self.order), float(self.gray), self.sigma,
               float(self.solarize)]
        assert len(row) == ops.TAPS
        return row + ops.gaussian_taps(self.sigma, blur_radius).tolist()


def crop_box(rng: random.Random, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: area fraction U(scale), log-uniform aspect ratio in RATIO,
    up to 10 tries, else the largest centred box within RATIO."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _factor_range(strength: float, center: float) -> tuple[float, float]:
    return (max(0.0, center - strength), center + strength)


def sample_crop(
    rng: random.Random, cfg: AugmentConfig, height: int, width: int, size: int, scale: tuple[float, float],
    blur_p: float, solarize_p: float,
) -> CropParams:
    box = crop_box(rng, height, width, scale)
    flip = rng.random() < cfg.flip_p
    jitter = rng.random() < cfg.color_jitter_p
    b, c, s, h = cfg.color_jitter
    factors = (
        rng.uniform(*_factor_range(b, 1.0)) if b else 1.0,
        rng.uniform(*_factor_range(c, 1.0)) if c else 1.0,
        rng.uniform(*_factor_range(s, 1.0)) if s else 1.0,
        rng.uniform(-h, h) if h else 0.0,
    )
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    gray = rng.random() < cfg.grayscale_p
    sigma = rng.uniform(*cfg.blur_sigma) if rng.random() < blur_p else 0.0
    solarize = rng.random() < solarize_p
    return CropParams(size, box, flip, jitter, factors if jitter else (1.0, 1.0, 1.0, 0.0), tuple(order), gray,
                      sigma, solarize)


def sample_crops(cfg: AugmentConfig, height: int, width: int, seed: int) -> list[CropParams]:
    """Global crop 1 (blur ``blur_p_global1``), global crop 2 (blur ``blur_p_global2``,
    solarize ``solarize_p_global2``), then the local crops (blur ``blur_p_local``)."""
    rng = random.Random(seed)
    g, gs = cfg.global_crops_size, cfg.global_crops_scale
    crops = [
        sample_crop(rng, cfg, height, width, g, gs, cfg.blur_p_global1, 0.0),
        sample_crop(rng, cfg, height, width, g, gs, cfg.blur_p_global2, cfg.solarize_p_global2),
    ]
    crops += [
        sample_crop(rng, cfg, height, width, cfg.local_crops_size, cfg.local_crops_scale, cfg.blur_p_local, 0.0)
        for _ in range(cfg.local_crops_number)
    ]
    return crops


def taps_radius(cfg: AugmentConfig) -> int:
    """Blur taps a side that every crop of the recipe fits: those of its largest σ, or none
    (a single identity tap) when no crop is ever blurred."""
    ever = max(cfg.blur_p_global1, cfg.blur_p_global2, cfg.blur_p_local) > 0
    return ops.blur_radius(cfg.blur_sigma[1]) if ever else 0


def color_rows(crops: list[CropParams], blur_radius: int) -> torch.Tensor:
    """n_crops × (TAPS + 2·blur_radius + 1) float64 tensor of the colour parameters and blur
    taps (what the on-device path ships: its device then only multiplies)."""
    return torch.tensor([c.color_row(blur_radius) for c in crops], dtype=torch.float64)
