"""DINO learns: a short run on real CIFAR-10 images gives teacher patch tokens whose k-NN beats
randomly initialised features of the same architecture (both computed here), without collapse.

The feature measured is the mean of the teacher's output patch tokens, not the class token the
project's evaluation protocol reports: in a run this cheap (300 steps, 32-px crops, 4x4 tokens)
the class token does not move past random features, while the patch tokens under the
class-attention readout learn from the first hundreds of steps. The class token needs larger
crops and longer runs (the quick start's 64-px crops and 400 steps), too slow for a test.

Broken updates this must catch, each kept as a cheap test below: a teacher that never follows
the student (``optim.momentum_teacher 1``: its k-NN stays at the floor) and no centering
(``dino.center_momentum 1``: its patch k-NN still rises, 26.8-28.2 % against 24.0 %, so the
k-NN margin alone would pass it; the teacher's batch-mean output collapses onto one prototype,
KL to uniform -> log K, which the no-collapse condition catches).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_xcit.cli import main
from ssl_xcit.eval.export import Transformed, compute_features, eval_transform
from ssl_xcit.eval.knn import knn_evaluate
from ssl_xcit.image_sources import build_source
from ssl_xcit.weights import load_backbone, random_backbone
from tests.helpers import slice_cifar, tiny_pretrain_args

pytestmark = pytest.mark.slow

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEPTH, STEPS, MARGIN = 4, 300, 3.0


@pytest.fixture(scope="module")
def cifar_learning_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 training images per class (the run's data and the k-NN bank), 50 test images per class."""
    return slice_cifar(tmp_path_factory.mktemp("cifar_learning"), {"train": 100, "test": 50})


def pretrain(data: Path, run_dir: Path, **overrides: str) -> Path:
    settings = {
        "data__split": "train", "model__backbone_kwargs": f"{{depth: {DEPTH}}}",
        "model__out_dim": "1024", "model__head_hidden_dim": "512", "model__head_bottleneck_dim": "256",
        "data__batch_size_per_device": "64", "data__num_workers": "1", "trainer__max_epochs": "1000",
        "trainer__max_steps": str(STEPS), "trainer__log_every_n_steps": "15",
        "augment__local_crops_number": "0", "augment__global_crops_scale": "[0.4, 1.0]",
        "augment__color_jitter": "[0.8, 0.8, 0.8, 0.2]", "augment__blur_p_global1": "0", "augment__blur_p_global2": "0",
        "augment__mean": str(list(CIFAR_MEAN)), "augment__std": str(list(CIFAR_STD)),
        "optim__lr": "0.004", "optim__min_lr": "1e-5", "optim__momentum_teacher": "0.98", "optim__freeze_last_layer": "0"}
    assert main(["pretrain", *tiny_pretrain_args(str(data), run_dir, **{**settings, **overrides})]) == 0
    return run_dir / "checkpoints" / "last.ckpt"


def patch_mean_features(backbone: torch.nn.Module, images: Transformed) -> tuple[np.ndarray, np.ndarray]:
    """The mean patch token: the second half of the export's ``cls+avgpool`` feature."""
    backbone.eval()
    features, labels = compute_features(backbone, images, batch_size=250, num_workers=0,
                                        device=torch.device("cpu"), variant="cls+avgpool")
    return features[:, features.shape[1] // 2:], labels


def knn_top1(backbone: torch.nn.Module, data: Path, cache: Path) -> float:
    transform = eval_transform(32, 32, CIFAR_MEAN, CIFAR_STD)
    bank = patch_mean_features(backbone, Transformed(build_source(str(data), "train", str(cache)), transform))
    queries = patch_mean_features(backbone, Transformed(build_source(str(data), "test", str(cache)), transform))
    return knn_evaluate(*bank, *queries, ks=(20,), temperature=0.07)["results"][0]["top1"]


@pytest.fixture(scope="module")
def random_floor(cifar_learning_slice, tmp_path_factory) -> float:
    """The best of two random initialisations of the run's architecture (seeds 0 and 1)."""
    cache = tmp_path_factory.mktemp("cache")
    return max(knn_top1(random_backbone("xcit_nano_12_p8_224", seed, depth=DEPTH).model, cifar_learning_slice, cache)
               for seed in (0, 1))


def last_kl_to_uniform(run_dir: Path) -> float:
    """The teacher's batch-mean KL to uniform at the run's last logged step (log K: one prototype wins)."""
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("collapse/kl_to_uniform")]
    return float(max(rows, key=lambda r: int(r["step"]))["collapse/kl_to_uniform"])


def test_patch_tokens_of_a_short_run_beat_random_features_without_collapse(cifar_learning_slice, random_floor,
                                                                           tmp_path):
    """The mean patch token (see the module docstring for why not the class token) of the
    teacher after 300 steps beats the better of two random initialisations by MARGIN points,
    and the teacher's batch mean stays far from one prototype."""
    checkpoint = pretrain(cifar_learning_slice, tmp_path / "run")
    learned = knn_top1(load_backbone(str(checkpoint)).model, cifar_learning_slice, tmp_path)
    kl = last_kl_to_uniform(tmp_path / "run")
    print(f"teacher patch-mean k-NN {learned:.1f} % against {random_floor:.1f} % for random features; KL {kl:.2f}")
    assert learned > random_floor + MARGIN, (learned, random_floor)
    assert kl < 0.5 * math.log(1024), kl


def test_no_centering_collapses(cifar_learning_slice, tmp_path):
    """The second mutation: without centering one prototype takes every image within 60 steps."""
    pretrain(cifar_learning_slice, tmp_path / "run", dino__center_momentum="1.0", trainer__max_steps="60")
    assert last_kl_to_uniform(tmp_path / "run") > 0.5 * math.log(1024)


def test_a_frozen_teacher_does_not(cifar_learning_slice, random_floor, tmp_path):
    """The mutation the test above must catch: a teacher that never follows the student stays
    a random initialisation, whatever the student learns (a short run shows it)."""
    checkpoint = pretrain(cifar_learning_slice, tmp_path / "run", optim__momentum_teacher="1.0",
                          trainer__max_steps="30")
    learned = knn_top1(load_backbone(str(checkpoint)).model, cifar_learning_slice, tmp_path)
    assert learned <= random_floor + MARGIN, (learned, random_floor)
