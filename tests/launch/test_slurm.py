"""A real one-node SLURM cluster (tests/slurm/start_cluster.sh): submit, pre-empt, requeue, resume.

Skipped, with the reason, where no cluster answers. `.ci/run` starts one.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ssl_xcit.launch.submit import submit_jobs
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
    import csv

    with open(path) as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}
