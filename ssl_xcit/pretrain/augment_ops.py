"""Colour operations of DINO's multi-crop recipe as plain torch ops, shared by both paths.

Pixels are float32 tensors holding whole numbers 0..255 (uint8 values) throughout: each
jitter op and the blur round back to whole numbers exactly as an 8-bit pipeline would, so the
worker path (8-bit lookup tables and PIL built from these very functions) and the
batched on-device path (:func:`color_batch`) produce the same values. Channels are on
``dim`` (-3 for N×3×H×W and 3×H×W; -1 for H×W×3). Factor arguments broadcast against the
image with ``dim`` kept (a 0-d tensor, or N×1×1×1 for a batch).

Formulas (torchvision's ColorJitter on PIL images, the classic DINO pipeline):
brightness ``b·x``; contrast ``m + c·(x − m)`` with ``m`` the rounded mean of the luma;
saturation ``L + s·(x − L)`` (PIL's blend, truncated); hue: rotate the HSV hue by ``h``
turns (exact, unquantised); luma ``L`` is PIL's ITU-R 601-2 in 16-bit fixed point.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

# Columns of the per-crop colour-parameter rows (see augment_params.CropParams.color_row): flags
# and factors, then from TAPS on the crop's blur taps (as many as the recipe's largest σ needs)
JITTER, BRIGHT, CONTRAST, SATURATION, HUE, ORDER, GRAY, SIGMA, SOLARIZE, TAPS = 0, 1, 2, 3, 4, 5, 9, 10, 11, 12


def luma(x: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """PIL's ``convert("L")``: (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32
    (every intermediate is an integer below 2^24)."""
    r, g, b = x.unbind(dim)
    return (r * 19595).add_(g, alpha=38470).add_(b, alpha=7471).add_(32768).div_(65536).floor_().unsqueeze(dim)


def blend(x: torch.Tensor, anchor: torch.Tensor | float, factor: torch.Tensor, offset: torch.Tensor | float) -> torch.Tensor:
    """``anchor + factor·(x − anchor) + offset``, floored and clamped to 0..255: the one form of
    brightness, contrast and saturation (so that a batch can pick its op per crop by
    ``anchor`` and ``offset`` alone and get the values each op gives)."""
    return (x - anchor).mul_(factor).add_(anchor).add_(offset).floor_().clamp_(0, 255)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, 0.0, factor, 0.5)


def contrast_center(mean_luma: torch.Tensor) -> torch.Tensor:
    """The grey level contrast scales around: the mean luma rounded (PIL's ImageEnhance)."""
    return torch.floor(mean_luma + 0.5).float()


def contrast(x: torch.Tensor, factor: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return blend(x, center, factor, 0.5)


def mean_luma(x: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Per-image mean luma in float64 (sums of integers: exact), dims kept for broadcasting."""
    return _mean_of_grey(luma(x, dim))


def _mean_of_grey(grey: torch.Tensor) -> torch.Tensor:
    pixels = grey.shape[-3] * grey.shape[-2] * grey.shape[-1]
    return grey.sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.float64) / pixels


def saturation(x: torch.Tensor, factor: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """PIL's blend truncates; truncation and floor differ only below 0, which the clamp maps
    to 0 either way (and floor is one vectorised pass, trunc many times slower on CPU)."""
    return blend(x, luma(x, dim), factor, 0.0)


def hue(x: torch.Tensor, shift: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Rotate the HSV hue H by ``shift`` turns, keeping V (max) and C (max − min): the output
    is ``min + C·pure(H)``, ``pure`` the fully saturated colour of hue H, rounded."""
    r, g, b = x.split(1, dim)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    inv = chroma.clamp(min=1).reciprocal_()  # C is 0 or ≥ 1 on whole numbers; C = 0 gives H = 0
    # 6H·C is g − b where R is the largest, else b − r + 2C where G is, else r − g + 4C. On
    # whole numbers max − channel is 0 for the largest channel and ≥ 1 elsewhere, so the
    # cases are selected by 0/1 float masks (a few cheap passes, where bool selects are slow).
    not_r, not_g = (maxc - r).clamp_(max=1), (maxc - g).clamp_(max=1)
    r_case, g_case = g - b, (b - r).add_(chroma, alpha=2)
    h = (r - g).add_(chroma, alpha=4).sub_(g_case).mul_(not_g).add_(g_case).sub_(r_case).mul_(not_r).add_(r_case)
    h = h.mul_(inv).add_(shift * 6.0)
    h.sub_(torch.floor(h * (1.0 / 6.0)).mul_(6.0))
    # pure-hue RGB in [0, 1]: R = clamp(|6H − 3| − 1), G = clamp(2 − |6H − 2|), B = clamp(2 − |6H − 4|)
    shape = [1] * x.dim()
    shape[dim] = 3
    center, sign, offset = (c.view(shape) for c in _hue_constants(x.device))
    pure = (h - center).abs_().mul_(sign).add_(offset).clamp_(0, 1)
    return torch.floor_(pure.mul_(chroma).add_(minc.add_(0.5)))


@functools.cache
def _hue_constants(device: torch.device) -> torch.Tensor:
    """Rows: centre, sign and offset of the pure-hue R, G, B ramps (made once per device)."""
    return torch.tensor([[3.0, 2.0, 4.0], [1.0, -1.0, -1.0], [-1.0, 2.0, 2.0]], device=device)


def blur_radius(sigma: float) -> int:
    """Half-width of the Gaussian taps of σ: ±ceil(3σ), at least 1."""
    return max(1, math.ceil(3 * sigma))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian taps over ±:func:`blur_radius` (float64 weights, normalised, then float32)."""
    radius = blur_radius(sigma)
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-(i * i) / (2 * sigma * sigma))
    return (w / w.sum()).float()


def gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    """:func:`gaussian_kernel` zero-padded to 2·radius + 1 taps; σ = 0: the identity tap.
    Zero taps add exact zeros, so an image blurred with its padded taps gets the values of its
    own kernel, and the identity gives the image back exactly."""
    kernel = gaussian_kernel(sigma) if sigma > 0 else torch.ones(1)
    assert len(kernel) <= 2 * radius + 1, f"σ={sigma} needs more than {radius} taps a side"
    return F.pad(kernel, (radius - len(kernel) // 2,) * 2)


def _blur_1d(x: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_i w_i · x shifted by i along ``dim`` (−1 or −2), edges replicated; weight is N×K
    (one row per image, broadcast over the other dims)."""
    radius = weight.shape[1] // 2
    size = x.shape[dim]
    pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
    padded = F.pad(x, pad, mode="replicate")
    w = weight.view(weight.shape[0], weight.shape[1], 1, 1, 1).unbind(1)
    out = padded.narrow(dim, radius, size) * w[radius]
    pair = torch.empty_like(out)  # one scratch buffer: a fresh tensor per pair costs more on a CPU
    for i in range(radius):  # symmetric taps: one product per pair
        out.add_(torch.add(padded.narrow(dim, i, size), padded.narrow(dim, 2 * radius - i, size), out=pair).mul_(w[i]))
    return out


def blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable blur of N×C×H×W float images, image i with the symmetric taps ``taps[i]``
    (N×K, K odd), as a sum of shifted copies (cheap for the 3-13 taps of σ in [0.1, 2])."""
    return _blur_1d(_blur_1d(x, taps, -1), taps, -2)


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """:func:`blur` of image i with σ = sigmas[i] (> 0); the taps span the largest σ of the
    batch, so an image blurred alone or in a batch gets the same values."""
    radius = max(blur_radius(s) for s in sigmas)
    return blur(x, torch.stack([gaussian_taps(s, radius) for s in sigmas]).to(x.device))


def round_levels(x: torch.Tensor) -> torch.Tensor:
    """Floats of 0..255 → the nearest whole level (halves up), in place."""
    return torch.floor_(x.add_(0.5)).clamp_(0, 255)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert values of 128 and above (PIL's ImageOps.solarize(threshold=128))."""
    return torch.where(x >= 128, 255.0 - x, x)


def normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], dim: int = -3) -> torch.Tensor:
    """0..255 floats → (x/255 − mean)/std in place (statistics along ``dim``), returned. In
    place because a fresh output of a batch's size costs more than the arithmetic on a CPU
    (its pages are faulted in on first touch: 4.2 against 0.19 ms for 8 crops of 224 px)."""
    shape = [1] * x.dim()
    shape[dim] = 3
    scale, shift = _normalize_affine(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    return x.mul_(scale.view(shape)).add_(shift.view(shape))


@functools.cache
def _normalize_affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1/(255·std) and −mean/std as float32 on ``device``, made once per statistics and device
    (no host-to-device copy per crop and step)."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    return (1 / (255 * s)).float().to(device), (-m / s).float().to(device)


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` (overwritten) where the N×1×1×1 0/1 float ``mask`` is 1, else ``old``, as
    ``old + mask·(new − old)``: exact on whole numbers, and plain arithmetic in place (a CPU
    runs bool selects several times slower, and a fresh tensor costs more than a pass)."""
    return new.sub_(old).mul_(mask).add_(old)


def _jitter_slot(x: torch.Tensor, p: torch.Tensor, slot: int, active: torch.Tensor) -> torch.Tensor:
    """The brightness, contrast or saturation each crop's ``slot`` of its order names, on the
    crops whose ``active`` (N×1×1×1 bool) is set; the other crops, and those whose slot holds
    the hue, get factor 1, which gives whole numbers back exactly. The three ops differ only
    in :func:`blend`'s anchor, factor and offset, picked per crop."""
    op = p[:, ORDER + slot].view(-1, 1, 1, 1)
    is_contrast, is_saturation = (op == 1).float(), (op == 2).float()
    grey = luma(x)  # N×1×H×W
    anchor = grey.mul(is_saturation).add_(contrast_center(_mean_of_grey(grey)).mul_(is_contrast))
    factors = p[:, BRIGHT : SATURATION + 1].gather(1, op.view(-1, 1).clamp(max=2).long()).view(-1, 1, 1, 1)
    factors = torch.where(active & (op != 3), factors, 1.0)
    return blend(x, anchor, factors, 0.5 - 0.5 * is_saturation)


def color_batch(u8: torch.Tensor, params: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The colour half of the recipe on a batch of same-size crops: N×3×H×W uint8 crops and
    N×(TAPS + K) parameter rows (columns above, then K blur taps) → normalised float32 crops.

    Nothing is read back to the host: each op runs on the whole batch and every crop keeps
    the result its row selects. A crop's jitter is its order's ops before its hue, the hue,
    then the ops after it, so the batch runs three jitter slots, one hue and three slots
    (the hue is the costly op). The blur multiplies each crop by its own taps (the identity
    for σ = 0); a single tap column means no crop of the recipe blurs."""
    x = u8.float()
    p = params.to(x.device, torch.float32)  # factors rounded to float32 as the workers path rounds them
    col = lambda j: p[:, j].view(-1, 1, 1, 1)  # noqa: E731
    jitter = col(JITTER) > 0
    hue_slot = (p[:, ORDER : ORDER + 4] == 3).float().argmax(1).view(-1, 1, 1, 1)
    for slot in range(3):
        x = _jitter_slot(x, p, slot, jitter & (hue_slot > slot))
    x = _select((jitter & (col(HUE) != 0)).float(), hue(x, col(HUE)), x)
    for slot in range(1, 4):
        x = _jitter_slot(x, p, slot, jitter & (hue_slot < slot))
    x = _select(col(GRAY), luma(x).expand_as(x).clone(), x)
    if p.shape[1] > TAPS + 1:
        x = round_levels(blur(x, p[:, TAPS:]))
    x = _select(col(SOLARIZE), solarize(x), x)
    return normalize_(x, mean, std)
