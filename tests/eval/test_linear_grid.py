import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_xcit.eval.feature_store import FeatureError
from ssl_xcit.eval.linear_grid import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, linear_probe, stratified_split, train_heads

GRID = {"lrs": (0.1, 1.0, 10.0), "weight_decays": (0.0, 1e-4)}


def _clusters(num_classes, per_class, dim=32, spread=0.3, seed=0):
    """Gaussian clusters around random centres: (features (N, dim) float32, labels (N,))."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return features.astype(np.float32), labels


def _split(num_classes, seed=0, **kwargs):
    x, y = _clusters(num_classes, 60, seed=seed, **kwargs)
    test = np.arange(len(y)) % 4 == 0
    return x[~test], y[~test], x[test], y[test]


def test_separable_clusters_are_learnt():
    report = linear_probe(*_split(10), epochs=10, batch_size=64)
    assert report["test_top1"] >= 99.0
    assert report["test_top5"] == 100.0
    assert len(report["grid"]) == len(DEFAULT_LRS) * len(DEFAULT_WEIGHT_DECAYS)  # the default grid
    json.dumps(report)


def test_head_is_chosen_without_the_test_split():
    # Overlapping clusters, so the heads differ on validation and the choice means something.
    train_x, train_y, test_x, test_y = _split(10, spread=2.0)
    honest = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=64, **GRID)
    rng = np.random.default_rng(1)
    noise_x = rng.normal(size=test_x.shape).astype(np.float32)
    garbage = linear_probe(train_x, train_y, noise_x, rng.permutation(test_y), epochs=5, batch_size=64, **GRID)
    assert len({g["val_top1"] for g in honest["grid"]}) > 1
    for key in ("grid", "best_lr", "best_weight_decay", "best_val_top1"):
        assert honest[key] == garbage[key], key
    assert honest["test_top1"] > garbage["test_top1"] + 20


def test_batched_heads_equal_separate_torch_sgd_runs():
    """Each head of the batch trains exactly like its own torch.optim.SGD run."""
    x, y = _clusters(4, 25, dim=8, spread=1.0)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    lrs, wds, epochs, batch = [0.5, 0.05], [1e-2, 0.0], 3, 16
    weight, bias = train_heads(x, y, torch.tensor(lrs), torch.tensor(wds), 4, epochs, batch, seed=7)
    for h, (lr, wd) in enumerate(zip(lrs, wds)):
        w, b = torch.zeros(8, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
        groups = [{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        generator = torch.Generator().manual_seed(7)
        for epoch in range(epochs):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            for rows in torch.randperm(len(y), generator=generator).split(batch):
                opt.zero_grad()
                F.cross_entropy(x[rows] @ w + b, y[rows]).backward()
                opt.step()
        torch.testing.assert_close(weight[h], w.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bias[h], b.detach(), atol=1e-5, rtol=1e-5)


def test_stratified_split_is_seeded_disjoint_and_per_class():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 1)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).tolist() == list(range(71))
    assert np.bincount(labels[val], minlength=3).tolist() == [5, 2, 0]  # a lone sample stays in train
    again = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 0.1, seed=4)[1], val)


def test_top5_only_with_at_least_five_classes():
    report = linear_probe(*_split(4), epochs=2, **GRID)
    assert report["test_top5"] is None and report["num_classes"] == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 0.0}, "val_fraction must be in (0, 1)"),
        ({"epochs": 0}, "epochs=0"),
        ({"num_classes": 3}, "label 3 is out of range for num_classes=3"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(FeatureError) as err:
        linear_probe(*_split(4), **{**GRID, **kwargs})
    assert message in str(err.value)


def test_dims_must_agree():
    train_x, train_y, test_x, test_y = _split(4)
    with pytest.raises(FeatureError, match="train features have dim 32, test features have dim 31"):
        linear_probe(train_x, train_y, test_x[:, 1:], test_y)
