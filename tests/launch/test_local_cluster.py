"""Cluster behaviour on one machine: two "nodes" in DDP, and a pre-empted submitit job."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_same_checkpoint, tiny_pretrain_args
from ssl_xcit.launch.submit import submit_jobs

DDP_PROBE = Path(__file__).parents[1] / "pretrain" / "ddp_probe.py"
STEPS = 40  # 128 images / (4 x 2 processes) = 16 steps per epoch: the job crosses epoch ends


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    return dict(env, JSONARGPARSE_DEPRECATION_WARNINGS="off", PROBE_FREEZE_BN="1", **extra)


@pytest.mark.slow
def test_two_nodes_agree_with_one_process_on_the_center_update(tmp_path):
    """num_nodes=2 x 1 device over localhost: ranks, global batch, lr and the all-reduced center
    behave as one process with the same global batch (BatchNorm frozen: SyncBatchNorm is GPU-only)."""
    port = str(free_port())
    common = ["--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
              "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"]
    nodes = [subprocess.Popen([sys.executable, str(DDP_PROBE), str(tmp_path / "two"), *common],
                              env=probe_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                                            NODE_RANK=str(rank), LOCAL_RANK="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    single = subprocess.run([sys.executable, str(DDP_PROBE), str(tmp_path / "one"),
                             "--data.batch_size_per_device", "8", "--trainer.max_steps", "2",
                             "--trainer.log_every_n_steps", "1"],
                            env=probe_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    assert "global batch 8 on 2 process(es): peak lr 1.56e-05" in outputs[0]
    assert "global batch 8 on 1 process(es): peak lr 1.56e-05" in single.stdout + single.stderr
    for step in (1, 2):
        r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}_step{step}.pt", weights_only=True) for r in (0, 1))
        one = torch.load(tmp_path / "one" / f"rank0_step{step}.pt", weights_only=True)
        assert r0["world_size"] == r1["world_size"] == 2 and one["world_size"] == 1
        assert torch.equal(r0["center"], r1["center"])
        assert torch.allclose(r0["center"], one["center"], atol=1e-6), (r0["center"] - one["center"]).abs().max()


def results_within(job, timeout: float = 600) -> list:
    """The job's task results, or a failure (the job cancelled) if it has not ended in ``timeout`` s:
    a hung job must fail the test, not block the suite."""
    deadline = time.time() + timeout
    while not job.done():
        if time.time() > deadline:
            job.cancel(check=False)
            raise AssertionError(f"job {job.job_id} still running after {timeout:.0f} s")
        time.sleep(1)
    return job.results()


def _signal_tasks(controller_pid: str, signum: str) -> None:
    """Deliver ``signum`` to every task, as SLURM does (the local job id is its controller's pid)."""
    subprocess.run(["pkill", f"-{signum}", "-P", controller_pid], check=True)


def _wait_for_step(last: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if torch.load(last, weights_only=True)["global_step"] >= step:
                return
        except (FileNotFoundError, EOFError, RuntimeError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{last} never reached step {step}")


def two_task_job_args(run_dir: Path, *cluster: str) -> list[str]:
    """`ssl-xcit submit` arguments of a 2-process CPU job of STEPS steps, checkpointing every 2."""
    return tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="128", data__synthetic_resolution="40",
                              data__batch_size_per_device="4", trainer__max_epochs="3", trainer__max_steps=str(STEPS),
                              model__drop_path_rate="0.1", run__checkpoint_every_n_steps="2") + [
        "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "01:00:00", *cluster]


@pytest.mark.slow
def test_preempted_local_job_requeues_and_ends_bit_identical(tmp_path):
    """Two CPU processes under submitit's local executor: USR2 mid-epoch → checkpoint at the next
    step, requeue, resume; the final weights equal those of an uninterrupted job."""
    reference, = submit_jobs(two_task_job_args(tmp_path / "reference", "--cluster", "local"))
    assert results_within(reference)[0].endswith("last.ckpt")

    run_dir = tmp_path / "preempted"
    job, = submit_jobs(two_task_job_args(run_dir, "--cluster", "local"))
    _wait_for_step(run_dir / "checkpoints" / "last.ckpt", 2)
    _signal_tasks(job.job_id, "USR2")
    assert_requeued_once_and_identical(results_within(job)[0], run_dir, tmp_path / "reference")


def assert_requeued_once_and_identical(result: str, run_dir: Path, reference_dir: Path) -> int:
    """The job was pre-empted mid-run, requeued once, finished at STEPS with the reference's
    weights bit for bit; returns the step it was pre-empted at."""
    assert result.endswith("last.ckpt"), result
    log = (run_dir / "job.log").read_text()
    assert "pre-empted: checkpoint at step" in log and "start (requeue 1 of at most" in log, log
    stopped = int(log.split("checkpoint at step ")[1].split()[0])
    assert 2 <= stopped < STEPS
    assert_same_checkpoint(torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True),
                           torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True), STEPS)
    return stopped
