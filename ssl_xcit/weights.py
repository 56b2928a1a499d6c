"""Loading a trained backbone from any checkpoint users hold, and exporting it for timm.

Three sources are understood:

* an ssl-xcit checkpoint (``.ckpt``): its config names the architecture; the teacher
  backbone is taken by default (DINO evaluates the teacher), the student on request;
* an exported backbone (``.safetensors`` written by :func:`export_backbone`), whose
  metadata names the architecture;
* an official DINO/XCiT checkpoint (``.pth``): a dict with ``teacher``/``student`` (or
  ``model``/``state_dict``) whose keys carry ``module.``/``backbone.`` prefixes and the
  original naming (``pos_embeder``, fused class-attention ``qkv``); timm's XCiT filter
  maps the naming. The architecture must be given (``--arch``).

``random`` stands for a randomly initialised backbone of ``--arch``: the floor against
which every learned feature is judged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.xcit import checkpoint_filter_fn
from torch import nn

from ssl_xcit.backbones import build_backbone
from ssl_xcit.errors import UserError
from ssl_xcit.files import atomic_write

IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
RANDOM = "random"  # --checkpoint random: a randomly initialised backbone


@dataclass
class LoadedBackbone:
    """A backbone in eval mode with what is known of how it was trained."""

    model: nn.Module
    arch: str
    source: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict)


def _strip_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def official_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Backbone weights in the original DINO/XCiT layout (``module.``/``backbone.`` prefixes,
    ``pos_embeder``, fused class-attention ``qkv``) renamed for the timm ``model``; keys
    already in timm's naming pass unchanged. Raises UserError when the class-attention
    blocks do not match the model's."""
    try:
        return checkpoint_filter_fn(_strip_prefixes(state, ("module.", "backbone.")), model)
    except KeyError as err:
        raise UserError(f"class-attention weights {err} missing: the checkpoint has other blocks than the model") from err


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise UserError(
            f"{path}: does not fit the backbone (missing keys: {missing[:5] or 'none'}"
            f"{' ...' if len(missing) > 5 else ''}; unexpected keys: {result.unexpected_keys[:5] or 'none'}"
            f"{' ...' if len(result.unexpected_keys) > 5 else ''})"
        )


def _from_lightning(path: Path, ckpt: dict[str, Any], which: str) -> LoadedBackbone:
    config = ckpt.get("hyper_parameters", {}).get("config")
    if config is None:
        raise UserError(f"{path}: a Lightning checkpoint without an ssl-xcit config")
    prefix = f"{which}.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise UserError(f"{path}: no '{prefix}*' weights in the checkpoint")
    arch = config["model"]["arch"]
    model = build_backbone(arch, 0.0, **config["model"]["backbone_kwargs"])
    _load_strict(model, state, path)
    augment = config.get("augment", {})
    return LoadedBackbone(model, arch, f"{path}:{which}", tuple(augment.get("mean", IMAGENET_MEAN)),
                          tuple(augment.get("std", IMAGENET_STD)),
                          {"backbone_kwargs": config["model"]["backbone_kwargs"], "global_step": ckpt.get("global_step")})


def _from_safetensors(path: Path, arch: Optional[str]) -> LoadedBackbone:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    arch = arch or meta.get("arch")
    if not arch:
        raise UserError(f"{path}: no architecture in its metadata; pass --arch")
    kwargs = json.loads(meta.get("backbone_kwargs", "{}"))
    model = build_backbone(arch, 0.0, **kwargs)
    _load_strict(model, load_file(str(path)), path)
    mean = tuple(json.loads(meta["mean"])) if "mean" in meta else IMAGENET_MEAN
    std = tuple(json.loads(meta["std"])) if "std" in meta else IMAGENET_STD
    return LoadedBackbone(model, arch, str(path), mean, std, {"backbone_kwargs": kwargs})


def _from_official(path: Path, ckpt: dict[str, Any], which: str, arch: Optional[str]) -> LoadedBackbone:
    if not arch:
        raise UserError(f"{path}: an official DINO/XCiT checkpoint does not name its architecture; pass --arch")
    state = ckpt.get(which) or ckpt.get("model") or ckpt.get("state_dict") or ckpt
    state = {k: v for k, v in _strip_prefixes(state, ("module.", "backbone.")).items() if not k.startswith("head.")}
    model = build_backbone(arch, 0.0)
    _load_strict(model, official_to_timm(state, model), path)
    return LoadedBackbone(model, arch, f"{path}:{which}")


def random_backbone(arch: Optional[str], seed: int = 0, **overrides: Any) -> LoadedBackbone:
    """A randomly initialised ``arch`` (with timm keyword ``overrides``), the same for the
    same ``seed`` (the global RNG is left as it was)."""
    if not arch:
        raise UserError("--checkpoint random needs --arch (a timm XCiT name, e.g. xcit_nano_12_p8_224)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(arch, 0.0, **overrides)
    return LoadedBackbone(model, arch, f"{RANDOM}:{arch}:seed{seed}", extra={"backbone_kwargs": overrides})


def read_checkpoint(path: str | Path, option: str, which: str) -> tuple[Path, Optional[dict[str, Any]]]:
    """``path`` checked and read: (path, None) for a .safetensors file (read by its own
    loader), else (path, the dict ``torch.load`` gives). Errors name ``option``.

    Raises:
        UserError: a missing or unreadable file, one that holds no dict, or ``which`` not
            teacher/student.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}: {path} does not exist")
    if which not in ("teacher", "student"):
        raise UserError(f"{'--which' if option.startswith('--') else option + '_which'}: expected teacher or student, "
                        f"got {which}")
    if path.suffix == ".safetensors":
        return path, None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"{option}: cannot read {path}: {err}") from err
    if not isinstance(ckpt, dict):
        raise UserError(f"{option}: {path} does not hold a state dict")
    return path, ckpt


def is_run_checkpoint(ckpt: dict[str, Any]) -> bool:
    """An ssl-xcit (Lightning) checkpoint, as opposed to an official DINO/XCiT or timm file."""
    return "state_dict" in ckpt and "hyper_parameters" in ckpt


def load_backbone(path: str | Path, which: str = "teacher", arch: Optional[str] = None, seed: int = 0,
                  random_overrides: Optional[dict[str, Any]] = None) -> LoadedBackbone:
    """The backbone stored in ``path`` (see the module docstring), in eval mode on the CPU.

    ``path`` = 'random' gives a randomly initialised ``arch`` (with timm keyword
    ``random_overrides``) seeded by ``seed``.
    """
    if str(path) == RANDOM:
        loaded = random_backbone(arch, seed, **(random_overrides or {}))
    else:
        path, ckpt = read_checkpoint(path, "--checkpoint", which)
        if ckpt is None:
            loaded = _from_safetensors(path, arch)
        elif is_run_checkpoint(ckpt):
            loaded = _from_lightning(path, ckpt, which)
        else:
            loaded = _from_official(path, ckpt, which, arch)
    loaded.model.eval()
    return loaded


def export_backbone(loaded: LoadedBackbone, out: str | Path) -> Path:
    """Write the backbone as safetensors that timm loads directly::

        timm.create_model(arch, pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=out))
    """
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    meta = {"arch": loaded.arch, "source": loaded.source, "mean": json.dumps(list(loaded.mean)),
            "std": json.dumps(list(loaded.std)), "backbone_kwargs": json.dumps(loaded.extra.get("backbone_kwargs", {}))}
    return atomic_write(Path(out), lambda f: f.write(save(state, metadata=meta)))
