"""Segmentation scores against a brute-force count on hand-made masks."""

import math

import numpy as np
import pytest
import torch

from ssl_xcit.eval.seg_metrics import class_iou, confusion_matrix, pixel_accuracy, segmentation_report

IGNORE = 9
# 3 classes; class 2 is never in the truth but predicted once; the ignore label hides two errors
TRUTH = [[0, 0, 1, 1],
         [0, 0, 1, IGNORE],
         [0, 1, 1, IGNORE]]
PRED = [[0, 1, 1, 1],
        [0, 0, 2, 0],
        [0, 0, 1, 2]]


def brute_force(truth: list, pred: list, classes: int, ignore: int) -> tuple[list, float]:
    """Per-class IoU (None where undefined) and pixel accuracy, pixel by pixel."""
    pixels = [(t, p) for rt, rp in zip(truth, pred) for t, p in zip(rt, rp) if t != ignore]
    ious = []
    for c in range(classes):
        inter = sum(1 for t, p in pixels if t == c and p == c)
        union = sum(1 for t, p in pixels if t == c or p == c)
        ious.append(inter / union if union else None)
    return ious, sum(t == p for t, p in pixels) / len(pixels)


def test_scores_equal_a_brute_force_count_with_an_ignore_label_and_a_class_absent_from_the_truth():
    conf = confusion_matrix(torch.tensor(PRED), torch.tensor(TRUTH), 3, IGNORE)
    ious, accuracy = brute_force(TRUTH, PRED, 3, IGNORE)
    assert ious == [pytest.approx(4 / 6), pytest.approx(3 / 6), 0.0]  # the count itself, checked by hand
    assert np.allclose(class_iou(conf), ious)
    assert pixel_accuracy(conf) == pytest.approx(accuracy) == pytest.approx(7 / 10)
    report = segmentation_report(conf, ["a", "b", "c"])
    assert report["miou"] == pytest.approx(100 * (4 / 6 + 3 / 6 + 0) / 3)
    assert report["per_class_iou"] == pytest.approx({"a": 100 * 4 / 6, "b": 50.0, "c": 0.0})
    assert report["pixels"] == 10


def test_a_class_neither_true_nor_predicted_is_left_out_of_the_mean():
    truth, pred = [[0, 0, 1, IGNORE]], [[0, 1, 1, 3]]  # class 2 nowhere; class 3 only under the ignore label
    conf = confusion_matrix(torch.tensor(pred), torch.tensor(truth), 4, IGNORE)
    ious, _ = brute_force(truth, pred, 4, IGNORE)
    assert ious[2] is None and ious[3] is None
    report = segmentation_report(conf, ["a", "b", "c", "d"])
    assert report["per_class_iou"]["c"] is None and report["per_class_iou"]["d"] is None
    assert report["miou"] == pytest.approx(100 * (ious[0] + ious[1]) / 2)
    assert math.isclose(report["pixel_accuracy"], 100 * 2 / 3)


def test_sums_over_the_set_before_dividing():
    """Two images scored together are not the mean of the two images' scores."""
    a = (torch.tensor([[0, 0, 0, 1]]), torch.tensor([[0, 0, 0, 0]]))
    b = (torch.tensor([[1, 1]]), torch.tensor([[1, 0]]))
    conf = confusion_matrix(*a, 2) + confusion_matrix(*b, 2)
    ious, _ = brute_force([[0, 0, 0, 0, 1, 0]], [[0, 0, 0, 1, 1, 1]], 2, IGNORE)
    assert np.allclose(class_iou(conf), ious)


@pytest.mark.parametrize("truth,pred,culprit", [([[3]], [[0]], "target class 3"), ([[0]], [[5]], "prediction class 5"),
                                                ([[-1]], [[0]], "target class -1")])
def test_values_outside_the_classes_are_refused(truth, pred, culprit):
    with pytest.raises(ValueError, match=culprit):
        confusion_matrix(torch.tensor(pred), torch.tensor(truth), 3, IGNORE)
