"""``ssl-xcit submit``: pretraining on SLURM (or locally) through submitit.

Cluster options are this command's own; every other argument is a pretraining argument
and passes through unchanged (``--config``, ``--data.path ...``, ``--run.dir ...``).
``--sweep KEY=V1,V2`` submits one job per value as a job array.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import submitit
from jsonargparse import ArgumentError, ArgumentParser

from ssl_xcit.options import config_name, one_line, parse_pretrain_args
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.errors import UserError
from ssl_xcit.launch.job import DEFAULT_MAX_REQUEUES, PretrainJob
from ssl_xcit.pretrain.schedules import scaled_lr


@dataclass
class SubmitOptions:
    """Where and how the job runs."""

    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None
    partition: Optional[str] = None
    time: str = "72:00:00"
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mem_gb: Optional[int] = None
    cpus_per_task: int = 10
    exclude: Optional[str] = None
    job_dir: Optional[str] = None
    signal_delay_s: int = 120
    max_requeues: int = DEFAULT_MAX_REQUEUES
    dry_run: bool = False
    wait: bool = False
    sweep: list[str] = field(default_factory=list)


def _submit_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ssl-xcit submit", exit_on_error=False,
                       description="Run `ssl-xcit pretrain` on a SLURM cluster through submitit.")
    helps = {
        "cluster": "slurm (default), local (submitit's local executor) or debug (in this process)",
        "gpus_per_node": "GPUs (= DDP processes) per node; 0 makes a CPU job (gloo)",
        "tasks_per_node": "processes per node of a CPU job (default 1); always = GPUs on GPU jobs",
        "time": "time limit HH:MM:SS (or D-HH:MM:SS)",
        "signal_delay_s": "seconds before the time limit at which SLURM signals the job to checkpoint",
        "max_requeues": "pre-emptions/time-outs after which the job is not requeued again",
        "dry_run": "validate, print the SLURM script and submit nothing",
        "wait": "block until the jobs end and print their results",
        "sweep": "KEY=V1,V2,... : one job per value (a job array); repeat for a grid",
        "job_dir": "submitit's folder for scripts and logs (default <run.dir>/submitit)",
    }
    for name, default in SubmitOptions().__dict__.items():
        flag = "--" + name.replace("_", "-")
        kind = type(default) if default is not None else Optional[str]
        if name in ("tasks_per_node", "mem_gb"):
            kind = Optional[int]
        if name == "sweep":
            p.add_argument(flag, type=str, action="append", default=[], help=helps[name])
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=helps.get(name))
        else:
            p.add_argument(flag, type=kind, default=default, help=helps.get(name, name.replace("_", " ")))
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(this command's options, the pretraining arguments)."""
    own_flags = {"--" + n.replace("_", "-") for n in SubmitOptions().__dict__}
    bool_flags = {"--dry-run", "--wait"}
    own, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in own_flags:
            takes_value = name not in bool_flags and "=" not in token
            own += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
        else:
            rest.append(token)
            i += 1
    return own, rest


def parse_time_minutes(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})", text)
    if not match:
        raise UserError(f"--time: expected HH:MM:SS or D-HH:MM:SS, got {text}")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return max(1, days * 1440 + hours * 60 + minutes + (seconds + 59) // 60)


def cluster_overrides(opts: SubmitOptions) -> list[str]:
    """Trainer settings that keep Lightning consistent with the allocation."""
    gpu = opts.gpus_per_node > 0
    per_node = opts.gpus_per_node if gpu else (opts.tasks_per_node or 1)
    processes = per_node * opts.nodes
    return ["--trainer.accelerator", "gpu" if gpu else "cpu", "--trainer.devices", str(per_node),
            "--trainer.num_nodes", str(opts.nodes), "--trainer.strategy", "ddp" if processes > 1 else "auto"]


def sweep_argvs(base: list[str], sweeps: list[str]) -> list[list[str]]:
    """One pretraining argv per point of the sweep grid (``KEY=V1,V2`` per sweep)."""
    axes = []
    for sweep in sweeps:
        key, _, values = sweep.partition("=")
        if not key or not values:
            raise UserError(f"--sweep: expected KEY=V1,V2,..., got {sweep}")
        axes.append([(key.lstrip("-"), v) for v in values.split(",")])
    return [base + [t for key, value in point for t in (f"--{key}", value)] for point in itertools.product(*axes)]


def validate(cfg: PretrainConfig, run_dir: Path, opts: SubmitOptions) -> list[str]:
    """Check what can be checked before queueing; the summary lines to print."""
    from ssl_xcit.pretrain.checkpointing import last_checkpoint
    from ssl_xcit.pretrain.run import world_size
    from ssl_xcit.image_sources import build_source

    if opts.nodes < 1 or opts.gpus_per_node < 0:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {opts.nodes}, {opts.gpus_per_node})")
    if opts.cluster not in ("slurm", "local", "debug"):
        raise UserError(f"--cluster: expected slurm, local or debug, got {opts.cluster}")
    if opts.gpus_per_node > 0 and opts.tasks_per_node not in (None, opts.gpus_per_node):
        raise UserError(f"--tasks-per-node {opts.tasks_per_node}: a GPU job runs one task per GPU ({opts.gpus_per_node})")
    source = build_source(cfg.data.path, cfg.data.split, cfg.data.cache_dir, cfg.data.max_images,
                          synthetic_size=cfg.data.synthetic_size)
    world = world_size(cfg)
    global_batch = world * cfg.data.batch_size_per_device
    if len(source) < global_batch:
        raise UserError(f"data.path: {len(source)} images make no global batch of {global_batch}")
    _check_writable(run_dir)
    last = last_checkpoint(run_dir / "checkpoints")
    if last is not None and not cfg.run.resume:
        raise UserError(f"run.dir: {run_dir} already holds {last.name}; pass --run.resume true or another --run.dir")
    return [
        f"data: {cfg.data.path} ({len(source)} images)",
        f"world size {world} ({opts.nodes} node(s) x {cfg.trainer.devices}), {cfg.data.batch_size_per_device} per "
        f"process, global batch {global_batch}, {len(source) // global_batch} steps per epoch",
        f"peak lr {scaled_lr(cfg.optim.lr, global_batch):.4g} (= {cfg.optim.lr} x {global_batch} / 256)",
        f"run folder {run_dir}: " + (f"resumes from {last}" if last else "new run"),
    ]


