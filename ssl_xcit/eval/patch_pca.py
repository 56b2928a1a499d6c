"""Patch features as colours: the first three principal components of the last XCA block's
patch tokens, over a set of images, shown as RGB with the background masked (the picture
DINOv2 made popular, arXiv 2304.07193, Fig. 1).

The first component of self-supervised patch features usually separates the main object
from the background. Its sign is arbitrary: the side that covers more of the image border
is taken as background. A second PCA over the foreground patches of all images gives the
three colours, so that matching parts of different images get matching colours.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def last_block_patch_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → (B, H/p, W/p, C): the last XCA block's patch tokens, with the final norm."""
    features = backbone.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)[-1]
    return features.permute(0, 2, 3, 1)  # (B, C, h, w) → (B, h, w, C)


def principal_components(x: torch.Tensor, k: int) -> torch.Tensor:
    """(M, C) → (M, k): ``x`` centred and projected on its first ``k`` principal axes."""
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    return (centred.double() @ vh[:k].T).float()


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Each column mapped to [0, 1] (a constant column to 0)."""
    low, high = x.min(dim=0).values, x.max(dim=0).values
    return (x - low) / (high - low).clamp_min(1e-12)


def foreground(features: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, h, w, C) → boolean (B, h, w): patches above ``threshold`` on the first principal
    component (scaled to [0, 1]), its sign chosen so that the image border is background."""
    b, h, w, c = features.shape
    first = _unit_range(principal_components(features.reshape(-1, c), 1))[:, 0].reshape(b, h, w)
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    if h > 2 and w > 2 and first[:, border].mean() > first[:, ~border].mean():
        first = 1 - first
    return first > threshold


def pca_colours(features: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, h, w, C) → (B, h, w, 3) in [0, 1]: the first three principal components of the
    foreground patches of all images as RGB; background patches black."""
    b, h, w, c = features.shape
    mask = foreground(features, threshold)
    if not mask.any():  # nothing stands out: colour every patch
        mask = torch.ones_like(mask)
    colours = torch.zeros(b, h, w, 3)
    colours[mask] = _unit_range(principal_components(features[mask], 3))
    return colours
