"""Frozen features of a backbone over a labelled dataset, written to a resumable feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from ssl_xcit.devices import default_device
from ssl_xcit.weights import LoadedBackbone
from ssl_xcit.eval.feature_store import FeatureStoreWriter
from ssl_xcit.image_sources import describe

Variant = Literal["cls", "cls+avgpool"]
Precision = Literal["fp32", "bf16"]


def eval_transform(resize: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """DINO's evaluation transform: resize the short side (bicubic), centre-crop, normalise."""
    return v2.Compose([
        v2.ToImage(),
        v2.RGB(),
        v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=mean, std=std),
    ])


class Transformed(Dataset):
    """(image, label) → (transformed image, label)."""

    def __init__(self, source: Dataset, transform: v2.Compose) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[index]
        return self.transform(image), label


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, variant: Variant = "cls") -> torch.Tensor:
    """(B, 3, H, W) → (B, D) for ``cls`` or (B, 2D) for ``cls+avgpool``.

    ``cls`` is the class token after class attention and the final norm (the DINO
    feature); ``cls+avgpool`` appends the mean of the output patch tokens.
    """
    if variant == "cls":
        return model(images)
    tokens = model.forward_features(images)  # (B, 1 + N, D)
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


def iter_features(
    model: nn.Module,
    dataset: Dataset,
    start: int = 0,
    batch_size: int = 256,
    num_workers: int = 4,
    device: Optional[torch.device] = None,
    variant: Variant = "cls",
    desc: Optional[str] = None,
    precision: Precision = "fp32",
    worker_init_fn: Optional[Callable[[int], None]] = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Features of ``dataset[start:]`` in order, chunk by chunk: (B, D) float32 and (B,) int64.

    ``precision`` "fp32" runs the backbone in float32 (also inside an outer autocast region,
    e.g. a bf16 training step's); "bf16" runs it under bf16 autocast, on CPU and GPU alike;
    the features come back as float32 either way. ``desc`` shows a progress bar. The loader
    draws no number from the global RNG, so a training run's random stream is the same
    with or without feature passes in between.
    """
    device = device or default_device()
    loader = DataLoader(Subset(dataset, range(start, len(dataset))), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init_fn,
                        generator=torch.Generator())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    batches = tqdm(loader, desc=desc, disable=desc is None, initial=start // batch_size,
                   total=-(-len(dataset) // batch_size))
    for images, labels in batches:
        with torch.no_grad(), autocast:
            features = embed(model, images.to(device, non_blocking=True), variant)
        yield features.float().cpu().numpy(), labels.numpy().astype(np.int64)


def compute_features(model: nn.Module, dataset: Dataset, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """All features and labels of ``dataset`` in memory (for small sets such as the monitor's);
    ``kwargs`` as for :func:`iter_features`."""
    chunks = list(iter_features(model, dataset, **kwargs))
    return np.concatenate([f for f, _ in chunks]), np.concatenate([l for _, l in chunks])


def export_features(
    loaded: LoadedBackbone,
    source: Dataset,
    out_dir: Path,
    resize: int = 256,
    crop: int = 224,
    variant: Variant = "cls",
    batch_size: int = 256,
    num_workers: int = 4,
    device: Optional[torch.device] = None,
    meta: Optional[dict[str, Any]] = None,
    progress: bool = True,
    precision: Precision = "fp32",
) -> Path:
    """Write the features of every image of ``source`` to the store ``out_dir``.

    An interrupted export resumes at the first row not yet on disk. Features are stored
    as the backbone gives them (not normalised); k-NN normalises them itself. ``precision``
    as for :func:`iter_features`, recorded in the store's metadata.
    """
    device = device or default_device()
    model = loaded.model.to(device).eval()
    paths, _, classes = describe(source)
    dataset = Transformed(source, eval_transform(resize, crop, loaded.mean, loaded.std))
    with torch.no_grad():
        dim = embed(model, dataset[0][0].unsqueeze(0).to(device), variant).shape[-1]
    full_meta = {
        "checkpoint": loaded.source, "arch": loaded.arch, "variant": variant, "dim": dim, "normalized": False,
        "transform": {"resize": resize, "crop": crop, "interpolation": "bicubic", "mean": list(loaded.mean),
                      "std": list(loaded.std)},
        "precision": precision, "class_names": classes, **(meta or {}),
    }
    writer = FeatureStoreWriter(out_dir, len(dataset), dim, full_meta)
    row = writer.rows_done
    for features, labels in iter_features(model, dataset, row, batch_size, num_workers, device, variant,
                                          desc=f"export {out_dir.name}" if progress else None, precision=precision):
        writer.write(row, features, labels, paths[row:row + len(features)])
        row += len(features)
    writer.finish()
    return out_dir
