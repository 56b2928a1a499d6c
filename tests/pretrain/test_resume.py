"""Exact resume: S steps in one go == k steps, an interruption, and a resume to S, bit for bit."""

import os
import signal
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import tiny_pretrain_args
from ssl_xcit.cli import main
from ssl_xcit.pretrain.command import parse_pretrain_args
from ssl_xcit.pretrain.preemption import PreemptionFlag
from ssl_xcit.pretrain.run import run_pretraining
from ssl_xcit.pretrain.stop import StopController

TOTAL = 12  # 64 images / batch 8 = 8 steps per epoch: the run crosses an epoch boundary


def config(run_dir: Path, workers: str = "0", augment_device: str = "workers"):
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="64", data__synthetic_resolution="40",
                              data__num_workers=workers, trainer__max_epochs="3", trainer__max_steps=str(TOTAL),
                              model__drop_path_rate="0.1", trainer__deterministic="true",
                              augment__device=augment_device)
    return parse_pretrain_args(args)[0]


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == TOTAL
    return ckpt


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


class SignalAtStep(pl.Callback):
    """Sends this process a signal while step ``k`` runs, as a cluster would at any moment."""

    def __init__(self, k: int, signum: int) -> None:
        self.k, self.signum = k, signum

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == self.k - 1:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_pretraining(config(run_dir), run_dir)
    return final_state(run_dir)


@pytest.fixture(scope="module")
def uninterrupted_on_device(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted_on_device")
    run_pretraining(config(run_dir, augment_device="train"), run_dir)
    return final_state(run_dir)


def interrupt_and_resume(tmp_path: Path, k: int, workers: str, augment_device: str = "workers") -> dict:
    """A signal during step k stops the run at the next decision point: the next logging step
    (every 2 steps in these runs), which is also where the epoch ends (8 steps)."""
    flag = PreemptionFlag(signal.SIGUSR2)
    flag.install()
    try:
        stop = StopController(flag)
        run_pretraining(config(tmp_path, workers, augment_device), tmp_path,
                        extra_callbacks=[SignalAtStep(k, signal.SIGUSR2)], stop=stop)
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stopped_at = k + k % 2
    assert stop.stopped_by_signal and stop.decision.step == stopped_at and flag.requeue
    interrupted = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert interrupted["global_step"] == stopped_at
    run_pretraining(config(tmp_path, workers, augment_device), tmp_path)  # the requeued job: same command
    return final_state(tmp_path)


@pytest.mark.parametrize("k,workers", [(5, "0"), (8, "0"), (3, "2")], ids=["mid-epoch", "epoch-end", "workers"])
def test_signal_then_resume_is_bit_identical(uninterrupted, tmp_path, k, workers):
    assert_bit_identical(uninterrupted, interrupt_and_resume(tmp_path, k, workers))


@pytest.mark.parametrize("k", [5, 8], ids=["mid-epoch", "epoch-end"])
def test_resume_with_colour_on_the_training_device_is_bit_identical(uninterrupted_on_device, tmp_path, k):
    """augment.device=train: the colour parameters travel with the crops, drawn from the
    per-sample seeds, so an interrupted run sees the same images."""
    assert_bit_identical(uninterrupted_on_device, interrupt_and_resume(tmp_path, k, "0", "train"))


def test_colour_on_the_device_trains_on_the_same_crops_as_in_workers(uninterrupted, uninterrupted_on_device):
    assert_bit_identical(uninterrupted, uninterrupted_on_device)


@pytest.mark.slow
def test_killed_process_resumes_from_last_periodic_checkpoint_bit_identically(uninterrupted, tmp_path):
    """A crash (SIGKILL, no warning) loses only the steps since the last periodic checkpoint."""
    import subprocess
    import sys

    args = tiny_pretrain_args("synthetic", tmp_path, data__synthetic_size="64", data__synthetic_resolution="40",
                              trainer__max_epochs="3", trainer__max_steps=str(TOTAL), model__drop_path_rate="0.1",
                              trainer__deterministic="true", run__checkpoint_every_n_steps="3")
    env = dict(os.environ, JSONARGPARSE_DEPRECATION_WARNINGS="off")
    proc = subprocess.Popen([sys.executable, "-m", "ssl_xcit.cli", "pretrain", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 6:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=60)
    assert torch.load(last, weights_only=True)["global_step"] < TOTAL, "the run finished before it was killed"
    assert main(["pretrain", *args]) == 0
    assert_bit_identical(uninterrupted, final_state(tmp_path))
