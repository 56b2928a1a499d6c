"""Optimisation primitives of DINO as plain torch functions: parameter groups, gradient norms
and per-tensor clipping, last-layer freezing and the teacher EMA.

A step can be skipped without a host sync: :func:`gradient_norms` says on the device whether
every gradient is finite, and the EMA (here), the center (the loss) and the optimizer
(:func:`ssl_xcit.compat.skip_optimizer_step_if`) take that 0-d flag instead of a Python bool.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Literal, Optional, Sequence

import torch
from torch import nn

DecayRule = Literal["dino", "xcit"]


def is_decayed(name: str, param: nn.Parameter, rule: DecayRule = "dino", no_decay_patterns: Iterable[str] = ()) -> bool:
    """Whether weight decay applies to parameter ``name``.

    ``dino``: DINO's rule (its ``get_params_groups``): every tensor is decayed but biases and
    1-D tensors (norm weights). ``xcit``: that rule, and also not the tensors the backbone
    declares free of decay (timm's ``no_weight_decay()``, given as ``no_decay_patterns``:
    ``cls_token`` and the ``pos_embed.*`` projection) nor XCA's per-head ``temperature``,
    a scale of the attention logits that decay would drag towards 0 (flat attention).
    """
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    if rule == "dino":
        return True
    if name.endswith("temperature"):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in no_decay_patterns)


def param_groups(model: nn.Module, rule: DecayRule = "dino", backbone_prefix: str = "backbone.") -> list[dict]:
    """Two AdamW groups, ``decay`` (scheduled weight decay) and ``no_decay`` (weight decay 0),
    of the trainable parameters of ``model`` (a MultiCropNet), split by :func:`is_decayed`."""
    backbone = getattr(model, backbone_prefix.rstrip("."), None)
    declared = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    patterns = [backbone_prefix + p for p in declared]
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param, rule, patterns) else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "apply_weight_decay": True},
        {"name": "no_decay", "params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


@torch.no_grad()
def gradient_norms(params: Iterable[nn.Parameter]) -> Optional[torch.Tensor]:
    """The L2 norm of each parameter's gradient, as one 1-D tensor on the device (None when
    no parameter has one). ``norms.isfinite().all()`` is whether the step may be taken."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack([n.float() for n in torch._foreach_norm(grads)])


@torch.no_grad()
def clip_gradients_per_tensor(params: Sequence[nn.Parameter], max_norm: float, norms: torch.Tensor) -> None:
    """Scale each gradient whose own L2 norm (``norms``, from :func:`gradient_norms` over the same
    ``params``) exceeds ``max_norm`` down to ``max_norm`` (DINO's rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    scales = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(scales.unbind(), grads)])


def drop_gradients(module: nn.Module) -> None:
    """Remove the gradients of ``module`` so the optimizer leaves it (and its decay) untouched."""
    for param in module.parameters():
        param.grad = None


@torch.no_grad()
def ema_update(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float,
    skip: Optional[torch.Tensor] = None,
) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, tensor by tensor; with
    ``skip`` (a 0-d bool tensor) true, the teacher is left as it is, decided on the device."""
    if skip is None:
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - momentum))
        return
    keep = torch.where(skip, 1.0, momentum)  # 0-d float32: momentum rounded as a Python float would be
    mix = torch.where(skip, 0.0, 1.0 - momentum)
    torch._foreach_mul_(teacher, keep)
    torch._foreach_add_(teacher, torch._foreach_mul(student, mix))


class BufferRollback:
    """Puts buffers the forward pass moved (BatchNorm's running statistics and batch counts)
    back as they were before the step when the step is skipped, decided on the device: a
    non-finite forward must not leave NaN statistics for evaluation to use.

    Args:
        buffers: the tensors to guard (e.g. every buffer of the student and the teacher).
    """

    def __init__(self, buffers: Sequence[torch.Tensor]) -> None:
        self.buffers = list(buffers)
        self.saved = [b.clone() for b in self.buffers]

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the buffers as they are now (before the step's forward)."""
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    @torch.no_grad()
    def restore_if(self, skip: torch.Tensor) -> None:
        """Back to the snapshot where the 0-d bool ``skip`` is true; unchanged otherwise."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, [torch.where(skip, s, b) for s, b in zip(self.saved, self.buffers)])
