"""Foreground discovery: masks from hand-made attention maps, IoU and the box counted by hand, the command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_xcit.cli import main
from ssl_xcit.eval.foreground import centred_box, iou, resize_to_patches, thresholded_masks


def test_masks_of_a_hand_made_attention_map_and_their_iou():
    maps = torch.full((2, 3, 4), 0.3 / 10)
    maps[0, 0, 0] = maps[0, 0, 1] = 0.35  # head 0: two patches hold 0.7 of the mass
    maps[1, 2, 3] = 0.67  # head 1: one patch holds more than 0.6 of the mass
    masks = thresholded_masks(maps, 0.6, (6, 8))  # upsampled x2, nearest
    assert masks.shape == (3, 6, 8)
    head0 = np.zeros((6, 8), dtype=bool)
    head0[0:2, 0:4] = True
    head1 = np.zeros((6, 8), dtype=bool)
    head1[4:6, 6:8] = True
    assert np.array_equal(masks[0].numpy(), head0) and np.array_equal(masks[1].numpy(), head1)
    # the mean map: (2, 3) holds 0.35, (0, 0) and (0, 1) 0.19 each: 0.54 before the third, 0.73 after it
    mean = np.zeros((6, 8), dtype=bool)
    mean[0:2, 0:4] = mean[4:6, 6:8] = True
    assert np.array_equal(masks[2].numpy(), mean)
    truth = torch.zeros(6, 8, dtype=torch.bool)
    truth[0:2, 2:8] = True  # 12 pixels; head 0 holds 8 of which 4 are in it: 4 / (8 + 12 - 4)
    assert iou(masks[0], truth) == pytest.approx(4 / 16)
    assert iou(masks[1], truth) == 0.0 and iou(truth & False, truth & False) == 1.0


def test_the_centred_box_and_the_resize_by_hand():
    box = centred_box(10, 20, 0.5)
    assert box.sum() == 5 * 10 and box[2:7, 5:15].all()
    assert resize_to_patches(Image.new("RGB", (300, 200)), 100, 16).size == (144, 96)  # 150x100 to multiples of 16
    assert resize_to_patches(Image.new("RGB", (30, 20)), 8, 16).size == (16, 16)  # at least one patch


def test_foreground_command_on_real_horses(horse_slice, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["foreground", "--checkpoint", "random", "--arch", "xcit_nano_12_p8_224", "--backbone-kwargs",
                 "{depth: 2}", "--images", str(horse_slice / "images"), "--masks", str(horse_slice / "masks"),
                 "--size", "64", "--show", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 4 and len(report["miou_heads"]) == 4  # xcit nano: 4 heads
    assert all(0 <= v <= 100 for v in [report["miou_mean_map"], report["miou_box"], *report["miou_heads"]])
    boxes = []
    for mask in sorted((horse_slice / "masks").iterdir()):  # the box baseline counted apart
        truth = np.asarray(Image.open(mask)) > 127
        h, w = truth.shape
        box = np.zeros_like(truth)
        bh, bw = round(h / 2), round(w / 2)
        box[(h - bh) // 2:(h - bh) // 2 + bh, (w - bw) // 2:(w - bw) // 2 + bw] = True
        boxes.append(100 * (box & truth).sum() / (box | truth).sum())
    assert report["miou_box"] == pytest.approx(np.mean(boxes))
    assert (out / "foreground.png").stat().st_size > 0 and "foreground IoU over 4 images" in capsys.readouterr().out
