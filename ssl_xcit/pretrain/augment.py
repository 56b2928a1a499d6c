"""DINO multi-crop augmentation (arXiv 2104.14294, App. B), fast on CPU workers.

Two global crops and ``local_crops_number`` local crops per image. Every random choice of
a sample is drawn first from the sample's seed (:mod:`ssl_xcit.augment_params`), then
applied:

- ``__call__`` (``augment.device: workers``): the whole recipe in the data-loader worker.
  The JPEG is decoded once, at reduced size (draft) when every crop allows it; each crop is
  cut and resized in one bicubic PIL resample, flipped, then coloured on 8 bits (brightness
  and contrast as lookup tables, saturation as PIL's blend, hue by an exact HSV rotation),
  and only then converted to float, once per crop size, for the blur (a separable kernel
  sized to the crop's σ), solarisation and normalisation.
- ``geometric`` (``augment.device: train``): decode, crop, resize and flip only; the uint8
  crops and their colour parameters go to the training device, where
  :func:`ssl_xcit.augment_ops.color_batch` finishes them in batches.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from ssl_xcit.pretrain import augment_ops as ops
from ssl_xcit.pretrain.augment_params import CropParams, color_rows, sample_crops
from ssl_xcit.pretrain.config import AugmentConfig
from ssl_xcit.image_sources import DECODE_ERRORS, UnreadableImage

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor]
_ARANGE = torch.arange(256, dtype=torch.float32)


def open_image(image: ImageLike) -> Image.Image:
    """A PIL image, not yet decoded when given a path (so that draft decoding can apply)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):  # uint8 C×H×W
        array = image.permute(1, 2, 0).numpy()
        return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    try:
        return Image.open(image)
    except DECODE_ERRORS as err:
        raise UnreadableImage(str(image), err) from err


def _decode(img: Image.Image, crops: list[CropParams]) -> tuple[Image.Image, float, float]:
    """The RGB pixels, decoded at 1/2, 1/4 or 1/8 when every crop box still spans at least
    its output size there; and the factors from full-size to decoded coordinates."""
    width, height = img.size
    if img.format == "JPEG" and crops:
        shrink = min(min(c.box[2], c.box[3]) / c.size for c in crops)
        reduce = next((r for r in (8, 4, 2) if shrink >= r), 1)
        if reduce > 1:
            img.draft("RGB", (-(-width // reduce), -(-height // reduce)))
    try:
        rgb = img.convert("RGB")
    except DECODE_ERRORS as err:
        raise UnreadableImage(getattr(img, "filename", "") or "<image>", err) from err
    return rgb, rgb.width / width, rgb.height / height


def _cut(rgb: Image.Image, c: CropParams, sx: float, sy: float) -> Image.Image:
    top, left, h, w = c.box
    crop = rgb.resize((c.size, c.size), Image.BICUBIC, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if c.flip else crop


def _point(img: Image.Image, values: torch.Tensor) -> Image.Image:
    """The same 8-bit lookup table on the three bands."""
    lut = values.to(torch.uint8).tolist() * 3
    try:  # Image.point would round the 768 ints one by one in Python
        return img._new(img.im.point(lut, None))
    except AttributeError:
        return img.point(lut)


def _hue_pil(img: Image.Image, shift: float) -> Image.Image:
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().contiguous()  # planes: fewer strided ops
    out = ops.hue(x, _f32(shift))
    return Image.fromarray(out.numpy().astype(np.uint8).transpose(1, 2, 0))


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64).float()


def color_pil(img: Image.Image, c: CropParams) -> Image.Image:
    """Jitter (in its sampled order) and grayscale of one RGB crop, on 8 bits."""
    if c.jitter:
        b, k, s, h = c.factors
        for op in c.order:
            if op == 0:
                img = _point(img, ops.brightness(_ARANGE, _f32(b)))
            elif op == 1:
                hist = img.convert("L").histogram()
                mean = sum(i * n for i, n in enumerate(hist)) / (img.width * img.height)
                center = ops.contrast_center(torch.tensor(mean, dtype=torch.float64))
                img = _point(img, ops.contrast(_ARANGE, _f32(k), center))
            elif op == 2:
                img = Image.blend(img.convert("L").convert("RGB"), img, s)
            elif h != 0:
                img = _hue_pil(img, h)
    if c.gray:
        img = img.convert("L").convert("RGB")
    return img


def _stack_u8(images: list[Image.Image]) -> torch.Tensor:
    """Same-size RGB PIL images → N×3×H×W uint8."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


class MultiCropAugmentation:
    """Image (path, PIL or uint8 C×H×W tensor) and seed → 2 + ``local_crops_number`` crops.

    Global crop 1: blur p=``blur_p_global1`` (1.0). Global crop 2: blur p=``blur_p_global2``
    (0.1) and solarize p=``solarize_p_global2`` (0.2). Local crops: blur p=``blur_p_local`` (0.5).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.n_local = cfg.local_crops_number

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def sample(self, image: Image.Image, seed: Optional[int]) -> list[CropParams]:
        if seed is None:  # no per-sample seed: draw one from torch's global generator
            seed = int(torch.randint(0, 2**62, ()).item())
        return sample_crops(self.cfg, image.height, image.width, seed)

    def _load(self, image: ImageLike, seed: Optional[int]) -> tuple[list[CropParams], Image.Image, float, float]:
        img = open_image(image)
        try:
            crops = self.sample(img, seed)
            return (crops, *_decode(img, crops))
        finally:
            if img is not image:  # opened here from a path or tensor
                img.close()

    def geometric(self, image: ImageLike, seed: Optional[int] = None) -> dict[str, Any]:
        """The on-device path's worker share: uint8 3×S×S crops (cut, resized, flipped) and
        the n_crops × 12 colour parameters that :func:`color_batch` applies."""
        crops, rgb, sx, sy = self._load(image, seed)
        u8 = [_stack_u8([_cut(rgb, c, sx, sy)])[0] for c in crops]
        return {"crops": u8, "params": color_rows(crops)}

    def __call__(self, image: ImageLike, seed: Optional[int] = None) -> list[torch.Tensor]:
        crops, rgb, sx, sy = self._load(image, seed)
        out: list[torch.Tensor] = []
        for group in (crops[:2], crops[2:]):  # one float conversion per crop size
            if group:
                out += self._finish(_stack_u8([color_pil(_cut(rgb, c, sx, sy), c) for c in group]), group)
        return out

    def _finish(self, u8: torch.Tensor, crops: list[CropParams]) -> list[torch.Tensor]:
        x = u8.float()
        for i, c in enumerate(crops):
            if c.sigma > 0:
                x[i : i + 1] = ops.gaussian_blur(x[i : i + 1], [c.sigma])
            if c.solarize:
                x[i] = ops.solarize(x[i])
        return list(ops.normalize(x, self.cfg.mean, self.cfg.std).unbind(0))


def color_on_device(batch: dict[str, Any], cfg: AugmentConfig) -> list[torch.Tensor]:
    """The on-device path's device share: ``{"crops": [B×3×S×S uint8] * n_crops, "params":
    B × n_crops × 12}`` → normalised float crops, one :func:`color_batch` call per size."""
    crops, params = batch["crops"], batch["params"]
    n_global, out = min(2, len(crops)), []
    for first, last in ((0, n_global), (n_global, len(crops))):
        if last > first:
            u8 = torch.cat(crops[first:last])
            rows = params[:, first:last].transpose(0, 1).reshape(-1, params.shape[-1])  # crop-major, like cat
            out += list(ops.color_batch(u8, rows, cfg.mean, cfg.std).chunk(last - first))
    return out
