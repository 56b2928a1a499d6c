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


# A real time limit of 2 minutes with USR2 50 s before it. slurmctld checks time limits every 30 s
# and signals a job once its remaining time is within the delay plus that period, so the signal
# reaches a job 40 to 70 s after it starts (with a larger delay it could come while Python is still
# importing, before any handler exists, and kill the task). Each segment stops at the first
# decision point after the signal: with decision points every D steps (logging every D, one long
# epoch, no periodic checkpoint), sized so that the first comes about 92 s after the start (after
# the latest signal, before the limit), every segment trains exactly D steps.
TIME_LIMIT, SIGNAL_DELAY_S, MAX_REQUEUES, FIRST_DECISION_S = "00:02:00", 50, 6, 92


def _timed_job_args(run_dir: Path, steps: int, log_every: int, *cluster: str) -> list[str]:
    """The 2-task job of these tests, `steps` long (its schedules span them) in one epoch, deciding
    (logging) every `log_every` steps (later arguments override earlier ones)."""
    return two_task_job_args(run_dir, *ON_SLURM, *cluster) + [
        "--trainer.max_steps", str(steps), "--trainer.max_epochs", "1", "--data.synthetic_size", str(8 * (steps + 8)),
        "--trainer.log_every_n_steps", str(log_every), "--run.checkpoint_every_n_steps", "0"]


def _start_time(job_id: str) -> float:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return time.mktime(time.strptime(out.split("StartTime=")[1].split()[0], "%Y-%m-%dT%H:%M:%S"))


def _loss_wall_times(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.wall_time for e in events.Scalars("train/loss")}


def _steps_to_first_decision(tmp_path: Path) -> int:
    """D such that D steps end about FIRST_DECISION_S after the job starts, on this machine: from a
    short calibration job, the seconds a step takes and the seconds before the first one."""
    run_dir = tmp_path / "calibration"
    job, = submit_jobs(_timed_job_args(run_dir, 100, 2))
    assert results_within(job)[0].endswith("last.ckpt")
    walls = _loss_wall_times(run_dir)
    first, last = min(walls), max(walls)
    per_step = (walls[last] - walls[first]) / (last - first)
    startup = walls[first] - _start_time(job.job_id) - (first + 1) * per_step
    return max(10, round((FIRST_DECISION_S - startup) / per_step))


@pytest.mark.timeout(2400)
def test_time_outs_requeue_as_many_times_as_asked_and_end_identical(slurm_cluster, tmp_path):
    """A 2-minute time limit and --max-requeues 6: the job times out at least 4 times, is requeued
    each time (submitit's own limit of 3 time-outs does not end it), stops each time at a multiple
    of D steps, and ends at its last step with the weights of an uninterrupted job."""
    d = _steps_to_first_decision(tmp_path)
    steps = 4 * d + d // 2
    run_dir = tmp_path / "timed"
    job, = submit_jobs(_timed_job_args(run_dir, steps, d, "--time", TIME_LIMIT, "--signal-delay-s",
                                       str(SIGNAL_DELAY_S), "--max-requeues", str(MAX_REQUEUES)))
    try:
        result = results_within(job, timeout=1500)[0]
    finally:
        subprocess.run(["scancel", job.job_id], check=False, timeout=30)
    log = (run_dir / "job.log").read_text()
    timeouts = log.count(" timed out (time-out ")
    stopped_at = [int(line.split("checkpoint at step ")[1].split()[0]) for line in log.splitlines()
                  if " timed out (time-out " in line]
    assert result.endswith("last.ckpt"), (result, log)
    assert 4 <= timeouts <= MAX_REQUEUES and log.count(" start (requeue ") == timeouts + 1, log
    assert stopped_at[:4] == [d, 2 * d, 3 * d, 4 * d], (d, log)
    assert "pre-empted" not in log and " finished: " in log.splitlines()[-1], log
    reference, = submit_jobs(_timed_job_args(tmp_path / "reference", steps, d))
    assert results_within(reference, timeout=900)[0].endswith("last.ckpt")
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == steps
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
