"""Semantic-segmentation scores from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The convention of the segmentation benchmarks (PASCAL VOC, Cityscapes, mmsegmentation):
pixels labelled ``ignore_label`` count nowhere; the confusion matrix is summed over the
whole set before any ratio is taken (not averaged per image); a class's IoU is
TP / (TP + FP + FN) and is undefined (NaN, left out of the mean) when the class is neither
in the ground truth nor predicted anywhere in the set; mIoU is the mean of the defined IoUs.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_label: Optional[int] = None) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class.

    Args:
        pred: predicted classes in [0, K), any shape.
        target: true classes in [0, K) or ``ignore_label``, the shape of ``pred``.
        num_classes: K.
        ignore_label: pixels with this target are not counted.

    Raises:
        ValueError: a target outside [0, K) that is not the ignore label, or a prediction outside [0, K).
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_label is not None:
        keep = target != ignore_label
        pred, target = pred[keep], target[keep]
    for name, values in (("target", target), ("prediction", pred)):
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.numel():
            raise ValueError(f"{name} class {int(bad[0])} is outside [0, {num_classes}) and is not the ignore "
                             f"label {ignore_label}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(confusion: torch.Tensor) -> np.ndarray:
    """(K,) float64 IoU per class in [0, 1]; NaN for a class with no pixel in truth or prediction."""
    conf = confusion.double().cpu().numpy()
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Share of the counted pixels whose class is right, in [0, 1] (NaN when none is counted)."""
    total = int(confusion.sum())
    return float(confusion.diag().sum()) / total if total else math.nan


def _percent(value: float) -> Optional[float]:
    return None if math.isnan(value) else 100.0 * value


def segmentation_report(confusion: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy in percent, JSON-ready (an undefined IoU is None)."""
    iou = class_iou(confusion)
    defined = iou[~np.isnan(iou)]
    return {
        "miou": _percent(float(defined.mean()) if defined.size else math.nan),
        "pixel_accuracy": _percent(pixel_accuracy(confusion)),
        "per_class_iou": {name: _percent(float(v)) for name, v in zip(class_names, iou)},
        "pixels": int(confusion.sum()),
    }
