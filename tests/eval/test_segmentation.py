"""The linear segmentation probe: a known answer, its loss written out, and a test split that chooses nothing."""

import numpy as np
import pytest
import torch

from ssl_xcit.eval.segmentation import SegmentationSet, batch_loss, linear_segmentation, logits_at

PATCH, H, W, K, IGNORE = 4, 4, 6, 3, 255


def stripes(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features that are the class, one-hot, of each patch column, and the mask they encode:
    (H, W, K) float16 and (H·p, W·p) with the first pixel row ignored."""
    grid = np.tile(columns, (H, 1))  # (H, W) class per patch
    features = np.eye(K, dtype=np.float16)[grid]
    mask = grid.repeat(PATCH, axis=0).repeat(PATCH, axis=1).astype(np.uint8)
    mask[0] = IGNORE
    return features, mask


def stripe_set(seed: int, n: int) -> SegmentationSet:
    rng = np.random.default_rng(seed)
    pairs = [stripes(rng.integers(0, K, W)) for _ in range(n)]
    return SegmentationSet(np.stack([f for f, _ in pairs]), [m for _, m in pairs])


def test_features_that_encode_the_class_give_miou_100():
    train, val, test = stripe_set(0, 12), stripe_set(1, 4), stripe_set(2, 4)
    report, _ = linear_segmentation(train, val, test, ["a", "b", "c"], IGNORE, lrs=[0.1], epochs=15,
                                    batch_size=4, pixels=256, log=lambda line: None)
    assert report["test"]["miou"] == 100.0 and report["test"]["pixel_accuracy"] == 100.0
    assert report["test"]["pixels"] == 4 * (H * PATCH - 1) * W * PATCH  # the ignored row counts nowhere


def test_the_loss_is_the_mean_cross_entropy_of_the_counted_pixels_written_out():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 2, 3)
    masks = [np.array([[0, 1, 2, 2, 1, 0], [1, 1, IGNORE, 0, 0, 2], [2, 2, 2, 1, 1, 1], [0, 0, 0, 0, 0, 0]]),
             np.array([[IGNORE, 1, 2], [0, 0, 0]])]  # masks of two sizes: each image upsampled to its own
    terms = []
    for image_logits, mask in zip(logits, masks):
        up = torch.nn.functional.interpolate(image_logits[None], size=mask.shape, mode="bilinear",
                                             align_corners=False)[0]
        for i, j in np.ndindex(*mask.shape):
            if mask[i, j] != IGNORE:
                column = up[:, i, j]
                terms.append(float(torch.logsumexp(column, 0) - column[mask[i, j]]))
    assert float(batch_loss(logits, masks, IGNORE)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_logits_read_at_pixels_equal_the_full_upsampling_there():
    torch.manual_seed(0)
    logits = torch.randn(K, 3, 5)
    full = torch.nn.functional.interpolate(logits[None], size=(24, 38), mode="bilinear", align_corners=False)[0]
    rows, cols = torch.tensor([0, 0, 23, 23, 11, 7, 3]), torch.tensor([0, 37, 0, 37, 19, 4, 30])  # corners, inside
    assert torch.allclose(logits_at(logits, rows, cols, (24, 38)), full[:, rows, cols], atol=1e-5)


def test_sampled_pixels_are_counted_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(1, K, 2, 3)
    mask = np.full((8, 12), IGNORE)
    mask[5, 7] = 2  # one counted pixel: every draw is it
    up = torch.nn.functional.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False)[0, :, 5, 7]
    expected = float(torch.logsumexp(up, 0) - up[2])
    assert float(batch_loss(logits, [mask], IGNORE, pixels=64)) == pytest.approx(expected, rel=1e-5)


def test_the_test_split_chooses_nothing():
    train, val, test = stripe_set(0, 6), stripe_set(1, 3), stripe_set(2, 3)
    lrs = [1e-4, 1e-2, 1.0]
    report, _ = linear_segmentation(train, val, test, ["a", "b", "c"], IGNORE, lrs=lrs, epochs=3, batch_size=3,
                                    log=lambda line: None)
    scrambled = SegmentationSet(test.features, [np.roll(m, 5, axis=1) for m in test.masks])
    other, _ = linear_segmentation(train, val, scrambled, ["a", "b", "c"], IGNORE, lrs=lrs, epochs=3, batch_size=3,
                                   log=lambda line: None)
    assert other["grid"] == report["grid"] and other["best_lr"] == report["best_lr"]
    assert other["test"] != report["test"]
    best = max(report["grid"], key=lambda row: row["val_miou"])
    assert report["best_lr"] == best["lr"] and report["val"]["miou"] == best["val_miou"]
