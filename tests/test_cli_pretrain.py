"""``ssl-xcit pretrain`` as a user runs it: real images, a run folder, resume, one-line errors."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_pretrain_args
from ssl_xcit.cli import main


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JSONARGPARSE_DEPRECATION_WARNINGS="off")
    cmd = [sys.executable, "-m", "ssl_xcit.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pretrain_on_real_images_writes_run_folder_and_resumes(cifar_slice_archive, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_pretrain_args(str(cifar_slice_archive), run_dir, data__split="train", run__saveckp_freq="1")
    first = run_cli("pretrain", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "config.yaml" in {p.name for p in run_dir.iterdir()}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert {p.name for p in (run_dir / "checkpoints").glob("epoch*.ckpt")} == {"epoch0000.ckpt", "epoch0001.ckpt"}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for column in ("train/loss", "schedule/lr", "schedule/weight_decay", "schedule/momentum_teacher",
                   "schedule/teacher_temp", "collapse/teacher_entropy", "collapse/kl_to_uniform",
                   "collapse/center_norm"):
        assert any(row.get(column) for row in rows), column
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    steps_per_epoch = 300 // 8
    assert ckpt["global_step"] == 2 * steps_per_epoch
    assert "loss_fn.center" in ckpt["state_dict"] and ckpt["optimizer_states"]
    assert ckpt["hyper_parameters"]["config"]["model"]["arch"] == "xcit_nano_12_p8_224"

    resumed = run_cli("pretrain", *args, "--trainer.max_epochs", "3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3 * steps_per_epoch
    segments = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    assert [p.parent.name for p in segments] == ["version_0", "version_1"]
    with open(segments[1]) as f:
        assert min(int(row["step"]) for row in csv.DictReader(f)) >= steps_per_epoch * 2


def test_print_config_shows_resolved_values(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  arch: xcit_tiny_12_p16_224\noptim:\n  lr: 0.001\n")
    assert main(["pretrain", "--config", str(recipe), "--optim.lr", "0.002", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "arch: xcit_tiny_12_p16_224" in out and "lr: 0.002" in out and "teacher_temp: 0.04" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--optim.lrr", "1"], "unrecognized arguments: --optim.lrr"),
        (["--optim.lr", "fast"], 'Parser key "optim.lr"'),
        (["--trainer.max_steps", "1.5"], 'Parser key "trainer.max_steps"'),
        (["--data.path", "/does/not/exist"], "data.path: /does/not/exist does not exist"),
        (["--augment.local_crops_size", "12"], "augment.local_crops_size: 12 px is not a multiple of the patch size 8"),
        (["--model.arch", "vit_small_patch16_224"], "model.arch: unknown XCiT architecture"),
    ],
)
def test_bad_input_is_one_line_naming_the_culprit_and_writes_nothing(capsys, tmp_path, extra, message):
    run_dir = tmp_path / "run"
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="16") + extra
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()


def test_unknown_key_in_recipe_names_key_and_file(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data:\n  pathh: x\n")
    assert main(["pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "pathh" in err and "bad.yaml" in err


def test_used_run_folder_is_not_overwritten_without_resume(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"previous run")
    args = tiny_pretrain_args("synthetic", tmp_path / "run", data__synthetic_size="16", run__resume="false")
    assert main(["pretrain", *args]) == 2
    assert "already holds last.ckpt" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == b"previous run"
