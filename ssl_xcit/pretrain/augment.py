"""DINO multi-crop augmentation (arXiv 2104.14294, App. B), fast on CPU workers.

Two global crops and ``local_crops_number`` local crops per image. Every random choice of
a sample is drawn first from the sample's seed (:mod:`ssl_xcit.augment_params`), then
applied:

- ``worker_crops`` (``augment.device: workers``): the whole recipe in the data-loader worker
  but the normalisation (``__call__`` adds it, for use outside a loader).
  The JPEG is decoded once, at reduced size (draft) when every crop allows it; each crop's
  box is cut out, resized with PIL's bicubic filter (torch's uint8 kernel) and flipped. Its
  colour ops run on 8 bits in PIL (brightness and contrast as lookup tables, saturation as
  PIL's blend) up to the hue; the crop then goes once into the float batch of its size,
  where the hue (an exact HSV rotation, one call for all the crops of that size) and the
  ops after it run, then the blur (a separable kernel sized to the crop's σ), rounded to
  whole levels, and the solarisation. The worker ships uint8 crops; the training device
  normalises them.
- ``geometric`` (``augment.device: train``): decode, crop, resize and flip only; the uint8
  crops and their colour parameters go to the training device, where
  :func:`ssl_xcit.augment_ops.color_batch` finishes them in batches.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_xcit.compat import pil_point_lut
from ssl_xcit.pretrain import augment_ops as ops
from ssl_xcit.pretrain.augment_params import CropParams, color_rows, sample_crops, taps_radius
from ssl_xcit.pretrain.config import AugmentConfig
from ssl_xcit.image_sources import DECODE_ERRORS, UnreadableImage

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor]
_ARANGE = torch.arange(256, dtype=torch.float32)
_LEVELS = np.arange(256, dtype=np.float64)


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


def _decode(img: Image.Image, crops: list[CropParams]) -> tuple[torch.Tensor | Image.Image, float, float]:
    """The RGB pixels, decoded at 1/2, 1/4 or 1/8 when every crop box still spans at least
    its output size there: at full size an H×W×3 uint8 tensor, at reduced size the PIL image
    (crop boxes have fractional edges there); and the factors from full-size to decoded
    coordinates."""
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
    if rgb.size == (width, height):
        return torch.from_numpy(np.array(rgb)), 1.0, 1.0
    return rgb, rgb.width / width, rgb.height / height


def _cut(decoded: torch.Tensor | Image.Image, c: CropParams, sx: float, sy: float) -> torch.Tensor:
    """Crop ``c`` resized to S×S with PIL's bicubic filter and flipped: uint8 3×S×S.

    At full size its box is cut out and resized by torch's antialiased uint8 kernel, PIL's
    two-pass algorithm (horizontal pass, 8-bit rounding, vertical pass) at 4× the speed of
    PIL's own, with the classic pipeline's geometry (cut the box, then resize). At reduced
    size the box's edges are fractional, which PIL's box resample keeps exactly."""
    top, left, h, w = c.box
    if isinstance(decoded, Image.Image):
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        crop = torch.from_numpy(np.array(decoded.resize((c.size, c.size), Image.BICUBIC, box=box))).permute(2, 0, 1)
    else:
        pixels = decoded[top : top + h, left : left + w].permute(2, 0, 1).unsqueeze(0)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        crop = F.interpolate(pixels, size=(c.size, c.size), mode="bicubic", antialias=True)[0]
    return crop.flip(-1) if c.flip else crop


def _point(img: Image.Image, values: torch.Tensor) -> Image.Image:
    """The same 8-bit lookup table on the three bands."""
    lut = values.to(torch.uint8).tolist() * 3
    try:
        return pil_point_lut(img, lut)
    except AttributeError:  # a Pillow without the core call: the public one, same result
        return img.point(lut)


def _f32(value: float) -> torch.Tensor:
    """A factor as the 0-d float32 tensor the batched path also uses (the double rounded to nearest)."""
    return torch.tensor(value, dtype=torch.float32)


def _jitter_pil(img: Image.Image, op: int, c: CropParams) -> Image.Image:
    """Brightness (0) or contrast (1) as an 8-bit lookup table, saturation (2) as PIL's blend."""
    b, k, s, _ = c.factors
    if op == 0:
        return _point(img, ops.brightness(_ARANGE, _f32(b)))
    if op == 1:
        hist = np.asarray(img.convert("L").histogram(), dtype=np.float64)
        mean = float(hist @ _LEVELS) / (img.width * img.height)  # a sum of integers below 2^53: exact
        center = ops.contrast_center(torch.tensor(mean, dtype=torch.float64))
        return _point(img, ops.contrast(_ARANGE, _f32(k), center))
    return Image.blend(img.convert("L").convert("RGB"), img, s)


def _jitter_tensor(x: torch.Tensor, op: int, c: CropParams) -> torch.Tensor:
    """The same four ops on a float 3×S×S crop of whole numbers (op 3: the hue rotation)."""
    factor = _f32(c.factors[op])
    if op == 0:
        return ops.brightness(x, factor)
    if op == 1:
        return ops.contrast(x, factor, ops.contrast_center(ops.mean_luma(x)))
    if op == 2:
        return ops.saturation(x, factor)
    return ops.hue(x, factor)


