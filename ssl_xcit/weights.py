"""A trained backbone for evaluation, from any weights file users hold, and its export for timm.

``--checkpoint`` takes every form :mod:`ssl_xcit.weight_files` reads: an ssl-xcit ``.ckpt``
(its config names the architecture; the teacher by default, as DINO evaluates it, the
student on request), an exported ``.safetensors`` (its metadata names the architecture), an
official DINO/XCiT or timm ``.pth`` (the architecture must be given: ``--arch``).

``random`` stands for a randomly initialised backbone of ``--arch``: the floor against
which every learned feature is judged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ssl_xcit.backbones import build_backbone
from ssl_xcit.errors import UserError
from ssl_xcit.files import atomic_write
from ssl_xcit.weight_files import WeightFile, fit_backbone, read_weight_file

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


def random_backbone(arch: Optional[str], seed: int = 0, **overrides: Any) -> LoadedBackbone:
    """A randomly initialised ``arch`` (with timm keyword ``overrides``), the same for the
    same ``seed`` (the global RNG is left as it was)."""
    if not arch:
        raise UserError("--checkpoint random needs --arch (a timm XCiT name, e.g. xcit_nano_12_p8_224)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(arch, 0.0, **overrides)
    return LoadedBackbone(model, arch, f"{RANDOM}:{arch}:seed{seed}", extra={"backbone_kwargs": overrides})


def _architecture(weights: WeightFile, arch: Optional[str]) -> str:
    """The file's own architecture, else ``--arch``; a ``--arch`` that contradicts the file is refused."""
    if weights.arch and arch and arch != weights.arch:
        raise UserError(f"--arch: {arch} given, but {weights.source} holds a {weights.arch} backbone")
    if not (weights.arch or arch):
        raise UserError(f"--checkpoint: {weights.source} does not name its architecture; pass --arch")
    return weights.arch or arch  # type: ignore[return-value]


def backbone_from(weights: WeightFile, arch: Optional[str] = None) -> LoadedBackbone:
    """The backbone ``weights`` hold, built as the file (or ``arch``) says and checked key by key."""
    arch = _architecture(weights, arch)
    model = build_backbone(arch, 0.0, **weights.backbone_kwargs)
    model.load_state_dict(fit_backbone(model, weights.backbone, weights.source, "--checkpoint", arch))
    return LoadedBackbone(model, arch, weights.source, weights.mean or IMAGENET_MEAN, weights.std or IMAGENET_STD,
                          {"backbone_kwargs": weights.backbone_kwargs, "global_step": weights.global_step})


def load_backbone(path: str | Path, which: str = "teacher", arch: Optional[str] = None, seed: int = 0,
                  random_overrides: Optional[dict[str, Any]] = None) -> LoadedBackbone:
    """The backbone stored in ``path`` (see the module docstring), in eval mode on the CPU.

    ``path`` = 'random' gives a randomly initialised ``arch`` (with timm keyword
    ``random_overrides``) seeded by ``seed``.
    """
    if str(path) == RANDOM:
        loaded = random_backbone(arch, seed, **(random_overrides or {}))
    else:
        loaded = backbone_from(read_weight_file(path, which, "--checkpoint"), arch)
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
