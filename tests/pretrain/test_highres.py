"""The high-resolution stage: a run that starts from a checkpoint trained at smaller crops, and a run
resumed after its crop size changed, both train without error (XCiT has no fixed positional grid)."""

from __future__ import annotations

import logging
import shutil

import torch

from ssl_xcit.cli import main
from tests.helpers import REPO, tiny_pretrain_args


def run_args(run_dir, crops: int, **overrides):
    overrides = {"trainer__max_epochs": "1", **overrides}
    return tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="16", data__synthetic_resolution="40",
                              augment__global_crops_size=str(crops), augment__local_crops_size=str(crops // 2),
                              **overrides)


def global_step(run_dir) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_init_from_32_px_crops_then_resume_at_96(tiny_checkpoint, tmp_path, caplog):
    """The tiny checkpoint trained on 32-px crops (4x4 tokens of patch 8): start a run at 64 px from it,
    then continue that run's folder at 96 px with more steps."""
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "highres"
    assert main(["pretrain", *run_args(run_dir, 64, model__init=str(tiny_checkpoint))]) == 0
    assert "backbone loaded; head loaded; center loaded" in caplog.text
    assert global_step(run_dir) == 2
    assert main(["pretrain", *run_args(run_dir, 96, trainer__max_epochs="2")]) == 0
    assert "resuming from" in caplog.text and global_step(run_dir) == 4


def test_a_run_resumed_at_another_crop_size(tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_checkpoint.parents[1], run_dir)  # the tiny run's folder, trained at 32 px
    before = global_step(run_dir)
    assert main(["pretrain", *run_args(run_dir, 64, trainer__max_epochs="2")]) == 0
    assert global_step(run_dir) == before + 2


def test_the_recipe_doubles_the_first_stage_crops_with_its_network():
    from ssl_xcit.pretrain.command import parse_pretrain_args

    first = parse_pretrain_args(["--config", str(REPO / "configs" / "cpu_imagenette.yaml")])[0]
    high = parse_pretrain_args(["--config", str(REPO / "configs" / "highres_continue.yaml")])[0]
    assert high.augment.global_crops_size == 2 * first.augment.global_crops_size
    assert (high.model.arch, high.model.backbone_kwargs, high.model.out_dim, high.model.head_hidden_dim) == \
           (first.model.arch, first.model.backbone_kwargs, first.model.out_dim, first.model.head_hidden_dim)
    assert high.model.init and high.optim.lr < first.optim.lr
