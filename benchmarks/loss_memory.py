"""Peak memory and time of the DINO loss, forward and backward, at DINO's sizes: the loss as
ssl-xcit computes it (two products) against the same loss summed one product per pair of views
(the reference, written out here), side by side.

Each variant runs in a fresh process; on CPU its peak is the process's peak RSS above what the
inputs already hold, on CUDA ``torch.cuda.max_memory_allocated`` above the inputs.

    python benchmarks/loss_memory.py                       # batch 128, 2 + 10 views, K = 65,536, CPU
    python benchmarks/loss_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def pairwise_loss(student, teacher, center, n_views, n_teacher, student_temp=0.1, teacher_temp=0.04):
    """One (B, K) product per pair of views, each kept for backward."""
    log_p = F.log_softmax(student.float() / student_temp, dim=-1).chunk(n_views)
    p_t = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach().chunk(n_teacher)
    terms = [torch.sum(-p_t[t] * log_p[s], dim=-1).mean() for t in range(n_teacher) for s in range(n_views) if s != t]
    return sum(terms) / len(terms)


def ours(student, teacher, center, n_views, n_teacher):
    from ssl_xcit.pretrain.loss import dino_cross_entropy

    return dino_cross_entropy(student, teacher, center, n_views, n_teacher, 0.1, 0.04)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def run_one(variant: str, batch: int, views: int, k: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(views * batch, k, generator=gen).to(device).requires_grad_(True)
    teacher, center = torch.randn(2 * batch, k, generator=gen).to(device), torch.zeros(1, k, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_mb(device) if device.type == "cuda" else current_rss_mb()
    start = time.perf_counter()
    loss = {"pairwise": pairwise_loss, "ours": ours}[variant](student, teacher, center, views, 2)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"variant": variant, "loss": loss.item(), "seconds": seconds, "peak_above_inputs_mb": peak_mb(device) - before}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--views", type=int, default=12, help="2 global + the local crops")
    parser.add_argument("--k", type=int, default=65536)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's variant
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.views, args.k, torch.device(args.device))))
        return
    rows = []
    for variant in ("pairwise", "ours"):
        cmd = [sys.executable, __file__, "--one", variant, "--batch", str(args.batch), "--views", str(args.views),
               "--k", str(args.k), "--device", args.device]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    ref, new = rows
    print(f"DINO loss, batch {args.batch}, {args.views} views, K = {args.k}, {args.device}, forward + backward")
    for row in rows:
        print(f"  {row['variant']:>8}: peak {row['peak_above_inputs_mb']:8.0f} MB above the inputs, "
              f"{row['seconds'] * 1e3:7.1f} ms, loss {row['loss']:.6f}")
    print(f"  ours / pairwise: memory {new['peak_above_inputs_mb'] / ref['peak_above_inputs_mb']:.2f}x, "
          f"time {new['seconds'] / ref['seconds']:.2f}x")


if __name__ == "__main__":
    main()
