"""``model.init``: a new pretraining run whose student and teacher start from trained weights.

Understood sources (``read_init_checkpoint``):

* an official DINO full checkpoint (``{"student": ..., "teacher": ..., "dino_loss": {"center"}}``,
  keys ``module.backbone.*`` / ``module.head.*``, XCiT's ``pos_embeder`` and fused
  class-attention ``qkv``, the head's last layer in torch.nn.utils.weight_norm naming
  ``last_layer.weight_g`` / ``last_layer.weight_v``);
* an official backbone-only checkpoint or timm weights given as a file (a state dict,
  possibly under ``model`` / ``state_dict``; a classifier ``head.weight`` / ``head.bias`` is
  set aside and said so);
* an ssl-xcit checkpoint (``.ckpt``: backbone, head and ``loss_fn.center``);
* an exported backbone (``.safetensors``).

Backbone keys are mapped to timm's naming by :func:`ssl_xcit.weights.official_to_timm` and
must fit the configured backbone exactly: missing, unexpected or wrongly shaped keys are
listed in one UserError. The head is loaded when it fits; when only the last layer differs
(``out_dim``) the MLP is kept and the last layer re-initialised; otherwise (bottleneck,
width, depth) the whole head is re-initialised. The DINO center comes along only with a
fully loaded head. What happened is summed up in one line.

Everything here works on state dicts and modules: no Trainer is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ssl_xcit.errors import UserError
from ssl_xcit.weights import is_run_checkpoint, official_to_timm, read_checkpoint

G, V = "last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"
Tensors = dict[str, torch.Tensor]


@dataclass
class InitWeights:
    """What a checkpoint offers to start a run from, before it is fitted to the model."""

    source: str
    backbone: Tensors
    """Backbone weights, prefixes stripped (possibly still in the official naming)."""
    head: Optional[Tensors] = None
    """DINO head weights in :class:`~ssl_xcit.pretrain.head.DINOHead` naming, or None."""
    center: Optional[torch.Tensor] = None
    """The DINO center (1, out_dim) saved with that head, or None."""
    set_aside: list[str] = field(default_factory=list)
    """Keys that belong to neither (a supervised classifier), named in the summary."""


def dino_head_state(state: Tensors) -> Tensors:
    """A DINO head's weights renamed for :class:`DINOHead`.

    DINO's ``nn.utils.weight_norm`` names ``weight_g`` / ``weight_v`` become the
    parametrization's ``original0`` / ``original1`` (same tensors: w = g · v / ‖v‖ per row);
    a one-layer MLP (``mlp.weight``, a bare Linear in DINO) becomes ``mlp.0.*``; a plain
    ``last_layer.weight`` is split into g = ‖w‖ per row and v = w. Our own naming passes.
    """
    out: Tensors = {}
    for key, value in state.items():
        if key == "last_layer.weight_g":
            key = G
        elif key == "last_layer.weight_v":
            key = V
        elif key in ("mlp.weight", "mlp.bias"):
            key = "mlp.0." + key.split(".")[1]
        out[key] = value
    if "last_layer.weight" in out and G not in out and V not in out:
        weight = out.pop("last_layer.weight")
        out[G], out[V] = weight.norm(dim=1, keepdim=True), weight
    return out


def _tensors(state: Any, path: Path) -> Tensors:
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.init: {path} holds no state dict of tensors where one was expected")
    return state


def split_backbone_and_head(state: Tensors, source: str) -> InitWeights:
    """One network's state dict (``module.`` / ``backbone.`` / ``head.`` prefixes optional)
    → backbone weights and, when ``head.mlp.*`` / ``head.last_layer.*`` are there, a DINO head.
    Other ``head.*`` keys (a classifier) are set aside."""
    backbone: Tensors = {}
    head: Tensors = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith("head."):
            head[key[len("head."):]] = value
        else:
            backbone[key[len("backbone."):] if key.startswith("backbone.") else key] = value
    is_dino_head = any(k.startswith(("mlp.", "last_layer.")) for k in head)
    if head and not is_dino_head:
        return InitWeights(source, backbone, set_aside=sorted(f"head.{k}" for k in head))
    return InitWeights(source, backbone, dino_head_state(head) if head else None)


def _from_lightning(path: Path, ckpt: dict[str, Any], which: str) -> InitWeights:
    state = ckpt["state_dict"]
    if not any(k.startswith(f"{which}.backbone.") for k in state):
        raise UserError(f"model.init: {path} is a Lightning checkpoint without '{which}.backbone.*' weights")
    prefix = f"{which}."
    init = split_backbone_and_head({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                   f"{path}:{which}")
    init.center = state.get("loss_fn.center")
    return init


def _from_official_full(path: Path, ckpt: dict[str, Any], which: str) -> InitWeights:
    init = split_backbone_and_head(_tensors(ckpt[which], path), f"{path}:{which}")
    dino_loss = ckpt.get("dino_loss")
    if isinstance(dino_loss, dict) and isinstance(dino_loss.get("center"), torch.Tensor):
        init.center = dino_loss["center"]
    return init


def read_init_checkpoint(path: str | Path, which: str = "teacher") -> InitWeights:
    """The weights a ``model.init`` file offers (see the module docstring); ``which`` picks
    the teacher or the student of a checkpoint that holds both."""
    path, ckpt = read_checkpoint(path, "model.init", which)
    if ckpt is None:
        from safetensors.torch import load_file

        return split_backbone_and_head(load_file(str(path)), str(path))
    if is_run_checkpoint(ckpt):
        return _from_lightning(path, ckpt, which)
    if "teacher" in ckpt or "student" in ckpt:
        if not isinstance(ckpt.get(which), dict):
            raise UserError(f"model.init: {path} has no '{which}' weights (model.init_which); it has {sorted(ckpt)}")
        return _from_official_full(path, ckpt, which)
    state = ckpt.get("model") or ckpt.get("state_dict") or ckpt
    return split_backbone_and_head(_tensors(state, path), str(path))


def _listed(keys: list[str], n: int = 6) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def fit_backbone(backbone: nn.Module, state: Tensors, source: str) -> Tensors:
    """``state`` in timm's naming for ``backbone``, checked key by key and shape by shape.

    Raises:
        UserError: listing the missing, unexpected and wrongly shaped keys.
    """
    try:
        mapped = official_to_timm(dict(state), backbone)
    except UserError as err:
        raise UserError(f"model.init: {source}: {err}") from err
    want = backbone.state_dict()
    missing = [k for k in want if k not in mapped]
    unexpected = [k for k in mapped if k not in want]
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(want[k].shape)}"
             for k in want if k in mapped and mapped[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"model.init: {source} does not fit the backbone of model.arch (missing keys: {_listed(missing)}; "
            f"unexpected keys: {_listed(unexpected)}; wrong shapes (checkpoint vs model): {_listed(wrong)})"
        )
    return mapped


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
def initialise(student: nn.Module, teacher: nn.Module, center: torch.Tensor, init: InitWeights,
               norm_last_layer: bool = False) -> str:
    """Load ``init`` into the student, copy the student into the teacher, set ``center`` in
    place; returns the one-line summary. Both nets must be ``MultiCropNet(backbone, head)``."""
    student.backbone.load_state_dict(fit_backbone(student.backbone, init.backbone, init.source))
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
        notes.append(f"not used: {_listed(init.set_aside)}")
    return f"model.init: student and teacher start from {init.source}: " + "; ".join(notes)


def init_module(module: nn.Module, path: str | Path, which: str = "teacher") -> str:
    """:func:`initialise` a :class:`~ssl_xcit.pretrain.module.DINOModule` from a file."""
    return initialise(module.student, module.teacher, module.loss_fn.center, read_init_checkpoint(path, which),
                      module.cfg.model.norm_last_layer)
