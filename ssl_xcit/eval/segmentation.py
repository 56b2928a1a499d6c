"""Linear segmentation probe on frozen patch features (the DINOv2 linear protocol, arXiv 2304.07193, Sec. 7.4).

The head is BatchNorm over the feature channels and a 1x1 convolution to K classes, applied
to each image's (h, w, C) patch grid; its logits are upsampled bilinearly to the mask's
size and trained with cross-entropy in which ``ignore_label`` pixels count nowhere. AdamW
(weight decay 1e-4, as DINOv2's linear heads) with the learning rate decaying linearly to 0.

One head is trained per learning rate of a small grid, all on the training images; the
one with the best mIoU on the validation images is kept and scored once on the test
images. Features are precomputed (a dense store per split), so a head trains in seconds to
minutes on a CPU; without the backbone in the loop there is no image augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_xcit.eval.seg_metrics import confusion_matrix, segmentation_report


@dataclass
class SegmentationSet:
    """Patch features and their masks: ``features`` (N, h, w, C), any float dtype (a dense
    store's memmap), and N masks (H_n, W_n) of class indices (or the ignore label)."""

    features: np.ndarray
    masks: Sequence[np.ndarray]

    def __len__(self) -> int:
        return len(self.features)

    def grids(self, rows: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 features of ``rows``."""
        return torch.from_numpy(np.asarray(self.features[list(rows)], dtype=np.float32)).permute(0, 3, 1, 2)


def linear_head(channels: int, num_classes: int) -> nn.Sequential:
    """BatchNorm2d(C) then a 1x1 convolution to K logits: (B, C, h, w) → (B, K, h, w)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, num_classes, kernel_size=1))


def upsampled_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) → (K, H, W), bilinear (align_corners False: patch centres at pixel centres of blocks)."""
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def logits_at(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) → (K, M): :func:`upsampled_logits` to ``size`` read at M pixels (``rows``,
    ``cols``) only, by sampling the grid at those pixel centres (the same bilinear weights,
    the border clamped alike), without computing the other pixels."""
    height, width = size
    grid = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1).float()  # (M, 2) in [-1, 1]
    return F.grid_sample(logits[None], grid[None, None], mode="bilinear", padding_mode="border",
                         align_corners=False)[0, :, 0]


def batch_loss(logits: torch.Tensor, masks: Sequence[np.ndarray], ignore_label: Optional[int], pixels: int = 0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cross-entropy of each image's logits (B, K, h, w) upsampled to its own mask's size.

    ``pixels`` 0: the mean over every counted pixel of the batch. Otherwise the loss is read at
    ``pixels`` pixels per image drawn uniformly (with replacement, from ``generator``) among its
    counted ones, each image's mean weighing the same: an unbiased estimate of the mean of the
    images' losses for a fraction of the cost (the cross-entropy of a 480x360 mask costs 40x
    that of 4,096 pixels).
    """
    ignore = -100 if ignore_label is None else ignore_label
    total, chosen = logits.new_zeros(()), 0
    for image_logits, mask in zip(logits, masks):
        target = torch.from_numpy(mask.astype(np.int64)).flatten()
        picked = (target != ignore).nonzero()[:, 0]
        if pixels and len(picked):
            picked = picked[torch.randint(len(picked), (pixels,), generator=generator)]
        rows, cols = picked // mask.shape[1], picked % mask.shape[1]
        total = total + F.cross_entropy(logits_at(image_logits, rows, cols, mask.shape).T, target[picked],
                                        reduction="sum")
        chosen += len(picked)
    return total / max(chosen, 1)


def train_probe(train: SegmentationSet, num_classes: int, ignore_label: Optional[int], lr: float,
                weight_decay: float = 1e-4, epochs: int = 10, batch_size: int = 8, seed: int = 0,
                pixels: int = 4096) -> nn.Sequential:
    """A linear head trained on ``train``: AdamW at ``lr`` decaying linearly to 0 over the steps;
    ``pixels`` per image in each step's loss (0: every pixel; see :func:`batch_loss`)."""
    torch.manual_seed(seed)
    head = linear_head(train.features.shape[-1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    order = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(train), generator=order).split(batch_size):
            rows = sorted(rows.tolist())  # memmap reads in file order
            loss = batch_loss(head(train.grids(rows)), [train.masks[r] for r in rows], ignore_label, pixels, order)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def predict(head: nn.Module, data: SegmentationSet, rows: Sequence[int]) -> list[torch.Tensor]:
    """The predicted class of every mask pixel of ``rows``: (H_n, W_n) int64 each."""
    logits = head.eval()(data.grids(rows))
    return [upsampled_logits(l, data.masks[r].shape).argmax(0) for l, r in zip(logits, rows)]


def confusion(head: nn.Module, data: SegmentationSet, num_classes: int, ignore_label: Optional[int],
              batch_size: int = 8) -> torch.Tensor:
    """(K, K) confusion matrix of ``head`` over every image of ``data``."""
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(data), batch_size):
        rows = list(range(start, min(start + batch_size, len(data))))
        for pred, r in zip(predict(head, data, rows), rows):
            total += confusion_matrix(pred, torch.from_numpy(data.masks[r].astype(np.int64)), num_classes, ignore_label)
    return total


def linear_segmentation(
    train: SegmentationSet,
    val: SegmentationSet,
    test: SegmentationSet,
    class_names: Sequence[str],
    ignore_label: Optional[int],
    lrs: Sequence[float],
    weight_decay: float = 1e-4,
    epochs: int = 10,
    batch_size: int = 8,
    seed: int = 0,
    pixels: int = 4096,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], nn.Module]:
    """Trains one head per lr, keeps the best on ``val`` (mIoU; the first of equals), scores it on ``test``.

    Returns:
        (report, chosen head): the report holds ``grid`` (lr, val mIoU), ``best_lr``, ``val``
        and ``test`` (:func:`~ssl_xcit.eval.seg_metrics.segmentation_report`: mIoU, per-class
        IoU, pixel accuracy, in percent).
    """
    k = len(class_names)
    grid, best = [], None
    for lr in lrs:
        head = train_probe(train, k, ignore_label, lr, weight_decay, epochs, batch_size, seed, pixels)
        scores = segmentation_report(confusion(head, val, k, ignore_label), class_names)
        log(f"lr {lr:g}: validation mIoU {scores['miou']:.2f}")
        grid.append({"lr": lr, "val_miou": scores["miou"]})
        if best is None or scores["miou"] > best[1]["miou"]:
            best = (lr, scores, head)
    assert best is not None, "an empty lr grid"
    lr, val_scores, head = best
    report = {
        "protocol": "linear (BatchNorm + 1x1 conv), bilinear upsampling to the mask, cross-entropy, AdamW",
        "grid": grid, "best_lr": lr, "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size,
        "pixels_per_image": pixels, "seed": seed, "ignore_label": ignore_label, "num_train": len(train), "num_val": len(val),
        "num_test": len(test), "val": val_scores,
        "test": segmentation_report(confusion(head, test, k, ignore_label), class_names),
    }
    return report, head
