"""Every file of trained weights ssl-xcit reads, read into one form: :class:`WeightFile`.

Understood forms (:func:`read_weight_file`):

* an ssl-xcit checkpoint (``.ckpt``, Lightning): ``{which}.backbone.*``, ``{which}.head.*``,
  ``loss_fn.center`` and the run's config (architecture, timm overrides, normalisation);
* an official DINO full checkpoint (``{"student": ..., "teacher": ..., "dino_loss": {"center"}}``)
  or a teacher-only one (``{"teacher": ...}``): keys ``module.backbone.*`` / ``module.head.*``,
  XCiT's ``pos_embeder`` and fused class-attention ``qkv``, the head's last layer in
  ``torch.nn.utils.weight_norm`` naming (``last_layer.weight_g`` / ``last_layer.weight_v``);
* an official backbone-only checkpoint or timm weights (a state dict, possibly under
  ``model`` / ``state_dict``; a classifier ``head.weight`` / ``head.bias`` is set aside);
* an exported backbone (``.safetensors``; its metadata names architecture and normalisation).

The backbone comes out in timm's naming and the head in
:class:`~ssl_xcit.pretrain.head.DINOHead`'s, whatever the file used; :func:`fit_backbone`
then checks them against a model key by key and shape by shape. Callers name the option
the file came from (``--checkpoint``, ``model.init``), and every error names it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ssl_xcit.errors import UserError

Tensors = dict[str, torch.Tensor]
G, V = "last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"
"""DINOHead's last layer: weight-norm magnitude g (out_dim, 1) and direction v (out_dim, bottleneck)."""
_FUSED_QKV = re.compile(r"(cls_attn_blocks\.\d+\.attn\.)qkv\.(weight|bias)")


