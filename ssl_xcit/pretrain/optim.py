"""Optimisation primitives of DINO as plain torch functions: parameter groups, per-tensor
gradient clipping, last-layer freezing and the teacher EMA."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

import torch
from torch import nn


def is_decayed(name: str, param: nn.Parameter, no_decay_patterns: Iterable[str]) -> bool:
    """The weight-decay rule of ssl-xcit.

    Not decayed: every bias and every 1-D tensor (LayerNorm/BatchNorm weights) as in DINO;
    the tensors the backbone itself declares free of decay (timm's ``no_weight_decay()``:
    ``cls_token`` and the ``pos_embed.*`` projection); and XCA's per-head ``temperature``,
    a scale of the attention logits that decay would drag towards 0 (flat attention), not
    a weight whose size regularisation controls. Everything else (linear and conv weights,
    the head's prototypes) is decayed.
    """
    if param.ndim <= 1 or name.endswith(".bias") or name.endswith("temperature"):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in no_decay_patterns)


def param_groups(model: nn.Module, backbone_prefix: str = "backbone.") -> list[dict]:
    """Two AdamW groups, ``decay`` (scheduled weight decay) and ``no_decay`` (weight decay 0).

    ``model`` is a MultiCropNet; the backbone's own ``no_weight_decay()`` names are
    matched under ``backbone_prefix``.
    """
    backbone = getattr(model, backbone_prefix.rstrip("."), None)
    declared = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    patterns = [backbone_prefix + p for p in declared]
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param, patterns) else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "apply_weight_decay": True},
        {"name": "no_decay", "params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


@torch.no_grad()
def clip_gradients_per_tensor(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale each gradient whose own L2 norm exceeds ``max_norm`` down to ``max_norm`` (DINO's rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def drop_gradients(module: nn.Module) -> None:
    """Remove the gradients of ``module`` so the optimizer leaves it (and its decay) untouched."""
    for param in module.parameters():
        param.grad = None


@torch.no_grad()
def ema_update(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, tensor by tensor."""
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
