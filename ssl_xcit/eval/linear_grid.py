"""Linear probe on frozen features: a grid of (lr, weight decay) heads trained at once.

Every head of the grid is one slice of a weight tensor (H, D, C), so each minibatch costs
one batched matmul for the whole grid instead of H training runs. Each head trains with
SGD (momentum 0.9, PyTorch semantics) on cross-entropy, its lr following a per-epoch
cosine to 0 as in DINO's ``eval_linear.py`` (Caron et al., 2021, arXiv 2104.14294).

The head is chosen by top-1 on a validation split carved, stratified and seeded, from the
*training* features; the test split is touched only afterwards, to report that head.

Features are L2-normalised (the same features the k-NN protocol sees), so logits are
bounded by the weight norms and the useful learning rates are larger than for raw
features: the default grid spans 0.01 to 10.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_xcit.devices import default_device
from ssl_xcit.eval.feature_store import FeatureError, validate_train_test
from ssl_xcit.eval.knn import l2_normalize, true_class_rank

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # unit-norm features want large lrs
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3)
MOMENTUM = 0.9
_EVAL_BATCH = 4096


HOLDOUT_SEED = 0
"""Seed of the held-out training images that the monitor and ``knn --holdout-fraction`` classify:
fixed, so that every run and every evaluation of a recipe classifies the same images."""


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of row indices into (train, val), taking ``val_fraction`` of each class.

    A class keeps at least one training row; its validation share is rounded to the
    nearest whole row (so a small fraction of small classes may hold out nothing). The
    probe's head selection and the pretraining monitor's held-out queries both use it.

    Args:
        labels: (N,) class indices.
        val_fraction: share of each class held out, in (0, 1).
        seed: seed of the per-class shuffles.

    Returns:
        (train indices, val indices), each sorted int64.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(int(round(val_fraction * len(rows))), len(rows) - 1)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _sgd_step(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor) -> None:
    """One in-place SGD-momentum step per head; lr and wd broadcast over the head axis."""
    buf.mul_(MOMENTUM).add_(grad + wd * param)
    param.sub_(lr * buf)


def head_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(H, N, C) logits of every head for (N, D) features, from (H, D, C) weights and (H, C) biases."""
    return x @ weight + bias[:, None, :]