@dataclass
class WeightFile:
    """What a weights file holds, in the naming of the models it is loaded into."""

    source: str
    """The file, with ``:teacher`` / ``:student`` when one network of several was taken."""
    backbone: Tensors
    """Backbone weights in timm's XCiT naming."""
    head: Optional[Tensors] = None
    """DINO head weights in :class:`~ssl_xcit.pretrain.head.DINOHead` naming, or None."""
    center: Optional[torch.Tensor] = None
    """The DINO center (1, out_dim) saved with that head, or None."""
    arch: Optional[str] = None
    """The timm architecture, where the file names it (ssl-xcit checkpoints and exports)."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """timm keyword overrides the backbone was built with (e.g. {depth: 6})."""
    mean: Optional[tuple[float, ...]] = None
    """Normalisation the backbone was trained with, where the file records it."""
    std: Optional[tuple[float, ...]] = None
    global_step: Optional[int] = None
    set_aside: list[str] = field(default_factory=list)
    """Keys that are neither backbone nor DINO head (a supervised classifier)."""


def official_to_timm(state: Tensors) -> Tensors:
    """Backbone keys of the original XCiT code renamed for timm: ``pos_embeder.*`` →
    ``pos_embed.*``, and each class-attention block's fused ``qkv`` (3·D rows: q, k, v
    stacked) split into timm's ``q``, ``k``, ``v``. Keys already in timm's naming pass."""
    out: Tensors = {}
    for key, value in state.items():
        fused = _FUSED_QKV.fullmatch(key)
        if fused:
            block, kind = fused.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{block}{name}.{kind}"] = part
        else:
            out[re.sub(r"^pos_embeder\.", "pos_embed.", key)] = value
    return out


def dino_head_state(state: Tensors) -> Tensors:
    """A DINO head's weights renamed for :class:`DINOHead`.

    DINO's ``nn.utils.weight_norm`` names ``weight_g`` / ``weight_v`` become the
    parametrization's ``original0`` / ``original1`` (same tensors: w = g · v / ‖v‖ per row);
    a one-layer MLP (``mlp.weight``, a bare Linear in DINO) becomes ``mlp.0.*``; a plain
    ``last_layer.weight`` is split into g = ‖w‖ per row and v = w. Our own naming passes.
    """
    renamed = {"last_layer.weight_g": G, "last_layer.weight_v": V,
               "mlp.weight": "mlp.0.weight", "mlp.bias": "mlp.0.bias"}
    out = {renamed.get(key, key): value for key, value in state.items()}
    if "last_layer.weight" in out and G not in out and V not in out:
        weight = out.pop("last_layer.weight")
        out[G], out[V] = weight.norm(dim=1, keepdim=True), weight
    return out


def split_backbone_and_head(state: Tensors, source: str) -> WeightFile:
    """One network's state dict (``module.`` / ``backbone.`` / ``head.`` prefixes optional)
    → backbone weights (timm naming) and, when ``head.mlp.*`` / ``head.last_layer.*`` are
    there, a DINO head. Other ``head.*`` keys (a classifier) are set aside."""
    backbone: Tensors = {}
    head: Tensors = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("head."):
            head[key.removeprefix("head.")] = value
        else:
            backbone[key.removeprefix("backbone.")] = value
    backbone = official_to_timm(backbone)
    if head and not any(k.startswith(("mlp.", "last_layer.")) for k in head):
        return WeightFile(source, backbone, set_aside=sorted(f"head.{k}" for k in head))
    return WeightFile(source, backbone, dino_head_state(head) if head else None)


def _tensors(state: Any, path: Path, option: str) -> Tensors:
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{option}: {path} holds no state dict of tensors where one was expected")
    return state


def _which_option(option: str) -> str:
    """The option that picks teacher or student beside ``option`` (--which, model.init_which)."""
    return "--which" if option.startswith("--") else f"{option}_which"


def _from_safetensors(path: Path) -> WeightFile:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    weights = split_backbone_and_head(load_file(str(path)), str(path))
    weights.arch = meta.get("arch")
    weights.backbone_kwargs = json.loads(meta.get("backbone_kwargs", "{}"))
    weights.mean = tuple(json.loads(meta["mean"])) if "mean" in meta else None
    weights.std = tuple(json.loads(meta["std"])) if "std" in meta else None
    return weights


def _from_lightning(path: Path, ckpt: dict[str, Any], which: str, option: str) -> WeightFile:
    state = ckpt["state_dict"]
    if not any(k.startswith(f"{which}.backbone.") for k in state):
        raise UserError(f"{option}: {path} is a Lightning checkpoint without '{which}.backbone.*' weights")
    prefix = f"{which}."
    weights = split_backbone_and_head({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                      f"{path}:{which}")
    weights.center = state.get("loss_fn.center")
    weights.global_step = ckpt.get("global_step")
    config = ckpt["hyper_parameters"].get("config") or {}
    model, augment = config.get("model", {}), config.get("augment", {})
    weights.arch = model.get("arch")
    weights.backbone_kwargs = dict(model.get("backbone_kwargs") or {})
    weights.mean = tuple(augment["mean"]) if "mean" in augment else None
    weights.std = tuple(augment["std"]) if "std" in augment else None
    return weights


def _from_official_networks(path: Path, ckpt: dict[str, Any], which: str, option: str) -> WeightFile:
    if not isinstance(ckpt.get(which), dict):
        raise UserError(f"{option}: {path} has no '{which}' weights ({_which_option(option)}); it has {sorted(ckpt)}")
    weights = split_backbone_and_head(_tensors(ckpt[which], path, option), f"{path}:{which}")
    dino_loss = ckpt.get("dino_loss")
    if isinstance(dino_loss, dict) and isinstance(dino_loss.get("center"), torch.Tensor):
        weights.center = dino_loss["center"]
    return weights


def read_weight_file(path: str | Path, which: str, option: str) -> WeightFile:
    """The weights ``path`` holds (see the module docstring); ``which`` picks the teacher or
    the student of a file holding both. Errors name ``option``.

    Raises:
        UserError: a missing or unreadable file, one that holds no state dict, ``which`` not
            teacher/student or absent from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}: {path} does not exist")
    if which not in ("teacher", "student"):
        raise UserError(f"{_which_option(option)}: expected teacher or student, got {which}")
    if path.suffix == ".safetensors":
        return _from_safetensors(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"{option}: cannot read {path}: {err}") from err
    if not isinstance(ckpt, dict):
        raise UserError(f"{option}: {path} does not hold a state dict")
    if "state_dict" in ckpt and "hyper_parameters" in ckpt:
        return _from_lightning(path, ckpt, which, option)
    if "teacher" in ckpt or "student" in ckpt:
        return _from_official_networks(path, ckpt, which, option)
    state = ckpt.get("model") or ckpt.get("state_dict") or ckpt
    return split_backbone_and_head(_tensors(state, path, option), str(path))


def listed(keys: list[str], n: int = 6) -> str:
    """``[a, b, c] (+N more)``, or 'none': key lists in one-line errors."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def fit_backbone(backbone: nn.Module, state: Tensors, source: str, option: str, arch: str) -> Tensors:
    """``state`` (timm naming) checked against ``backbone`` key by key and shape by shape.

    ``arch`` says in the error where the backbone's architecture came from (``model.arch``,
    or the architecture's name).

    Raises:
        UserError: listing the missing, unexpected and wrongly shaped keys.
    """
    want = backbone.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}"
             for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"{option}: {source} does not fit the backbone of {arch} (missing keys: {listed(missing)}; "
            f"unexpected keys: {listed(unexpected)}; wrong shapes (checkpoint vs model): {listed(wrong)})"
        )
    return state
