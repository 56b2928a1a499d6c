"""Eager against whole-backbone and per-block (regional) compilation: cold compile and steady rate.

Each model and mode runs ``train_throughput.py`` in a fresh process with torch's compile
caches off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` and an empty cache folder), so every
compiled run pays its whole cold compile. The cold compile is what the first steps take
beyond as many steady steps; the steady rate is samples/s over the timed steps (on a
shared CPU the main process's CPU time per sample says more than the wall clock). Models:
the quick start's (``configs/quickstart.yaml``: xcit_nano_12_p8_224, depth 6, 2 global
crops of 64 px, no local crops, out_dim 1024, head hidden 512, batch 64) and the same with
local crops (a second crop size: a second graph per block class).

    nice -n 10 python benchmarks/compile_bench.py --json /tmp/compile_bench.json
    python benchmarks/compile_bench.py --device cuda --models dino_small   # XCiT-S12/16, DINO's crops
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUICKSTART = ["--arch", "xcit_nano_12_p8_224", "--depth", "6", "--global-crops-size", "64", "--out-dim", "1024",
              "--head-hidden", "512", "--batch", "64"]
MODELS = {
    "quickstart": QUICKSTART + ["--local-crops-number", "0"],
    "quickstart+local": QUICKSTART + ["--local-crops-number", "6", "--local-crops-size", "32"],
    "dino_small": ["--arch", "xcit_small_12_p16_224", "--batch", "128", "--local-crops-number", "10"],
}
MODES = ("off", "backbone", "blocks")


def run_fresh(model_args: list[str], mode: str, extra: list[str], timeout: float) -> dict[str, Any]:
    """One train_throughput.py run in a new process with empty compile caches; its JSON
    report, or the error when it failed or ran out of time."""
    with tempfile.TemporaryDirectory(prefix="compile-bench-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor",
               "TRITON_CACHE_DIR": f"{tmp}/triton"}
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(HERE / "train_throughput.py"), *model_args, *extra, "--compile", mode, "--json", str(out)]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"compile": mode, "error": f"no result within {timeout:.0f} s"}
        if done.returncode or not out.exists():
            return {"compile": mode, "error": (done.stderr or done.stdout)[-2000:]}
        return json.loads(out.read_text())


FIGURES = ("first_steps_beyond_steady_s", "samples_per_s", "process_cpu_s_per_sample")


def medians(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Each figure's median over a mode's successful runs (None when every run failed)."""
    ok = [r for r in runs if "error" not in r]
    return {k: statistics.median(r[k] for r in ok) for k in FIGURES} if ok else None


def ratios(m: dict[str, dict[str, float] | None]) -> dict[str, float]:
    """Steady rate and CPU time per sample (inverted: above 1 is faster) against eager, and
    regional against whole-backbone compilation, on the medians."""
    out: dict[str, float] = {}
    for mode in ("backbone", "blocks"):
        if m.get(mode) and m.get("off"):
            out[f"{mode}_rate_vs_eager"] = m[mode]["samples_per_s"] / m["off"]["samples_per_s"]
            out[f"{mode}_cpu_vs_eager"] = m["off"]["process_cpu_s_per_sample"] / m[mode]["process_cpu_s_per_sample"]
    if m.get("backbone") and m.get("blocks"):
        out["blocks_rate_vs_backbone"] = m["blocks"]["samples_per_s"] / m["backbone"]["samples_per_s"]
        out["blocks_cpu_vs_backbone"] = m["backbone"]["process_cpu_s_per_sample"] / m["blocks"]["process_cpu_s_per_sample"]
        out["blocks_compile_vs_backbone"] = (m["blocks"]["first_steps_beyond_steady_s"]
                                             / m["backbone"]["first_steps_beyond_steady_s"])
    return out


def print_table(name: str, runs: dict[str, list[dict[str, Any]]], m: dict[str, Any], r: dict[str, float]) -> None:
    print(f"\n{name} (each run, then the median; load = the 1-minute load average at its start)")
    print(f"  {'compile':9s} {'cold compile s':>15s} {'samples/s':>10s} {'CPU ms/sample':>14s} {'load':>5s}")
    for mode, rows in runs.items():
        for row in rows:
            if "error" in row:
                print(f"  {mode:9s} failed: {row['error'].strip().splitlines()[-1] if row['error'].strip() else '?'}")
                continue
            print(f"  {mode:9s} {row['first_steps_beyond_steady_s']:15.1f} {row['samples_per_s']:10.2f} "
                  f"{row['process_cpu_s_per_sample'] * 1e3:14.1f} {row['load']:5.1f}")
        if m[mode]:
            vs = (f"   vs eager: rate {r[f'{mode}_rate_vs_eager']:.2f}x, CPU time {r[f'{mode}_cpu_vs_eager']:.2f}x"
                  if mode != "off" and f"{mode}_rate_vs_eager" in r else "")
            print(f"  {'median':9s} {m[mode]['first_steps_beyond_steady_s']:15.1f} {m[mode]['samples_per_s']:10.2f} "
                  f"{m[mode]['process_cpu_s_per_sample'] * 1e3:14.1f}{vs}")
    if "blocks_rate_vs_backbone" in r:
        print(f"  regional / whole backbone: cold compile {r['blocks_compile_vs_backbone']:.2f}x, "
              f"rate {r['blocks_rate_vs_backbone']:.2f}x, CPU time {r['blocks_cpu_vs_backbone']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["quickstart", "quickstart+local"], choices=list(MODELS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--rounds", type=int, default=2, help="runs of each mode, in alternating order (A B C, C B A, ...)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads per run (on a shared CPU one thread's "
                   "kernels do not wait for a thread another process holds)")
    p.add_argument("--precision", default="bf16-mixed", help="the quick start's (bf16 autocast on the CPU too)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    extra = ["--device", args.device, "--precision", args.precision, "--warmup", str(args.warmup),
             "--steps", str(args.steps), "--threads", str(args.threads)]
    results = {}
    for name in args.models:
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
        for round_ in range(args.rounds):
            for mode in args.modes[:: -1 if round_ % 2 else 1]:
                load = os.getloadavg()[0]
                runs[mode].append({**run_fresh(MODELS[name], mode, extra, args.timeout), "load": load})
        m = {mode: medians(rows) for mode, rows in runs.items()}
        results[name] = {"runs": runs, "medians": m, "ratios": ratios(m)}
        print_table(name, runs, m, results[name]["ratios"])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
