"""End to end: a tiny run continued through --model.init from another run's checkpoint and from an
exported .safetensors; the monitor's step-0 k-NN equals the loaded checkpoint's evaluated alone."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

from ssl_xcit.cli import main
from ssl_xcit.eval.export import Transformed, compute_features, eval_transform
from ssl_xcit.eval.knn import knn_evaluate
from ssl_xcit.image_sources import build_source
from ssl_xcit.weights import IMAGENET_MEAN, IMAGENET_STD, export_backbone, load_backbone
from tests.helpers import tiny_pretrain_args


def continued_args(init, cifar_slice, run_dir, **overrides):
    overrides = {"trainer__max_epochs": "1", "monitor__every_n_epochs": "1", **overrides}
    return tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="16", data__synthetic_resolution="40",
                              model__init=str(init), monitor__train_path=str(cifar_slice), monitor__val_split="test",
                              monitor__resize="32",
                              monitor__crop="32", monitor__k="5", **overrides)


def knn_alone(backbone, cifar_slice, cache_dir) -> float:
    """The monitor's protocol computed apart: eval transform, features of the train split (the bank)
    and of the test split (the queries, as monitor.val_split test asks), weighted k-NN (k=5, T=0.07)."""
    transform = eval_transform(32, 32, IMAGENET_MEAN, IMAGENET_STD)
    train = Transformed(build_source(str(cifar_slice), "train", str(cache_dir)), transform)
    val = Transformed(build_source(str(cifar_slice), "test", str(cache_dir)), transform)
    backbone.eval()
    train_x, train_y = compute_features(backbone, train, batch_size=64, num_workers=0, device=torch.device("cpu"))
    val_x, val_y = compute_features(backbone, val, batch_size=64, num_workers=0, device=torch.device("cpu"))
    return knn_evaluate(train_x, train_y, val_x, val_y, ks=(5,), temperature=0.07)["results"][0]["top1"]


def logged(run_dir, key: str) -> dict[int, float]:
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.fixture()
def info_logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def test_continue_from_a_run_checkpoint(tiny_checkpoint, cifar_slice, tmp_path, info_logs):
    run_dir = tmp_path / "continued"
    assert main(["pretrain", *continued_args(tiny_checkpoint, cifar_slice, run_dir)]) == 0
    assert "backbone loaded; head loaded; center loaded" in info_logs.text
    knn = logged(run_dir, "knn/top1_k5")
    assert sorted(knn) == [0, 2]  # at start (step 0), then after the epoch's 2 steps
    assert knn[0] == pytest.approx(knn_alone(load_backbone(tiny_checkpoint).model, cifar_slice, tmp_path), abs=1e-9)
    step, lr = min(logged(run_dir, "schedule/lr").items())  # a new run: its own lr warm-up from 0 ...
    assert lr == pytest.approx(0.0005 * 8 / 256 * step / 2)  # ... to 5e-4 x batch 8 / 256 over 2 steps
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_continue_from_an_exported_backbone_then_resume(tiny_checkpoint, cifar_slice, tmp_path, info_logs):
    exported = export_backbone(load_backbone(tiny_checkpoint), tmp_path / "backbone.safetensors")
    run_dir = tmp_path / "from_export"
    args = continued_args(exported, cifar_slice, run_dir, trainer__max_steps="1", trainer__max_epochs="2",
                          monitor__every_n_epochs="0", monitor__at_start="true")
    assert main(["pretrain", *args]) == 0
    assert "backbone loaded; no DINO head in the checkpoint: head randomly initialised" in info_logs.text
    assert logged(run_dir, "knn/top1_k5")[0] == pytest.approx(
        knn_alone(load_backbone(exported).model, cifar_slice, tmp_path), abs=1e-9)
    info_logs.clear()
    assert main(["pretrain", *args, "--trainer.max_steps", "2"]) == 0  # same folder: resume wins over init
    assert "model.init" in info_logs.text and "not used: the run continues from its own last.ckpt" in info_logs.text
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
