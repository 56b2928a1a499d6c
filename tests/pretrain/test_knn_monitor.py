"""The k-NN monitor: its held-out queries, its figure against a k-NN written out naively, and
its passes shared by two processes."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_xcit.errors import UserError
from ssl_xcit.image_sources import describe
from ssl_xcit.pretrain.command import parse_pretrain_args
from ssl_xcit.pretrain.knn_monitor import KNNMonitor, monitor_sets
from ssl_xcit.pretrain.run import run_pretraining
from ssl_xcit.weights import load_backbone
from tests.helpers import tiny_pretrain_args
from tests.pretrain import monitor_probe

HERE = Path(__file__).parent


def monitor_config(images: Path, tmp_path: Path, **overrides: str):
    return parse_pretrain_args(tiny_pretrain_args(str(images), tmp_path / "run", monitor__train_path=str(images),
                                                  **overrides))[0]


def paths_by_class(source) -> dict[int, set]:
    paths, labels, _ = describe(source)
    by_class: dict[int, set] = {}
    for path, label in zip(paths, labels):
        by_class.setdefault(label, set()).add(path)
    return by_class


@pytest.mark.parametrize("fraction,per_class", [(0.1, 3), (0.02, 1)])  # of 30 images a class, rounded
def test_holdout_queries_are_a_share_of_each_training_class_and_not_in_the_bank(cifar_slice, tmp_path, fraction,
                                                                               per_class):
    cfg = monitor_config(cifar_slice, tmp_path, monitor__holdout_fraction=str(fraction))
    bank, queries = (paths_by_class(s) for s in monitor_sets(cfg.monitor, cfg.data.cache_dir))
    train = paths_by_class(monitor_sets(monitor_config(cifar_slice, tmp_path, monitor__val_split="train").monitor,
                                        cfg.data.cache_dir)[1])
    assert sorted(queries) == sorted(bank) == list(range(10))
    for c in range(10):
        assert len(train[c]) == 30 and all("/train/" in p for p in train[c])
        assert len(queries[c]) == per_class and not queries[c] & bank[c]
        assert queries[c] | bank[c] == train[c]


def test_holdout_is_cut_after_it_is_carved_and_the_test_split_stays_on_request(cifar_slice, tmp_path):
    full_bank, full_queries = (set(describe(s)[0]) for s in monitor_sets(
        monitor_config(cifar_slice, tmp_path, monitor__holdout_fraction="0.1").monitor, str(tmp_path / "cache")))
    cfg = monitor_config(cifar_slice, tmp_path, monitor__holdout_fraction="0.1", monitor__max_train_images="100",
                         monitor__max_val_images="20")
    bank, queries = (set(describe(s)[0]) for s in monitor_sets(cfg.monitor, cfg.data.cache_dir))
    assert len(bank) == 100 and bank <= full_bank and len(queries) == 20 and queries <= full_queries
    explicit = monitor_config(cifar_slice, tmp_path, monitor__val_split="test").monitor
    bank, queries = (describe(s)[0] for s in monitor_sets(explicit, cfg.data.cache_dir))
    assert len(bank) == 300 and len(queries) == 100 and all("/test/" in p for p in queries)


def test_holdout_sets_of_synthetic_images_can_be_read(tmp_path):
    """The held-out split indexes its source with plain ints: synthetic images seed their pixels with them."""
    cfg = monitor_config("synthetic", tmp_path, monitor__holdout_fraction="0.1")
    bank, queries = monitor_sets(cfg.monitor, cfg.data.cache_dir)
    assert len(queries) > 0 and len(bank) > len(queries)
    image, label = queries[0]
    row = queries.indices[0]
    assert label == row % 10 and torch.equal(image, monitor_sets(cfg.monitor, cfg.data.cache_dir)[1][0][0])


@pytest.mark.parametrize("fraction", ["0", "1.0", "0.01"])  # 0.01 of 30 rounds to no image of any class
def test_a_holdout_fraction_that_holds_nothing_out_is_refused(cifar_slice, tmp_path, fraction):
    cfg = monitor_config(cifar_slice, tmp_path, monitor__holdout_fraction=fraction)
    with pytest.raises(UserError, match="^monitor.holdout_fraction"):
        monitor_sets(cfg.monitor, cfg.data.cache_dir)


def naive_knn(backbone: torch.nn.Module, bank, queries, mean, std, k: int, temperature: float) -> tuple[float, float]:
    """DINO's weighted k-NN written out: features of each image computed here, cosine similarity
    to every bank image, the k most similar vote exp(s / T) for their class, ties to the lower
    class. Returns (top-1, top-5) in percent."""
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def features(source) -> tuple[list, list]:
        paths, labels, _ = describe(source)
        pixels = [np.array(Image.open(p).convert("RGB")) for p in paths]
        assert all(p.shape == (32, 32, 3) for p in pixels)  # the monitor's 32-px resize and crop leave them be
        x = torch.stack([(torch.from_numpy(p).permute(2, 0, 1) / 255.0 - mean) / std for p in pixels])
        with torch.no_grad():
            f = backbone.eval()(x.float()).double().numpy()
        return [row / np.linalg.norm(row) for row in f], labels

    bank_x, bank_y = features(bank)
    query_x, query_y = features(queries)
    top1 = top5 = 0
    for q, label in zip(query_x, query_y):
        sims = [float(np.dot(q, b)) for b in bank_x]
        votes = [0.0] * 10
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            votes[bank_y[j]] += math.exp(sims[j] / temperature)
        ranking = sorted(range(10), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == label
        top5 += label in ranking[:5]
    return 100.0 * top1 / len(query_y), 100.0 * top5 / len(query_y)


def test_a_pass_is_the_naive_knn_of_the_backbone_in_eval_mode(cifar_slice, tmp_path):
    """A stand-in backbone (a random projection of the pixels) whose cosine similarities spread
    widely, so that k and the temperature sway the vote; its train mode comes back after."""
    cfg = parse_pretrain_args(monitor_probe.monitor_args(tmp_path, str(cifar_slice), "--monitor.k", "20"))[0]
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 64)).train()
    modes = []
    backbone.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    report = KNNMonitor(cfg).evaluate(backbone, torch.device("cpu"))
    assert backbone.training and modes and not any(modes)
    bank, queries = monitor_sets(cfg.monitor, cfg.data.cache_dir)
    want = naive_knn(backbone, bank, queries, cfg.augment.mean, cfg.augment.std, k=20, temperature=0.07)
    assert (report["results"][0]["top1"], report["results"][0]["top5"]) == pytest.approx(want, abs=1e-9)
    assert (report["num_train"], report["num_test"], report["dim"]) == (240, 60, 64)


def logged(run_dir: Path, key: str, version: int = 0) -> dict[int, float]:
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_the_figure_logged_is_the_naive_knn_of_the_teacher_on_the_holdout(cifar_slice, tmp_path, capsys):
    cfg = parse_pretrain_args(monitor_probe.monitor_args(tmp_path, str(cifar_slice)))[0]
    run_pretraining(cfg, tmp_path / "run")
    top1, top5 = (logged(tmp_path / "run", f"knn/{key}_k5") for key in ("top1", "top5"))
    assert list(top1) == list(top5) == [2]  # 16 images / batch 8: the epoch's last step
    teacher = load_backbone(tmp_path / "run" / "checkpoints" / "last.ckpt").model  # as it was at the epoch's end
    bank, queries = monitor_sets(cfg.monitor, cfg.data.cache_dir)
    assert (len(bank), len(queries)) == (240, 60)
    want = naive_knn(teacher, bank, queries, cfg.augment.mean, cfg.augment.std, k=5, temperature=0.07)
    assert (top1[2], top5[2]) == pytest.approx(want, abs=1e-9)
    assert "teacher k-NN top-1 (k=5)" in capsys.readouterr().out


def run_probe(out: Path, images: Path, *extra: str) -> None:
    env = dict(os.environ, JSONARGPARSE_DEPRECATION_WARNINGS="off")
    proc = subprocess.run([sys.executable, str(HERE / "monitor_probe.py"), str(out), str(images), *extra], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def computed(out: Path, rank: int) -> list[list[int]]:
    """Images each feature pass of ``rank`` computed, a list per invocation of the probe."""
    return [json.loads(line) for line in (out / f"computed_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_share_each_pass_and_log_the_one_process_figures(cifar_slice, tmp_path, monkeypatch):
    """2 CPU processes (gloo): each computes half of the bank (240) and of the queries (60) in
    every pass: the floor and the starting teacher at step 0, epoch 0's end, and epoch 0 again
    after a resume. Step 0's figures equal a single process's; the resumed pass, where both
    ranks hold the checkpoint's teacher, equals the naive k-NN of that teacher."""
    two, one = tmp_path / "two", tmp_path / "one"
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--monitor.at_start", "true"]
    run_probe(two, cifar_slice, *ddp)
    assert computed(two, 0) == computed(two, 1) == [[120, 30] * 3]  # floor, step 0, epoch 0
    epoch_end = two / "epoch0.ckpt"
    shutil.copy(two / "run" / "checkpoints" / "last.ckpt", epoch_end)

    monkeypatch.setattr(monitor_probe, "COMPUTED", [])
    monitor_probe.count_images()
    cfg = parse_pretrain_args(monitor_probe.monitor_args(one, str(cifar_slice), "--monitor.at_start", "true"))[0]
    run_pretraining(cfg, one / "run")
    assert monitor_probe.COMPUTED == [240, 60] * 3
    for key in ("knn/random_top1_k5", "knn/top1_k5", "knn/top5_k5"):
        assert logged(two / "run", key)[0] == logged(one / "run", key)[0], key
    assert logged(two / "run", "knn/rankme")[0] == pytest.approx(logged(one / "run", "knn/rankme")[0], rel=1e-4)

    run_probe(two, cifar_slice, *ddp, "--trainer.max_epochs", "2", "--run.resume", "true")
    assert computed(two, 0)[1] == computed(two, 1)[1] == [120, 30] * 2  # epoch 0 again, then epoch 1
    again = logged(two / "run", "knn/top1_k5", version=1)
    assert list(again) == [1, 2]  # 16 images / (8 a process x 2): a step an epoch
    bank, queries = monitor_sets(cfg.monitor, cfg.data.cache_dir)
    want = naive_knn(load_backbone(epoch_end).model, bank, queries, cfg.augment.mean, cfg.augment.std, 5, 0.07)
    assert again[1] == pytest.approx(want[0], abs=1e-9)
