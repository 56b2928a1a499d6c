"""A real one-node SLURM cluster (tests/slurm/start_cluster.sh): submit, pre-empt, requeue, resume.

Skipped, with the reason, where no cluster answers. `.ci/run` starts one.
"""

import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ssl_xcit.launch.submit import submit_jobs
from tests.helpers import assert_same_checkpoint
from tests.launch.test_local_cluster import (_wait_for_step, assert_requeued_once_and_identical, results_within,
                                             two_task_job_args)

CLUSTER_ENV = Path(os.environ.get("SSL_XCIT_SLURM_DIR", "/tmp/ssl-xcit-slurm")) / "env.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ON_SLURM = ("--cluster", "slurm", "--partition", "debug")


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Point this process at the test cluster, or skip saying why."""
    if CLUSTER_ENV.is_file():
        for line in CLUSTER_ENV.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            os.environ[key] = os.path.expandvars(value.strip("'\""))
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM here: start one with eval \"$(bash tests/slurm/start_cluster.sh)\"")
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.skip(f"no SLURM cluster answers ({probe.stderr.strip()[:120]}): "
                    "start one with eval \"$(bash tests/slurm/start_cluster.sh)\"")


def test_preempted_slurm_job_resumes_mid_epoch_and_continues_the_run(slurm_cluster, tmp_path):
    reference, = submit_jobs(two_task_job_args(tmp_path / "reference", *ON_SLURM))
    assert results_within(reference)[0].endswith("last.ckpt")

    run_dir = tmp_path / "preempted"
    job, = submit_jobs(two_task_job_args(run_dir, *ON_SLURM))
    try:
        _wait_for_step(run_dir / "checkpoints" / "last.ckpt", 2)
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
        result = results_within(job)[0]
    finally:
        subprocess.run(["scancel", job.job_id], check=False, timeout=30)
    stopped = assert_requeued_once_and_identical(result, run_dir, tmp_path / "reference")
    # the loss logged after the requeue continues the uninterrupted run's trajectory exactly
    resumed = _losses(run_dir / "logs" / "version_1" / "metrics.csv")
    whole = _losses(tmp_path / "reference" / "logs" / "version_0" / "metrics.csv")
    assert resumed and min(resumed) > stopped - 1
    assert all(resumed[step] == whole[step] for step in resumed)


def _losses(path: Path) -> dict[int, str]:
    with open(path) as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


MONITOR = ["--monitor.every_n_epochs", "1", "--monitor.train_path", "synthetic", "--monitor.max_train_images", "1500",
           "--monitor.max_val_images", "500", "--monitor.resize", "32", "--monitor.crop", "32", "--monitor.k", "5"]


def _job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else "UNKNOWN"


def test_requeue_during_the_monitor_resumes_and_ends_identical(slurm_cluster, tmp_path):
    """`scontrol requeue` right after epoch 0's last checkpoint, while the k-NN monitor runs:
    SLURM signals every process of the step (the loader workers too), the job stops or is
    killed, SLURM starts it again, and it ends at the same step as an uninterrupted job
    with the same weights and a k-NN figure for every epoch."""
    reference, = submit_jobs(two_task_job_args(tmp_path / "reference", *ON_SLURM) + MONITOR)
    assert results_within(reference)[0].endswith("last.ckpt")

    run_dir = tmp_path / "requeued"
    job, = submit_jobs(two_task_job_args(run_dir, *ON_SLURM) + MONITOR)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        _wait_for_step(last, 16)  # epoch 0's last batch (16 steps an epoch): its monitor starts now
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)
        _wait_for_step(last, 40, timeout=600)
        deadline = time.time() + 300
        while _job_state(job.job_id) != "COMPLETED" and time.time() < deadline:
            time.sleep(1)
        assert _job_state(job.job_id) == "COMPLETED"
    finally:
        subprocess.run(["scancel", job.job_id], check=False, timeout=30)
    log = (run_dir / "job.log").read_text()
    assert log.count(" start (requeue") == 2, log
    assert_same_checkpoint(torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True),
                           torch.load(last, weights_only=True), 40)
    logged, expected = _knn_steps(run_dir), _knn_steps(tmp_path / "reference")
    # every epoch's end (16, 32) and the run's end at max_steps (40, within epoch 2) has its figure
    assert expected == {16, 32, 40}, expected
    assert logged == expected, logged


def _knn_steps(run_dir: Path) -> set[int]:
    return {int(r["step"]) for p in (run_dir / "logs").glob("version_*/metrics.csv")
            for r in csv.DictReader(open(p)) if r.get("knn/top1_k5")}
