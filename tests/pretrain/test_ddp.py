"""Two CPU processes (gloo) pretrain together: the center is all-reduced and the teachers agree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
# SyncBatchNorm is GPU-only in torch: on CPU each process keeps its own running statistics
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def run_probe(out: Path, *extra: str) -> None:
    env = dict(os.environ, JSONARGPARSE_DEPRECATION_WARNINGS="off")
    proc = subprocess.run([sys.executable, str(HERE / "ddp_probe.py"), str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_center_and_teacher_agree(tmp_path):
    run_probe(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    steps = sorted({int(p.stem.split("step")[1]) for p in tmp_path.glob("rank0_step*.pt")})
    assert steps == [1, 2, 3, 4]  # 32 images / (4 per process * 2 processes)
    for step in steps:
        r0, r1 = (torch.load(tmp_path / f"rank{r}_step{step}.pt", weights_only=True) for r in (0, 1))
        assert r0["world_size"] == r1["world_size"] == 2
        assert not torch.equal(r0["batch"], r1["batch"]), "ranks must see different images"
        assert torch.equal(r0["center"], r1["center"])
        for net in ("teacher", "student"):
            params = [k for k in r0[net] if not k.endswith(BATCHNORM_STATS)]
            assert all(torch.equal(r0[net][k], r1[net][k]) for k in params), net


@pytest.mark.slow
def test_center_update_is_mean_over_both_ranks(tmp_path):
    """After step 1: center = (1 - m) * mean over ranks of each rank's teacher-logit batch mean."""
    run_probe(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "1")
    r0, r1 = (torch.load(tmp_path / f"rank{r}_step1.pt", weights_only=True) for r in (0, 1))
    assert not torch.allclose(r0["local_mean"], r1["local_mean"])
    want = (1 - 0.9) * (r0["local_mean"] + r1["local_mean"]) / 2
    assert torch.allclose(r0["center"], want, atol=1e-7) and torch.equal(r0["center"], r1["center"])
