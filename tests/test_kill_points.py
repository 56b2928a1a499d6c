"""Exact resume from any stop: a CLI run on real images is killed (or signalled) at each kind
of point of its first two epochs, run again with the same command, and must end at the
same step with every tensor equal to an uninterrupted run's.

256 images, batch 32 (8 steps an epoch), 2 loader workers, ``last.ckpt`` every 4 steps and
at each epoch's end, the k-NN monitor after every epoch; 24 steps in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, assert_same_checkpoint, tiny_pretrain_args

TOTAL = 24


def run_args(run_dir: Path, images: Path) -> list[str]:
    return tiny_pretrain_args(
        str(images), run_dir, data__split="train", data__max_images="256", data__batch_size_per_device="32",
        data__num_workers="2", trainer__max_epochs="3", trainer__max_steps=str(TOTAL),
        run__checkpoint_every_n_steps="4", run__saveckp_freq="0", model__drop_path_rate="0.1",
        monitor__every_n_epochs="1", monitor__train_path=str(images), monitor__max_train_images="100",
        monitor__max_val_images="50", monitor__resize="32", monitor__crop="32", monitor__k="5")


def ssl_xcit(args: list[str], when: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (through tests/kill_switch.py when ``when`` is given)."""
    prefix = ["-m", "tests.kill_switch", when, "--"] if when else ["-m", "ssl_xcit.cli"]
    env = dict(os.environ, JSONARGPARSE_DEPRECATION_WARNINGS="off")
    return subprocess.run([sys.executable, *prefix, "pretrain", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def monitored_epochs(run_dir: Path) -> set[int]:
    """Epochs whose k-NN figure reached any of the run's CSV logs (the monitor logs at the epoch's last step)."""
    steps = set()
    for csv_file in (run_dir / "logs").glob("version_*/metrics.csv"):
        lines = csv_file.read_text().splitlines()
        header = lines[0].split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("knn/top1_k5"):
                steps.add(int(row["step"]))
    return {step // 8 - 1 for step in steps if step > 0}


@pytest.fixture(scope="module")
def uninterrupted(cifar_slice, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = ssl_xcit(run_args(run_dir, cifar_slice))
    assert done.returncode == 0, done.stderr[-3000:]
    assert monitored_epochs(run_dir) == {0, 1, 2}
    return final(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("when", [
    "kill@save:4",         # a periodic checkpoint mid-epoch
    "kill@save:8",         # the checkpoint of epoch 0's last batch, before the epoch's end
    "kill@monitor:0",      # during epoch 0's k-NN monitor
    "kill@epoch-start:1",  # right after epoch 0 ended (monitor done)
    "kill@save:12",        # mid-epoch in epoch 1
    "kill@save:16",        # the last batch of epoch 1
])
def test_killed_at_any_point_resumes_bit_identical(uninterrupted, cifar_slice, tmp_path, when):
    args = run_args(tmp_path, cifar_slice)
    killed = ssl_xcit(args, when)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert final(tmp_path)["global_step"] < TOTAL
    resumed = ssl_xcit(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_checkpoint(uninterrupted, final(tmp_path), TOTAL)
    assert monitored_epochs(tmp_path) == {0, 1, 2}, "a k-NN figure was lost with the stop"


@pytest.mark.slow
@pytest.mark.parametrize("when,stopped_at", [("term@monitor:0", 8), ("usr2@step:5", 6)])
def test_signal_to_every_process_stops_cleanly_and_resumes_bit_identical(uninterrupted, cifar_slice, tmp_path,
                                                                         when, stopped_at):
    """SLURM signals the main process and its loader workers alike: the workers keep going,
    the run stops at the stop controller's next decision point (after the monitor, or the next
    logging step: every 2 steps here) with last.ckpt for it, and the same command continues."""
    args = run_args(tmp_path, cifar_slice)
    stopped = ssl_xcit(args, when)
    signum = signal.SIGTERM if when.startswith("term") else signal.SIGUSR2
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert f"at step {stopped_at}" in stopped.stdout + stopped.stderr
    assert "killed by signal" not in stopped.stderr
    assert final(tmp_path)["global_step"] == stopped_at
    resumed = ssl_xcit(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_checkpoint(uninterrupted, final(tmp_path), TOTAL)


def test_loader_workers_ignore_stop_signals_from_the_cluster(tmp_path):
    """SIGTERM and USR2 from another process (as SLURM signals every process of a step) to every
    worker mid-epoch: the epoch goes on (a worker without the handler dies and the loader raises)."""
    from torch.utils.data import DataLoader

    from ssl_xcit.pretrain.command import parse_pretrain_args
    from ssl_xcit.pretrain.data import PretrainDataModule

    cfg = parse_pretrain_args(tiny_pretrain_args("synthetic", tmp_path, data__synthetic_size="64",
                                                 data__synthetic_resolution="40", data__num_workers="2")).options
    datamodule = PretrainDataModule(cfg.data, cfg.augment, 0)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()  # persistent workers: alive until the loader goes
    batches, workers = _signal_workers_mid_epoch(loader)
    assert len(batches) == 8 and all(w.is_alive() for w in workers)
    plain = DataLoader(datamodule.dataset, batch_size=8, sampler=datamodule.sampler, num_workers=2)
    # torch reports a dead worker from its SIGCHLD handler or, when a queue read sees it first, as an exit
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):
        _signal_workers_mid_epoch(plain)


def _sleep_as_a_loader_worker() -> None:
    from ssl_xcit.pretrain.preemption import ignore_stop_signals

    ignore_stop_signals(0)
    time.sleep(60)


def test_a_worker_still_obeys_its_parents_sigterm():
    """multiprocessing ends a worker that outlived its loader with SIGTERM from the parent:
    ignoring that one would hang the parent's exit."""
    import multiprocessing

    worker = multiprocessing.get_context("fork").Process(target=_sleep_as_a_loader_worker, daemon=True)
    worker.start()
    time.sleep(1)
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # the cluster
    subprocess.run(["kill", "-USR2", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    worker.terminate()  # the parent
    worker.join(timeout=10)
    assert not worker.is_alive()


def _signal_workers_mid_epoch(loader) -> tuple[list, list]:
    """Two batches, SIGTERM and SIGUSR2 from another process to every worker, the rest."""
    batches = iter(loader)
    got = [next(batches), next(batches)]
    workers = list(batches._workers)
    for name in ("TERM", "USR2"):
        subprocess.run(["kill", f"-{name}", *(str(w.pid) for w in workers)], check=True)
    time.sleep(1)
    return got + list(batches), workers
