"""``ssl-xcit submit``: pretraining on SLURM (or locally) through submitit.

Cluster options are this command's own; every other argument is a pretraining argument
and passes through unchanged (``--config``, ``--data.path ...``, ``--run.dir ...``).
``--sweep KEY=V1,V2`` submits one job per value as a job array.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import submitit

from ssl_xcit.options import parse_options
from ssl_xcit.pretrain.command import parse_pretrain_args, run_dir as run_dir_of
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.compat import slurm_script
from ssl_xcit.errors import UserError
from ssl_xcit.launch.job import DEFAULT_MAX_REQUEUES, PretrainJob
from ssl_xcit.launch.slurm_info import partition_warning, wait_printing_pending_reason
from ssl_xcit.pretrain.schedules import scaled_lr


@dataclass
class SubmitOptions:
    """Where and how the job runs (a cluster profile in launch/*.yaml holds any of these)."""

    cluster: Literal["slurm", "local", "debug"] = "slurm"
    """slurm, local (submitit's local executor) or debug (in this process)."""
    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 8
    """GPUs (= DDP processes) per node; 0 makes a CPU job (gloo)."""
    tasks_per_node: Optional[int] = None
    """Processes per node of a CPU job (default 1); always = GPUs on GPU jobs."""
    partition: Optional[str] = None
    """SLURM partition."""
    time: str = "72:00:00"
    """Time limit HH:MM:SS (or D-HH:MM:SS)."""
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mem_gb: Optional[int] = None
    """Memory per node in GB (default: the partition's)."""
    cpus_per_task: Optional[int] = None
    """CPUs per task; default 10 per GPU task (DINO's), data.num_workers + 1 for a CPU task."""
    exclude: Optional[str] = None
    """Nodes to avoid."""
    job_dir: Optional[str] = None
    """submitit's folder for scripts and logs (default <run.dir>/submitit)."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM signals the job to checkpoint."""
    max_requeues: int = DEFAULT_MAX_REQUEUES
    """Time-outs and pre-emptions (together) after which the job is not requeued again; job.log
    says which one each was."""
    dry_run: bool = False
    """Validate, print the SLURM script and submit nothing (needs no SLURM on this machine)."""
    wait: bool = False
    """Block until the jobs end (printing why a job is pending) and print their results."""
    sweep: list[str] = field(default_factory=list)
    """KEY=V1,V2,... : one job per value (a job array); repeat for a grid."""


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(this command's options and --launch profiles, the pretraining arguments)."""
    own_flags = {"--" + f.name for f in fields(SubmitOptions)} | {"--launch", "--print_config"}
    bool_flags = {"--dry_run", "--wait", "--print_config"}
    own, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name = "--" + token.split("=", 1)[0][2:].replace("-", "_") if token.startswith("--") else token
        if token in ("-h", "--help"):  # this command's help; `ssl-xcit pretrain --help` lists the rest
            own.append(token)
            i += 1
        elif name in own_flags:
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
            "--trainer.num_nodes", str(opts.nodes), "--trainer.strategy", "ddp" if processes > 1 else "auto",
            "--trainer.enable_progress_bar", "false"]  # a job's log is a file: the logged lines say it all


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
    """Check what can be checked before queueing, without reading the data (no folder scan, no
    extraction on the submitting host: the job does that); the summary lines to print."""
    from ssl_xcit.pretrain.checkpointing import last_checkpoint
    from ssl_xcit.pretrain.run import world_size

    if opts.nodes < 1 or opts.gpus_per_node < 0:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {opts.nodes}, {opts.gpus_per_node})")
    if opts.cluster not in ("slurm", "local", "debug"):
        raise UserError(f"--cluster: expected slurm, local or debug, got {opts.cluster}")
    if opts.gpus_per_node > 0 and opts.tasks_per_node not in (None, opts.gpus_per_node):
        raise UserError(f"--tasks-per-node {opts.tasks_per_node}: a GPU job runs one task per GPU ({opts.gpus_per_node})")
    _check_data_path(cfg.data.path)
    world = world_size(cfg)
    global_batch = world * cfg.data.batch_size_per_device
    _check_writable(run_dir)
    last = last_checkpoint(run_dir / "checkpoints")
    if last is not None and not cfg.run.resume:
        raise UserError(f"run.dir: {run_dir} already holds {last.name}; pass --run.resume true or another --run.dir")
    return [
        f"data: {cfg.data.path}" + (f" (split {cfg.data.split})" if cfg.data.split else ""),
        f"world size {world} ({opts.nodes} node(s) x {cfg.trainer.devices}), {cfg.data.batch_size_per_device} per "
        f"process, global batch {global_batch}",
        f"peak lr {scaled_lr(cfg.optim.lr, global_batch):.4g} (= {cfg.optim.lr} x {global_batch} / 256)",
        f"run folder {run_dir}: " + (f"resumes from {last}" if last else "new run"),
    ]


def _check_data_path(path: Optional[str]) -> None:
    """``data.path`` names something the job can open: a built-in source, or a path that exists
    (from this host; the job's nodes must see the same path)."""
    if not path:
        raise UserError("data.path is required (an ImageFolder directory, a .tar.gz of one, cifar10 or synthetic)")
    if path not in ("cifar10", "synthetic") and not Path(path).expanduser().exists():
        raise UserError(f"data.path: {path} does not exist (as seen from this host)")


def _check_writable(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, accepts files (creates nothing)."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"run.dir: {run_dir} is not writable ({existing} does not accept files)")


def cpus_per_task(opts: SubmitOptions, cfg: PretrainConfig) -> int:
    """The CPUs a task asks for: as given, else 10 per GPU task (DINO's), else what a CPU
    task uses (its own process plus its data-loading workers)."""
    if opts.cpus_per_task is not None:
        return opts.cpus_per_task
    return 10 if opts.gpus_per_node > 0 else cfg.data.num_workers + 1


def tasks_per_node(opts: SubmitOptions) -> int:
    return opts.gpus_per_node if opts.gpus_per_node > 0 else (opts.tasks_per_node or 1)


def slurm_parameters(opts: SubmitOptions, cpus: int, array: int) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of the job (the same for a submission and a dry run)."""
    params: dict[str, Any] = dict(
        job_name="ssl-xcit", nodes=opts.nodes, ntasks_per_node=tasks_per_node(opts), cpus_per_task=cpus,
        time=parse_time_minutes(opts.time), signal_delay_s=opts.signal_delay_s, array_parallelism=array,
        partition=opts.partition, account=opts.account, qos=opts.qos, constraint=opts.constraint,
        exclude=opts.exclude, gpus_per_node=opts.gpus_per_node or None,
        mem=f"{opts.mem_gb}GB" if opts.mem_gb else None,
        additional_parameters={"requeue": True},  # clusters may default to JobRequeue=0, refusing `scontrol requeue`
    )
    return {k: v for k, v in params.items() if v is not None}


def build_executor(opts: SubmitOptions, job_dir: Path, cpus: int, array: int) -> submitit.Executor:
    folder = job_dir / "%j"
    if opts.cluster == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise UserError(f"--cluster slurm: {' and '.join(missing)} not found on PATH: this machine is no SLURM "
                            "submission host (--dry-run renders the script anywhere; --cluster local runs here)")
        # submitit ends a job at its max_num_timeout-th time-out (3 unless told): it must not come before ours
        executor: submitit.Executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
        executor.update_parameters(**slurm_parameters(opts, cpus, array))
        return executor
    timeouts = {"local_max_num_timeout": opts.max_requeues} if opts.cluster == "local" else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=opts.cluster, **timeouts)
    params = dict(name="ssl-xcit", nodes=opts.nodes, tasks_per_node=tasks_per_node(opts), cpus_per_task=cpus,
                  timeout_min=parse_time_minutes(opts.time))
    executor.update_parameters(**params, **({"gpus_per_node": opts.gpus_per_node} if opts.gpus_per_node else {}))
    return executor


def parse_submit_args(argv: Sequence[str]) -> tuple[SubmitOptions, list[str]]:
    """(cluster options, the pretraining arguments with the cluster's trainer settings)."""
    own, pretrain_argv = split_argv(argv)
    opts = parse_options(SubmitOptions, own, "ssl-xcit submit", "Run `ssl-xcit pretrain` on a SLURM cluster through "
                         "submitit: --launch launch/PROFILE.yaml --config configs/RECIPE.yaml [overrides]",
                         config_flag="--launch").options
    return opts, list(pretrain_argv) + cluster_overrides(opts)


def submit_jobs(argv: Sequence[str]) -> list[submitit.Job]:
    """Validate, print what will run, and submit (nothing on --dry-run, which prints the script)."""
    opts, pretrain_argv = parse_submit_args(argv)
    argvs = sweep_argvs(pretrain_argv, opts.sweep)
    run_dirs, cfg = [], None
    for job_argv in argvs:
        parsed = parse_pretrain_args(job_argv)
        cfg, run_dir = parsed.options, run_dir_of(parsed).absolute()
        print("\n".join(validate(cfg, run_dir, opts)))
        run_dirs.append(run_dir)
    if len(set(run_dirs)) < len(run_dirs):
        raise UserError("--sweep: the jobs share a run folder; add --run.dir to the swept keys or vary it")
    assert cfg is not None
    cpus = cpus_per_task(opts, cfg)
    job_dir = Path(opts.job_dir or run_dirs[0] / "submitit").absolute()
    if opts.cluster == "slurm":
        warning = partition_warning(opts.partition, opts.nodes, tasks_per_node(opts) * cpus, opts.mem_gb,
                                    opts.gpus_per_node)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if opts.dry_run:
        print(slurm_script(job_dir / "%j", slurm_parameters(opts, cpus, len(argvs))) if opts.cluster == "slurm"
              else f"(cluster {opts.cluster}: no SLURM script)")
        return []
    executor = build_executor(opts, job_dir, cpus, len(argvs))
    job_argvs = [[os.path.abspath(a) if a.endswith((".yaml", ".yml")) else a for a in av] for av in argvs]
    job = PretrainJob(opts.max_requeues)
    jobs = executor.map_array(job, job_argvs) if len(argvs) > 1 else [executor.submit(job, job_argvs[0])]
    for submitted, run_dir in zip(jobs, run_dirs):
        print(f"submitted job {submitted.job_id}: logs {submitted.paths.stdout} (and .err), run folder {run_dir}")
    if opts.wait or opts.cluster == "debug":
        for submitted in jobs:
            wait_printing_pending_reason(submitted)
            print(f"job {submitted.job_id}: {submitted.results()[0]}")  # rank 0 speaks for multi-task jobs
    return jobs


def submit_command(argv: Sequence[str]) -> int:
    submit_jobs(argv)
    return 0
