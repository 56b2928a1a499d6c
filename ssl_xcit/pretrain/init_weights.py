"""``model.init``: a new pretraining run whose student and teacher start from trained weights.

Any file :mod:`ssl_xcit.weight_files` reads will do: an official DINO full checkpoint
(backbone, head, center), an official backbone-only checkpoint or timm weights (a classifier
is set aside and said so), an ssl-xcit ``.ckpt`` (backbone, head and ``loss_fn.center``) or
an exported ``.safetensors``.

The backbone must fit the configured one exactly: missing, unexpected or wrongly shaped keys
are listed in one UserError. The head is loaded when it fits; when only the last layer differs
(``out_dim``) the MLP is kept and the last layer re-initialised; otherwise (bottleneck,
width, depth) the whole head is re-initialised. The DINO center comes along only with a
fully loaded head. What happened is summed up in one line.

Everything here works on state dicts and modules: no Trainer is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ssl_xcit.weight_files import G, V, Tensors, WeightFile, fit_backbone, listed, read_weight_file


def describe_head(state: Tensors) -> str:
    """``out_dim K, bottleneck B, MLP in→hidden→B`` as read from a head's weights."""
    linears = sorted((int(k.split(".")[1]), v) for k, v in state.items()
                     if k.startswith("mlp.") and k.endswith(".weight") and v.dim() == 2)
    parts = []
    if V in state:
        parts.append(f"out_dim {state[V].shape[0]}, bottleneck {state[V].shape[1]}")
    if linears:
        parts.append("MLP " + "→".join(str(d) for d in [linears[0][1].shape[1]] + [w.shape[0] for _, w in linears]))
    return ", ".join(parts) or "no DINO head weights"


def _shapes(state: Tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def fit_head(head: nn.Module, state: Optional[Tensors]) -> tuple[Tensors, Optional[str]]:
    """What of ``state`` to load into ``head``, and why the rest is re-initialised (None: all fits).

    The MLP and the last layer are judged apart: a last layer of another ``out_dim`` is
    re-initialised under a loaded MLP; an MLP that does not fit (other bottleneck, width,
    depth or BatchNorm) re-initialises the whole head.
    """
    if not state:
        return {}, "no DINO head in the checkpoint: head randomly initialised"
    want = _shapes(head.state_dict())
    got = _shapes(state)
    part = lambda shapes, mlp: {k: s for k, s in shapes.items() if k.startswith("mlp.") == mlp}  # noqa: E731
    mlp_fits = part(got, True) == part(want, True)
    last_fits = part(got, False) == part(want, False)
    if mlp_fits and last_fits:
        return dict(state), None
    ours, theirs = describe_head(head.state_dict()), describe_head(state)
    if mlp_fits:
        return ({k: v for k, v in state.items() if k.startswith("mlp.")},
                f"last layer re-initialised, MLP loaded (checkpoint head: {theirs}; config: {ours})")
    return {}, f"head re-initialised (checkpoint head: {theirs}; config: {ours})"


@torch.no_grad()
def initialise(student: nn.Module, teacher: nn.Module, center: torch.Tensor, init: WeightFile,
               norm_last_layer: bool = False) -> str:
    """Load ``init`` into the student, copy the student into the teacher, set ``center`` in
    place; returns the one-line summary. Both nets must be ``MultiCropNet(backbone, head)``."""
    student.backbone.load_state_dict(fit_backbone(student.backbone, init.backbone, init.source, "model.init",
                                                  "model.arch"))
    to_load, head_note = fit_head(student.head, init.head)
    student.head.load_state_dict(to_load, strict=not head_note)
    teacher.load_state_dict(student.state_dict())
    notes = ["backbone loaded", head_note or "head loaded"]
    if head_note is None and init.center is not None and tuple(init.center.shape) == tuple(center.shape):
        center.copy_(init.center)
        notes.append("center loaded")
    elif init.center is not None:
        notes.append(f"center of shape {tuple(init.center.shape)} not used: starts at 0")
    else:
        notes.append("no center in the checkpoint: starts at 0")
    if head_note is None and norm_last_layer and not torch.all(to_load[G] == 1):
        notes.append("model.norm_last_layer: the loaded prototype norms stay frozen as they are")
    if init.set_aside:
        notes.append(f"not used: {listed(init.set_aside)}")
    return f"model.init: student and teacher start from {init.source}: " + "; ".join(notes)


def init_module(module: nn.Module, path: str | Path, which: str = "teacher") -> str:
    """:func:`initialise` a :class:`~ssl_xcit.pretrain.module.DINOModule` from a file."""
    weights = read_weight_file(path, which, "model.init")
    return initialise(module.student, module.teacher, module.loss_fn.center, weights, module.cfg.model.norm_last_layer)
