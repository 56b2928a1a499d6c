"""XCiT's class-attention maps: where the class token looks, per head (arXiv 2106.09681, Sec. 3.3).

XCiT's last blocks are CaiT-style class attention: the class token's query meets the keys
of every token, one softmax per head. That row, restricted to the patch tokens and laid on
the patch grid, is the map DINO made famous; XCiT has no fixed grid, so any input whose
sides are multiples of the patch size gives one.

The attention is read from timm's own module without copying its forward: a pre-forward
hook on the last class-attention block's ``attn`` catches the normalised tokens it is
given, and the row is recomputed from that module's ``q`` and ``k`` projections and scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit.backbones import patch_size


def last_class_attention(backbone: nn.Module) -> nn.Module:
    """The ``attn`` (timm ``ClassAttn``) of the last class-attention block of a timm XCiT."""
    blocks = getattr(backbone, "cls_attn_blocks", None)
    if not blocks:
        raise ValueError(f"{type(backbone).__name__} has no class-attention blocks")
    return blocks[-1].attn


def class_token_attention(attn: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(q_cls · k_j / sqrt(d_head)) over every token j, per head.

    Args:
        attn: a timm ``ClassAttn`` (``q``, ``k`` projections, ``num_heads``, ``scale``).
        tokens: (B, 1 + N, C) the tokens it receives (class token first, already normalised).

    Returns:
        (B, heads, 1 + N): each row sums to 1; column 0 is the class token itself.
    """
    b, n, c = tokens.shape
    heads = attn.num_heads
    q = attn.q(tokens[:, 0]).reshape(b, heads, 1, c // heads)  # (B, h, 1, d)
    k = attn.k(tokens).reshape(b, n, heads, c // heads).transpose(1, 2)  # (B, h, 1+N, d)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).squeeze(2)


@torch.no_grad()
def class_attention_maps(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-head maps of the class token's attention to the patches, on the patch grid.

    Args:
        backbone: a timm XCiT (eval mode).
        images: (B, 3, H, W), H and W multiples of the patch size.

    Returns:
        (B, heads, H / p, W / p): each head's attention to the patches, renormalised to sum
        to 1 over the patches (the share the class token keeps for itself is left out).
    """
    p = patch_size(backbone)
    height, width = images.shape[-2:]
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    caught: list[torch.Tensor] = []
    attn = last_class_attention(backbone)
    handle = attn.register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    try:
        backbone(images)
    finally:
        handle.remove()
    row = class_token_attention(attn, caught[-1])[:, :, 1:]  # (B, h, N)
    row = row / row.sum(dim=-1, keepdim=True)
    return row.reshape(*row.shape[:2], height // p, width // p)


def mass_mask(maps: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """DINO's thresholded mask: per map, the fewest highest-attention patches that together
    hold at least ``keep`` of the attention mass.

    Args:
        maps: (..., h, w) non-negative maps (each summing to 1, or any positive total).
        keep: share of the mass to keep, in (0, 1].

    Returns:
        Boolean (..., h, w).
    """
    flat = maps.flatten(-2)
    flat = flat / flat.sum(dim=-1, keepdim=True)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(dim=-1) - values  # mass of the patches ranked above each one
    keep_sorted = before < keep
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return mask.reshape(maps.shape)


def upsample(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, h, w) → (B, C, h·factor, w·factor), each patch a block of equal pixels."""
    return F.interpolate(maps.float(), scale_factor=factor, mode="nearest")
