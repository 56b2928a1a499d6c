"""Per-call time of ``color_on_device`` (``augment.device: train``'s device share) on one batch.

The worker share (:meth:`MultiCropAugmentation.geometric`) prepares ``--batch`` samples of
real JPEGs once; the batch is collated as the loader does and moved to ``--device``; then
``color_on_device`` runs ``--repeats`` times after ``--warmup`` untimed calls (CUDA
synchronised around each call). Prints the median and the quartiles in ms per call, of the
wall clock and of the process's CPU time (on a shared CPU with ``--threads 1`` the latter is
the figure that other processes disturb least).

    python benchmarks/device_color_bench.py --images /tmp/imagenette2-224/train --batch 16 --threads 1
    python benchmarks/device_color_bench.py --images DIR --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from ssl_xcit.pretrain.augment import MultiCropAugmentation, color_on_device
from ssl_xcit.pretrain.config import AugmentConfig


def prepared_batch(folder: Path, cfg: AugmentConfig, batch: int, device: str) -> dict[str, Any]:
    """``batch`` samples' uint8 crops and colour rows, collated and on ``device``."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:batch]
    if len(paths) < batch:
        raise SystemExit(f"--images {folder}: {len(paths)} images, fewer than --batch {batch}")
    aug = MultiCropAugmentation(cfg)
    collated = default_collate([aug.geometric(str(p), seed) for seed, p in enumerate(paths)])
    return {"crops": [c.to(device) for c in collated["crops"]], "params": collated["params"].to(device)}


def time_calls(batch: dict[str, Any], cfg: AugmentConfig, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall and CPU seconds of each of ``repeats`` calls of ``color_on_device`` (after ``warmup``)."""
    sync = torch.cuda.synchronize if batch["params"].is_cuda else (lambda: None)
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for i in range(warmup + repeats):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        color_on_device(batch, cfg)
        sync()
        if i >= warmup:
            times["wall"].append(time.perf_counter() - wall)
            times["cpu"].append(time.process_time() - cpu)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="a folder of JPEGs (searched recursively)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--local-crops-number", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AugmentConfig(local_crops_number=args.local_crops_number, device="train")
    batch = prepared_batch(args.images, cfg, args.batch, args.device)
    crops = f"2x{cfg.global_crops_size}+{cfg.local_crops_number}x{cfg.local_crops_size}"
    print(f"color_on_device, {args.batch} samples of {crops} on {args.device} ({torch.get_num_threads()} threads), "
          f"{args.repeats} calls:")
    figures = {"batch": args.batch, "crops": crops, "device": args.device, "threads": torch.get_num_threads()}
    for clock, seconds in time_calls(batch, cfg, args.warmup, args.repeats).items():
        q1, med, q3 = statistics.quantiles([t * 1e3 for t in seconds], n=4)
        figures[f"{clock}_ms_per_call"] = {"median": med, "quartiles": [q1, q3]}
        print(f"  {clock:4s} median {med:8.1f} ms per call (quartiles {q1:.1f}-{q3:.1f}), {med / args.batch:.2f} ms per sample")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
