"""DINO multi-crop augmentation with torchvision transforms v2 (arXiv 2104.14294, App. B).

Two global crops and ``local_crops_number`` local crops per image. Colour operations run on
uint8 tensors (fast, exact for solarize's threshold of 128) and the result is normalised
float32. Gaussian-blur σ is in pixels of the crop; the kernel spans ±3σ_max.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from ssl_xcit.pretrain.config import AugmentConfig


def _blur(sigma: tuple[float, float], p: float) -> v2.Transform:
    kernel = 2 * math.ceil(3 * sigma[1]) + 1
    return v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=sigma)], p=p)


def _crop_pipeline(
    cfg: AugmentConfig, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
) -> v2.Compose:
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RGB(),
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=cfg.flip_p),
        v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
        v2.RandomGrayscale(p=cfg.grayscale_p),
        _blur(cfg.blur_sigma, blur_p),
    ]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=cfg.mean, std=cfg.std)]
    return v2.Compose(steps)


class MultiCropAugmentation:
    """Image (PIL or uint8 tensor) → list of 2 + ``local_crops_number`` float crops.

    Global crop 1: blur p=``blur_p_global1`` (1.0). Global crop 2: blur p=``blur_p_global2``
    (0.1) and solarize p=``solarize_p_global2`` (0.2). Local crops: blur p=``blur_p_local`` (0.5).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.n_local = cfg.local_crops_number
        self.global1 = _crop_pipeline(cfg, cfg.global_crops_size, cfg.global_crops_scale, cfg.blur_p_global1, 0.0)
        self.global2 = _crop_pipeline(
            cfg, cfg.global_crops_size, cfg.global_crops_scale, cfg.blur_p_global2, cfg.solarize_p_global2
        )
        self.local = _crop_pipeline(cfg, cfg.local_crops_size, cfg.local_crops_scale, cfg.blur_p_local, 0.0)

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def __call__(self, image) -> list[torch.Tensor]:
        crops = [self.global1(image), self.global2(image)]
        crops += [self.local(image) for _ in range(self.n_local)]
        return crops
