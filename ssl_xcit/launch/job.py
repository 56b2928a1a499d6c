"""The submitit job that runs ``ssl-xcit pretrain`` on a cluster and survives pre-emption.

Exactly one component owns requeueing: submitit. Its own USR2 handler would checkpoint
and requeue from inside the signal handler, in the middle of a training step. So the job
puts a handler in front that only raises a flag. At the next step boundary every rank
agrees on the flag (one boolean all-reduce), ``last.ckpt`` is written atomically
(:class:`~ssl_xcit.pretrain.checkpointing.LastCheckpoint` saves when training stops), and rank 0
hands over to submitit's handler. That handler calls :meth:`PretrainJob.checkpoint`,
pickles the resubmission and requeues the job (``scontrol requeue``). The requeued job
resumes from ``last.ckpt`` exactly. Lightning's own SLURM requeue is never installed:
the job runs under Lightning's plain environment, fed by submitit's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import submitit
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.utilities import rank_zero_only

from ssl_xcit.compat import submitit_requeue_signal
from ssl_xcit.pretrain.command import parse_pretrain_args, run_dir as run_dir_of
from ssl_xcit.pretrain.preemption import PreemptionFlag, StopOnPreemption

DEFAULT_MAX_REQUEUES = 20


def export_distributed_env() -> submitit.JobEnvironment:
    """Turn submitit's job environment into the variables Lightning's plain environment reads."""
    env = submitit.JobEnvironment()
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    os.environ["NODE_RANK"] = str(env.node)
    # Lightning read the rank when it was imported, before these variables existed (submitit's
    # local executor sets none it knows): without this every task would write rank 0's files
    rank_zero_only.rank = env.global_rank
    return env


def log_line(run_dir: Path, message: str) -> None:
    """Append a time-stamped line to ``run_dir/job.log`` and echo it to the job's stdout."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    print(line, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "job.log", "a") as f:
        f.write(line + "\n")


class PretrainJob(submitit.helpers.Checkpointable):
    """``ssl-xcit pretrain ARGV`` as a checkpointable submitit job.

    Args:
        max_requeues: pre-emptions/time-outs after which the job is not requeued again.
        requeues: how many times this job has been requeued already.
    """

    def __init__(self, max_requeues: int = DEFAULT_MAX_REQUEUES, requeues: int = 0) -> None:
        self.max_requeues, self.requeues = max_requeues, requeues

    def __call__(self, argv: Sequence[str]) -> str:
        from ssl_xcit.pretrain.run import run_pretraining

        env = export_distributed_env()
        flag = PreemptionFlag(submitit_requeue_signal())
        flag.install()
        parsed = parse_pretrain_args(argv)
        cfg, run_dir = parsed.options, run_dir_of(parsed)
        if env.global_rank == 0:
            log_line(run_dir, f"job {env.job_id} start (requeue {self.requeues} of at most {self.max_requeues}), "
                              f"{env.num_tasks} task(s) on {env.num_nodes} node(s)")
        stopper = StopOnPreemption(flag)
        last = run_pretraining(cfg, run_dir, parsed.dump(), extra_callbacks=[stopper],
                               environment=LightningEnvironment())
        if stopper.stopped_at_step is None:
            if env.global_rank == 0:
                log_line(run_dir, f"job {env.job_id} finished: {last}")
            return str(last)
        what = "pre-empted" if flag.requeue else "stopped by SIGTERM"
        if env.global_rank == 0:
            log_line(run_dir, f"job {env.job_id} {what}: checkpoint at step {stopper.stopped_at_step} in {last}")
            if flag.requeue:
                self._hand_over_to_submitit(flag)
        return f"{what} at step {stopper.stopped_at_step}"

    @staticmethod
    def _hand_over_to_submitit(flag: PreemptionFlag) -> None:
        """Let submitit's own handler checkpoint (our ``checkpoint``) and requeue; it exits."""
        handler: Callable[..., Any] = flag.replaced[flag.requeue_signal]
        if callable(handler):
            handler(flag.requeue_signal, None)

    def checkpoint(self, argv: Sequence[str]) -> Optional[submitit.helpers.DelayedSubmission]:
        """The resubmission: the same command, which resumes from ``last.ckpt`` (already saved)."""
        if self.requeues >= self.max_requeues:
            return None  # submitit then ends the job with "checkpoint function returned None"
        return submitit.helpers.DelayedSubmission(PretrainJob(self.max_requeues, self.requeues + 1), list(argv))
