"""`ssl-xcit segment` end to end on real CamVid scenes with the tiny model."""

import json
import shutil

from ssl_xcit.cli import main

TINY = ["--checkpoint", "random", "--arch", "xcit_nano_12_p8_224", "--backbone-kwargs", "{depth: 2}",
        "--num-workers", "0", "--progress", "false", "--height", "48", "--width", "64", "--epochs", "2",
        "--lrs", "1e-3", "1e-2", "--ignore-label", "11"]


def test_segment_reports_the_chosen_lr_and_test_scores_and_reuses_its_stores(camvid_slice, tmp_path, capsys):
    args = ["segment", *TINY, "--images", str(camvid_slice / "images"), "--masks", str(camvid_slice / "masks"),
            "--splits", str(camvid_slice / "splits"), "--classes", str(camvid_slice / "classes.txt"),
            "--features-dir", str(tmp_path / "features"), "--test-height", "64", "--test-width", "96",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["num_train"], report["num_val"], report["num_test"]) == (6, 3, 3)
    assert [row["lr"] for row in report["grid"]] == [1e-3, 1e-2] and report["best_lr"] in (1e-3, 1e-2)
    assert len(report["test"]["per_class_iou"]) == 11 and "Unlabelled" not in str(report["class_names"])
    assert report["train_resolution"]["size"] == [48, 64] and report["test_resolution"]["size"] == [64, 96]
    assert 0 <= report["test"]["miou"] <= 100 and (tmp_path / "out" / "predictions.png").stat().st_size > 0
    stores = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert len(stores) == 3  # train, val, test
    first = capsys.readouterr().out
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == stores
    assert capsys.readouterr().out == first  # same stores, same seed: the same report


def test_without_a_val_list_validation_is_carved_from_train(camvid_slice, tmp_path):
    splits = tmp_path / "splits"
    shutil.copytree(camvid_slice / "splits", splits)
    (splits / "val.txt").unlink()
    assert main(["segment", *TINY, "--images", str(camvid_slice / "images"), "--masks", str(camvid_slice / "masks"),
                 "--splits", str(splits), "--classes", str(camvid_slice / "classes.txt"), "--val-fraction", "0.34",
                 "--features-dir", str(tmp_path / "features"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["num_train"], report["num_val"], report["num_test"]) == (4, 2, 3)