def _check_writable(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, accepts files (creates nothing)."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"run.dir: {run_dir} is not writable ({existing} does not accept files)")


def build_executor(opts: SubmitOptions, job_dir: Path, array: int) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=str(job_dir / "%j"), cluster=opts.cluster)
    gpu = opts.gpus_per_node > 0
    params = dict(name="ssl-xcit", nodes=opts.nodes, tasks_per_node=opts.gpus_per_node if gpu else (opts.tasks_per_node or 1),
                  cpus_per_task=opts.cpus_per_task, timeout_min=parse_time_minutes(opts.time))
    if gpu:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    slurm = {"slurm_partition": opts.partition, "slurm_account": opts.account, "slurm_qos": opts.qos,
             "slurm_constraint": opts.constraint, "slurm_exclude": opts.exclude,
             "slurm_signal_delay_s": opts.signal_delay_s, "slurm_array_parallelism": array,
             # clusters may default to JobRequeue=0, which refuses submitit's `scontrol requeue`
             "slurm_additional_parameters": {"requeue": True}}
    params.update({k: v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The SLURM script submitit would submit for this executor."""
    from submitit.slurm.slurm import SlurmExecutor

    inner = executor._executor
    if not isinstance(inner, SlurmExecutor):
        return f"(cluster {executor.cluster}: no SLURM script)"
    return inner._make_submission_file_text("python -u -m submitit.core._submit " + str(inner.folder), "UID")


def parse_submit_args(argv: Sequence[str]) -> tuple[SubmitOptions, list[str]]:
    """(cluster options, the pretraining arguments with the cluster's trainer settings)."""
    own, pretrain_argv = split_argv(argv)
    try:
        namespace = _submit_parser().parse_args(own)
    except ArgumentError as err:
        raise UserError(one_line(err)) from err
    opts = SubmitOptions(**{k: v for k, v in vars(namespace).items() if k != "__path__"})
    return opts, list(pretrain_argv) + cluster_overrides(opts)


def submit_jobs(argv: Sequence[str]) -> list[submitit.Job]:
    """Validate, print what will run, and submit (nothing on --dry-run, which prints the script)."""
    opts, pretrain_argv = parse_submit_args(argv)
    argvs = sweep_argvs(pretrain_argv, opts.sweep)
    run_dirs = []
    for job_argv in argvs:
        cfg, namespace, _ = parse_pretrain_args(job_argv)
        run_dir = Path(cfg.run.dir or Path("runs") / config_name(namespace)).absolute()
        print("\n".join(validate(cfg, run_dir, opts)))
        run_dirs.append(run_dir)
    if len(set(run_dirs)) < len(run_dirs):
        raise UserError("--sweep: the jobs share a run folder; add --run.dir to the swept keys or vary it")
    executor = build_executor(opts, Path(opts.job_dir or run_dirs[0] / "submitit").absolute(), len(argvs))
    if opts.dry_run:
        print(sbatch_script(executor))
        return []
    job_argvs = [[os.path.abspath(a) if a.endswith((".yaml", ".yml")) else a for a in av] for av in argvs]
    job = PretrainJob(opts.max_requeues)
    jobs = executor.map_array(job, job_argvs) if len(argvs) > 1 else [executor.submit(job, job_argvs[0])]
    for submitted, run_dir in zip(jobs, run_dirs):
        print(f"submitted job {submitted.job_id}: logs {submitted.paths.stdout} (and .err), run folder {run_dir}")
    if opts.wait or opts.cluster == "debug":
        for submitted in jobs:
            print(f"job {submitted.job_id}: {submitted.results()[0]}")  # rank 0 speaks for multi-task jobs
    return jobs


def submit_command(argv: Sequence[str]) -> int:
    submit_jobs(argv)
    return 0