def train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    lrs: torch.Tensor,
    wds: torch.Tensor,
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trains H linear heads from zero on the same minibatches, each with its own lr and wd.

    Args:
        x: (N, D) features.
        y: (N,) class indices.
        lrs: (H,) peak learning rates.
        wds: (H,) weight decays (on the weights, not the biases).
        num_classes: C.
        epochs: passes over the data; the lr follows a cosine from peak to 0 over them.
        batch_size: rows per minibatch.
        seed: seed of the per-epoch shuffles.

    Returns:
        (weights (H, D, C), biases (H, C)).
    """
    h, (n, d) = len(lrs), x.shape
    weight = torch.zeros(h, d, num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(h, num_classes, device=x.device, requires_grad=True)
    weight_buf, bias_buf = torch.zeros_like(weight), torch.zeros_like(bias)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        lr = lrs * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))  # (H,) cosine from the peak to 0
        for rows in torch.randperm(n, generator=generator).to(x.device).split(batch_size):
            logits = head_logits(x[rows], weight, bias)  # (H, B, C)
            # Summing the heads' mean losses gives each head exactly its own gradient.
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y[rows].repeat(h), reduction="sum") / len(rows)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
            with torch.no_grad():
                _sgd_step(weight, grad_w, weight_buf, lr[:, None, None], wds[:, None, None])
                _sgd_step(bias, grad_b, bias_buf, lr[:, None], torch.zeros_like(wds)[:, None])
    return weight.detach(), bias.detach()


def top1_per_head(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """(H,) top-1 accuracy in percent of every head; ties go to the lower class index."""
    chunks = zip(x.split(_EVAL_BATCH), y.split(_EVAL_BATCH))
    correct = sum((head_logits(xb, weight, bias).argmax(-1) == yb).sum(-1) for xb, yb in chunks)  # (H,)
    return (100.0 * correct.double() / len(y)).cpu().numpy()


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 100,
    batch_size: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Trains the lr x weight-decay grid, picks the best head on validation, reports its test accuracy.

    Args:
        train_features: (N, D) features; ``val_fraction`` of each class is held out.
        train_labels: (N,) class indices.
        test_features: (Q, D) features, used only to report the chosen head.
        test_labels: (Q,) class indices.
        lrs: peak learning rates of the grid (for L2-normalised features).
        weight_decays: weight decays of the grid.
        epochs: training epochs of every head.
        batch_size: minibatch rows.
        val_fraction: share of each training class used for head selection.
        seed: seed of the split and the shuffles.
        device: torch device; None picks CUDA when available.
        num_classes: C; by default 1 + the largest training label.

    Returns:
        JSON-serialisable report: the settings, ``grid`` (lr, weight_decay, val_top1 per
        head, lrs outer), the chosen ``best_lr``/``best_weight_decay``/``best_val_top1``
        (the first grid entry with the highest val top-1), ``test_top1`` and ``test_top5``
        (None when C < 5), accuracies in percent.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    validate_train_test(train_features, train_labels, test_features, test_labels)
    if not 0.0 < val_fraction < 1.0:
        raise FeatureError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if epochs < 1 or batch_size < 1 or not lrs or not weight_decays:
        raise FeatureError(
            f"linear probe needs epochs >= 1, batch_size >= 1 and a non-empty grid, got epochs={epochs}, "
            f"batch_size={batch_size}, lrs={list(lrs)}, weight_decays={list(weight_decays)}"
        )
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    max_label = int(max(train_labels.max(), test_labels.max()))
    if max_label >= num_classes:
        raise FeatureError(f"label {max_label} is out of range for num_classes={num_classes}")
    dev = default_device(device)
    x = torch.from_numpy(l2_normalize(train_features)).to(dev)
    y = torch.from_numpy(train_labels.astype(np.int64)).to(dev)
    fit_rows, val_rows = stratified_split(train_labels, val_fraction, seed)
    if len(val_rows) == 0:
        raise FeatureError(
            f"val_fraction={val_fraction} of {len(train_labels)} training features leaves no validation rows"
        )
    fit_idx, val_idx = torch.from_numpy(fit_rows).to(dev), torch.from_numpy(val_rows).to(dev)
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    lr_t, wd_t = (torch.tensor(v, dtype=torch.float32, device=dev) for v in zip(*grid))
    weight, bias = train_heads(x[fit_idx], y[fit_idx], lr_t, wd_t, num_classes, epochs, batch_size, seed)
    val_top1 = top1_per_head(x[val_idx], y[val_idx], weight, bias)
    best = int(np.argmax(val_top1))
    test_ranks = _test_ranks(test_features, test_labels, weight[best : best + 1], bias[best : best + 1])
    return {
        "normalization": "l2",
        "epochs": epochs,
        "batch_size": batch_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "momentum": MOMENTUM,
        "num_train": len(fit_idx),
        "num_val": len(val_idx),
        "num_test": len(test_features),
        "num_classes": num_classes,
        "grid": [{"lr": lr, "weight_decay": wd, "val_top1": float(acc)} for (lr, wd), acc in zip(grid, val_top1)],
        "best_lr": grid[best][0],
        "best_weight_decay": grid[best][1],
        "best_val_top1": float(val_top1[best]),
        "test_top1": 100.0 * float(np.mean(test_ranks == 0)),
        "test_top5": 100.0 * float(np.mean(test_ranks < 5)) if num_classes >= 5 else None,
    }


def _test_ranks(features: np.ndarray, labels: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """(Q,) rank of the true class under one head (weight (1, D, C), bias (1, C))."""
    ranks = []
    for start in range(0, len(features), _EVAL_BATCH):
        chunk = torch.from_numpy(l2_normalize(features[start : start + _EVAL_BATCH])).to(weight.device)
        scores = head_logits(chunk, weight, bias)[0].cpu().numpy()  # (B, C)
        ranks.append(true_class_rank(scores, labels[start : start + _EVAL_BATCH].astype(np.int64)))
    return np.concatenate(ranks)
