"""XCiT backbones from timm and the multi-crop wrapper that pairs one with a head."""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from torch import nn

from ssl_xcit.errors import UserError

COMPILED_VARIANTS = 16  # graphs per block class that compile_blocks lets dynamo keep (a run needs up to 10)


def xcit_names() -> list[str]:
    """Every XCiT architecture timm registers."""
    return timm.list_models("xcit_*")


def build_backbone(arch: str, drop_path_rate: float = 0.0, **overrides: Any) -> nn.Module:
    """A randomly initialised timm XCiT without classifier; its output is the CLS embedding.

    The output of ``model(x)`` is the class token after the class-attention layers and the
    final norm, shape (B, embed_dim). No weights are downloaded.

    Raises:
        UserError: ``arch`` is not an XCiT known to timm, or an override is not accepted.
    """
    if arch not in xcit_names():
        raise UserError(f"model.arch: unknown XCiT architecture '{arch}' (timm knows: {', '.join(xcit_names())})")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **overrides)
    except TypeError as err:
        raise UserError(f"model.backbone_kwargs: {err}") from err


def compile_blocks(backbone: nn.Module, **options: Any) -> nn.Module:
    """Compile each transformer block of a timm XCiT in place (regional compilation); returns it.

    Every XCA block (``backbone.blocks``) and class-attention block (``cls_attn_blocks``)
    gets ``Module.compile(dynamic=False, **options)``. Dynamo keys its compiled code by the
    block class's forward and guards on the block's attributes and inputs, not on which
    block it is, so the blocks of one class share one graph per input shape, dtype, grad
    mode and train/eval mode: the graphs, and the cold-compile time, do not grow with depth.
    Per class a run needs up to 10: the student at 2 crop sizes and the teacher at the
    global size, each twice under bf16 autocast (the first XCA block gets the bf16 patch
    embedding, the others the float32 residual stream), and the k-NN monitor's eval shapes
    (its batch and its last one); dynamo's default of 8 is raised to
    :data:`COMPILED_VARIANTS`, past which it would run a block eagerly. The patch embedding,
    positional encoding and final norm stay eager. Modules and parameters are the same
    objects, so names, ``state_dict`` keys, checkpoints and an EMA over ``parameters()`` are
    unchanged.
    """
    from ssl_xcit.compat import allow_compiled_variants  # here: compat imports Lightning, which timm users need not

    allow_compiled_variants(COMPILED_VARIANTS)
    for block in [*backbone.blocks, *(backbone.cls_attn_blocks or [])]:
        block.compile(dynamic=False, **options)
    return backbone


def patch_size(backbone: nn.Module) -> int:
    """The patch size of a timm XCiT (8 or 16)."""
    size = backbone.patch_embed.patch_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


class MultiCropNet(nn.Module):
    """Backbone + head over crops of several resolutions.

    Crops of one resolution are concatenated and go through the backbone in one forward;
    the head then runs once on every embedding. DINO's crops come grouped (globals first,
    then locals), so this is two backbone forwards per step.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """V crops, each (B, 3, H_v, W_v) → backbone embeddings (V * B, D), view-major."""
        return torch.cat([self.backbone(torch.cat(group)) for group in _resolution_groups(crops)])

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """V crops, each (B, 3, H_v, W_v) → logits (V * B, out_dim), view-major."""
        return self.head(self.embed(crops))


def _resolution_groups(crops: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split a list of crops into runs of consecutive crops with the same spatial size."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return groups
