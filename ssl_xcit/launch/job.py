"""The submitit job that runs ``ssl-xcit pretrain`` on a cluster and survives pre-emption.

Exactly one component owns requeueing: submitit. Its own USR2 handler would checkpoint
and requeue from inside the signal handler, in the middle of a training step. So the job
puts a handler in front that only raises a flag. At the stop controller's next decision
point every rank agrees (:mod:`ssl_xcit.pretrain.stop`), ``last.ckpt`` is written
atomically, and rank 0 hands over to submitit's handler. That handler calls
:meth:`PretrainJob.checkpoint`, pickles the resubmission and requeues the job (``scontrol
requeue``). The requeued job resumes from ``last.ckpt`` exactly. Lightning's own SLURM
requeue is never installed: the job runs under Lightning's plain environment, fed by
submitit's.

Time-outs and pre-emptions both arrive as USR2; submitit tells them apart by the time the
job has run, and counts time-outs against its own ``max_num_timeout``, which ``submit``
sets to ``max_requeues``. This job counts both against ``max_requeues`` and says in
``job.log`` which one each stop was.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import submitit
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.utilities import rank_zero_only

from ssl_xcit.compat import submitit_requeue_signal, submitit_timed_out
from ssl_xcit.pretrain.command import parse_pretrain_args, run_dir as run_dir_of
from ssl_xcit.pretrain.preemption import PreemptionFlag
from ssl_xcit.pretrain.stop import StopController

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
        max_requeues: time-outs and pre-emptions (together) after which the job is not requeued again.
        requeues: how many times this job has been requeued already.
        timeouts: how many of those were time-outs (the rest were pre-emptions).
    """

    def __init__(self, max_requeues: int = DEFAULT_MAX_REQUEUES, requeues: int = 0, timeouts: int = 0) -> None:
        self.max_requeues, self.requeues, self.timeouts = max_requeues, requeues, timeouts

    def __call__(self, argv: Sequence[str]) -> str:
        from ssl_xcit.pretrain.run import run_pretraining

        env = export_distributed_env()
        flag = PreemptionFlag(submitit_requeue_signal())
        flag.install()
        parsed = parse_pretrain_args(argv)
        cfg, run_dir = parsed.options, run_dir_of(parsed)
        if env.global_rank == 0:
            log_line(run_dir, f"job {env.job_id} start (requeue {self.requeues} of at most {self.max_requeues}: "
                              f"{self.timeouts} time-out(s), {self.requeues - self.timeouts} pre-emption(s) so far), "
                              f"{env.num_tasks} task(s) on {env.num_nodes} node(s)")
        stop = StopController(flag)
        last = run_pretraining(cfg, run_dir, parsed.dump(), environment=LightningEnvironment(), stop=stop)
        if not stop.stopped_by_signal:
            if env.global_rank == 0:
                log_line(run_dir, f"job {env.job_id} finished: {last}")
            return str(last)
        assert stop.decision is not None
        what = self._what_stopped(flag)
        if env.global_rank == 0:
            log_line(run_dir, f"job {env.job_id} {what}: checkpoint at step {stop.decision.step} in {last}")
            if flag.requeue:
                self._hand_over_to_submitit(flag)
        return f"{what} at step {stop.decision.step}"

    def _what_stopped(self, flag: PreemptionFlag) -> str:
        """'timed out', 'pre-empted' (both requeue) or 'stopped by SIGTERM' (no requeue), as submitit
        will count it."""
        if not flag.requeue:
            return "stopped by SIGTERM"
        if submitit_timed_out(flag.replaced[flag.requeue_signal]):
            self.timeouts += 1
            return f"timed out (time-out {self.timeouts})"
        return "pre-empted"

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
        return submitit.helpers.DelayedSubmission(PretrainJob(self.max_requeues, self.requeues + 1, self.timeouts),
                                                  list(argv))
