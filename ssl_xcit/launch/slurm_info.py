"""What SLURM says about a partition and a pending job, where its tools are installed.

Both answers are advice: a cluster without ``sinfo``/``squeue`` on the submitting host
simply gets no warning and no pending reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from typing import Optional

import submitit


def _run(command: list[str]) -> Optional[str]:
    if shutil.which(command[0]) is None:
        return None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gpus_in_gres(gres: str) -> int:
    """GPUs a node's GRES string offers ('gpu:8', 'gpu:a100:4(S:0-1)', '(null)' → 0)."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(,]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def shortfall(node_lines: list[str], nodes: int, cpus_per_node: int, mem_gb: Optional[int],
              gpus_per_node: int) -> Optional[str]:
    """Why the partition's nodes (``sinfo -N -h -o '%C %m %G'`` lines: CPUs A/I/O/T, memory in
    MB, GRES) cannot hold the request, or None when enough nodes can."""
    fit = 0
    best = (0, 0, 0)
    for line in node_lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        cpus, mem_mb, gpus = int(parts[0].split("/")[-1]), int(re.sub(r"\D", "", parts[1]) or 0), gpus_in_gres(parts[2])
        best = max(best, (cpus, mem_mb, gpus))
        if cpus >= cpus_per_node and (mem_gb is None or mem_mb >= mem_gb * 1024) and gpus >= gpus_per_node:
            fit += 1
    if fit >= nodes:
        return None
    return (f"{fit} node(s) can hold {cpus_per_node} CPUs"
            + (f", {mem_gb} GB" if mem_gb else "") + (f", {gpus_per_node} GPUs" if gpus_per_node else "")
            + f" per node, {nodes} needed (largest node: {best[0]} CPUs, {best[1] // 1024} GB, {best[2]} GPUs); "
            "the job would stay pending: lower --cpus-per-task / --mem-gb / --gpus-per-node or change --partition")


def partition_warning(partition: Optional[str], nodes: int, cpus_per_node: int, mem_gb: Optional[int],
                      gpus_per_node: int) -> Optional[str]:
    """:func:`shortfall` for the partition as ``sinfo`` reports it; None without sinfo."""
    command = ["sinfo", "-N", "-h", "-o", "%C %m %G"] + (["-p", partition] if partition else [])
    out = _run(command)
    if out is None:
        return None
    where = f"partition {partition}" if partition else "the default partition"
    reason = shortfall(out.splitlines(), nodes, cpus_per_node, mem_gb, gpus_per_node)
    return f"{where}: {reason}" if reason else None


def wait_printing_pending_reason(job: submitit.Job, poll_s: float = 30.0) -> None:
    """Wait for ``job`` to finish, printing SLURM's reason each time it changes while pending."""
    said = None
    while not job.done():
        out = _run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T %r"])
        if out and out.split() and out.split()[0] == "PENDING" and out.strip() != said:
            said = out.strip()
            print(f"job {job.job_id} pending: {said.split(maxsplit=1)[-1]}", flush=True)
        time.sleep(poll_s)