def _planes(u8: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 3×S×S crop (any strides) as contiguous float planes, in one pass."""
    return (torch.empty(u8.shape) if out is None else out).copy_(u8)


def color_group(cut: list[torch.Tensor], crops: list[CropParams]) -> list[torch.Tensor]:
    """Jitter (in each crop's sampled order) and grayscale of same-size uint8 3×S×S crops:
    float 3×S×S crops of whole numbers 0..255. The ops before a crop's hue run on 8 bits in
    PIL; the crop then becomes float once, straight into the batch whose hue runs in one
    call (per-crop shifts), and the ops after its hue run on its own float tensor."""
    colored: list[torch.Tensor] = [None] * len(crops)  # type: ignore[list-item]
    after_hue: list[tuple[int, list[int], torch.Tensor]] = []  # crop, its ops after the hue, its pixels
    for i, (u8, c) in enumerate(zip(cut, crops)):
        todo = [op for op in c.order if op != 3 or c.factors[3] != 0] if c.jitter else []
        if (todo and todo[0] != 3) or (not todo and c.gray):  # 8-bit work in PIL first
            img = Image.fromarray(u8.permute(1, 2, 0).numpy())
            while todo and todo[0] != 3:
                img = _jitter_pil(img, todo.pop(0), c)
            if not todo and c.gray:
                img = img.convert("L").convert("RGB")
            u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        if todo:  # the hue is next
            after_hue.append((i, todo[1:], u8))
        else:
            colored[i] = _planes(u8)
    if after_hue:
        batch = torch.empty(len(after_hue), *after_hue[0][2].shape)
        for (_, _, u8), planes in zip(after_hue, batch):
            _planes(u8, planes)
        shifts = torch.tensor([crops[i].factors[3] for i, _, _ in after_hue], dtype=torch.float32).view(-1, 1, 1, 1)
        for (i, todo, _), x in zip(after_hue, ops.hue(batch, shifts)):
            for op in todo:
                x = _jitter_tensor(x, op, crops[i])
            colored[i] = ops.luma(x).expand_as(x) if crops[i].gray else x
    return colored


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

    def _load(self, image: ImageLike, seed: Optional[int]) -> tuple[list[CropParams], torch.Tensor | Image.Image, float, float]:
        img = open_image(image)
        try:
            crops = self.sample(img, seed)
            return (crops, *_decode(img, crops))
        finally:
            if img is not image:  # opened here from a path or tensor
                img.close()

    def geometric(self, image: ImageLike, seed: Optional[int] = None) -> dict[str, Any]:
        """The on-device path's worker share: uint8 3×S×S crops (cut, resized, flipped) and
        the colour parameters and blur taps (n_crops rows) that :func:`color_batch` applies."""
        crops, decoded, sx, sy = self._load(image, seed)
        u8 = [_cut(decoded, c, sx, sy).contiguous() for c in crops]
        return {"crops": u8, "params": color_rows(crops, taps_radius(self.cfg))}

    def __call__(self, image: ImageLike, seed: Optional[int] = None) -> list[torch.Tensor]:
        """The crops, normalised float C×S×S: :meth:`worker_crops` then :func:`normalize_crops`."""
        return [c[0] for c in normalize_crops([c.unsqueeze(0) for c in self.worker_crops(image, seed)], self.cfg)]

    def worker_crops(self, image: ImageLike, seed: Optional[int] = None) -> list[torch.Tensor]:
        """The workers path's share: the whole recipe but the normalisation, as uint8 3×S×S
        crops (the blur rounded to whole levels, as DINO's 8-bit PIL pipeline ends), a
        quarter of the bytes of floats to collate, pin and ship."""
        crops, decoded, sx, sy = self._load(image, seed)
        out: list[torch.Tensor] = []
        for group in (crops[:2], crops[2:]):  # one hue batch per crop size
            if group:
                colored = color_group([_cut(decoded, c, sx, sy) for c in group], group)
                out += [_blur_solarize(x, c).to(torch.uint8) for x, c in zip(colored, group)]
        return out


def _blur_solarize(x: torch.Tensor, c: CropParams) -> torch.Tensor:
    """Blur (rounded to whole levels) and solarisation of one float 3×S×S crop."""
    if c.sigma > 0:
        x = ops.round_levels(ops.gaussian_blur(x[None], [c.sigma]))[0]
    return ops.solarize(x) if c.solarize else x


def normalize_crops(crops: list[torch.Tensor], cfg: AugmentConfig) -> list[torch.Tensor]:
    """The workers path's device share: uint8 B×3×S×S crops → normalised float crops."""
    return [ops.normalize_(c.to(torch.float32, copy=True), cfg.mean, cfg.std) for c in crops]


def color_on_device(batch: dict[str, Any], cfg: AugmentConfig) -> list[torch.Tensor]:
    """The on-device path's device share: ``{"crops": [B×3×S×S uint8] * n_crops, "params":
    B × n_crops × columns}`` → normalised float crops, one :func:`color_batch` call per size
    (no host sync: nothing is read back from the device)."""
    crops, params = batch["crops"], batch["params"]
    n_global, out = min(2, len(crops)), []
    for first, last in ((0, n_global), (n_global, len(crops))):
        if last > first:
            u8 = torch.cat(crops[first:last])
            rows = params[:, first:last].transpose(0, 1).reshape(-1, params.shape[-1])  # crop-major, like cat
            out += list(ops.color_batch(u8, rows, cfg.mean, cfg.std).chunk(last - first))
    return out
