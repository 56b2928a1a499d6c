"""Unreadable images in pretraining: ``data.on_bad_image`` fail stops without saving anything the
bad batch touched and the fixed dataset continues exactly; skip trains on a deterministic replacement, lists the file
once and resumes exactly; too many bad files stop the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ssl_xcit.cli import main
from ssl_xcit.pretrain.sampler import ResumableDistributedSampler
from tests.helpers import assert_same_checkpoint, tiny_pretrain_args

STEPS = 12  # 70 images, batch 8: 8 steps an epoch; the run crosses into epoch 1
BAD_BATCH = 3  # the corrupted image sits in the 4th batch of epoch 0


@pytest.fixture()
def images(cifar_slice, tmp_path) -> Path:
    """70 real JPEGs in class folders (a copy: the tests corrupt some)."""
    root = tmp_path / "images"
    for cls_dir in sorted((cifar_slice / "train").iterdir()):
        for jpg in sorted(cls_dir.iterdir())[:7]:
            (root / cls_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(jpg, root / cls_dir.name / jpg.name)
    return root


def files_in_order(root: Path) -> list[Path]:
    """The images in ImageFolder's index order."""
    return sorted(p for p in root.rglob("*.jpg"))


def image_in_batch(root: Path, batch: int, position: int = 2) -> Path:
    """The file the sampler puts at ``position`` of ``batch`` in epoch 0 (seed 0, batch 8)."""
    files = files_in_order(root)
    keys = list(ResumableDistributedSampler(len(files), batch_size=8, seed=0))
    return files[keys[batch * 8 + position][0]]


def corrupt(path: Path) -> bytes:
    good = path.read_bytes()
    path.write_bytes(good[:200])  # a truncated JPEG: the header reads, the pixels do not
    return good


def args(root: Path, run_dir: Path, **overrides: str) -> list[str]:
    settings = dict(data__num_workers="2", trainer__max_epochs="2", trainer__max_steps=str(STEPS),
                    run__checkpoint_every_n_steps="100", run__saveckp_freq="0", trainer__deterministic="true")
    return tiny_pretrain_args(str(root), run_dir, **{**settings, **overrides})


def state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_fail_saves_nothing_of_the_bad_batch_and_the_fixed_data_continue_exactly(images, tmp_path, capsys):
    assert main(["pretrain", *args(images, tmp_path / "reference")]) == 0
    bad = image_in_batch(images, BAD_BATCH)
    good = corrupt(bad)
    run_dir = tmp_path / "run"
    every_2 = {"run__checkpoint_every_n_steps": "2"}  # saves at steps 2, 4 ...: the bad batch is step 3's
    assert main(["pretrain", *args(images, run_dir, **every_2)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unreadable image {bad}" in err and "data.on_bad_image skip" in err, err
    assert "(step 2) is the restart point" in err, err
    assert state(run_dir)["global_step"] == 2  # the last save before the bad batch; nothing after it
    bad.write_bytes(good)  # the user fixes the file and runs the same command again
    assert main(["pretrain", *args(images, run_dir, **every_2)]) == 0
    assert_same_checkpoint(state(tmp_path / "reference"), state(run_dir), STEPS)


def test_skip_trains_on_a_replacement_lists_the_file_once_and_resumes_exactly(images, tmp_path):
    bad = image_in_batch(images, BAD_BATCH)
    corrupt(bad)
    skip = {"data__on_bad_image": "skip", "data__max_bad_fraction": "0.05"}
    assert main(["pretrain", *args(images, tmp_path / "whole", **skip)]) == 0
    listed = (tmp_path / "whole" / "bad_images.txt").read_text().splitlines()
    assert listed == [str(bad)]  # met in both epochs, listed once
    logs = (tmp_path / "whole" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "data/bad_images" in logs.splitlines()[0]

    # the same run stopped after the bad batch (max_steps of a first command ends it there:
    # schedules differ), so stop it with a kill at step 6 instead: a crash, then the same command
    import subprocess
    import sys

    from tests.helpers import REPO

    run_dir = tmp_path / "resumed"
    cli = [sys.executable, "-m", "tests.kill_switch", "kill@save:6", "--", "pretrain",
           *args(images, run_dir, run__checkpoint_every_n_steps="6", **skip)]
    killed = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert main(["pretrain", *args(images, run_dir, run__checkpoint_every_n_steps="6", **skip)]) == 0
    assert_same_checkpoint(state(tmp_path / "whole"), state(run_dir), STEPS)
    assert (run_dir / "bad_images.txt").read_text().splitlines() == [str(bad)]


def test_skip_stops_cleanly_when_too_many_images_are_bad(images, tmp_path, capsys):
    for bad in files_in_order(images)[:3]:
        corrupt(bad)
    run_dir = tmp_path / "run"
    assert main(["pretrain", *args(images, run_dir, data__on_bad_image="skip", data__max_bad_fraction="0.02")]) == 2
    err = capsys.readouterr().err
    assert "of 70 images are unreadable" in err and "more than data.max_bad_fraction 0.02" in err
    assert str(run_dir / "bad_images.txt") in err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len((run_dir / "bad_images.txt").read_text().splitlines()) >= 2
