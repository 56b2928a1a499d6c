"""FAISS vs the chunked torch loop for the exact k-NN search of ``ssl_xcit.eval.knn``.

Each backend runs in a fresh process so its peak-memory figure is its own: the host
figure is the rise of ``ru_maxrss`` over the process's level before the first search
(data already built); on CUDA the torch figure is ``torch.cuda.max_memory_allocated``
over the allocation before the search. Times are the best and the median of
``--repeats`` runs after one warm-up run; on a shared machine the best is the steadier.

    python benchmarks/knn_bench.py                      # 50,000 x 10,000 x 384, k=200, CPU
    python benchmarks/knn_bench.py --device cuda --num-bank 1000000
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np


def _random_unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    from ssl_xcit.eval.knn import l2_normalize

    return l2_normalize(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))


def _measure(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: builds the data, then times and measures one backend."""
    import torch

    from ssl_xcit.eval.knn import knn_search

    bank, queries = _random_unit_rows(args.num_bank, args.dim, 0), _random_unit_rows(args.num_queries, args.dim, 1)
    cuda = args.device == "cuda"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cuda_before = torch.cuda.memory_allocated() if cuda else 0

    def search() -> tuple[np.ndarray, np.ndarray]:
        return knn_search(bank, queries, args.k, backend=backend, batch_size=args.batch_size, device=args.device)

    search()  # warm-up: thread pools, BLAS, CUDA context and kernels
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sims, idx = search()
        seconds.append(time.perf_counter() - start)
    return {
        "best_s": min(seconds),
        "median_s": statistics.median(seconds),
        "host_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
        "cuda_mib": (torch.cuda.max_memory_allocated() - cuda_before) / 2**20 if cuda else None,
        "sims": sims,
        "idx": idx,
    }


def _in_fresh_process(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, backend, args).result()


def _fmt(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.2f} {unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-bank", type=int, default=50_000, help="training (bank) features")
    parser.add_argument("--num-queries", type=int, default=10_000, help="test (query) features")
    parser.add_argument("--dim", type=int, default=384, help="feature dim (384 = XCiT-S embed dim)")
    parser.add_argument("--k", type=int, default=200, help="neighbours; 200 is DINO's largest k")
    parser.add_argument("--batch-size", type=int, default=1024, help="queries per search call")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")

    results = {backend: _in_fresh_process(backend, args) for backend in ("faiss", "torch")}
    faiss_r, torch_r = results["faiss"], results["torch"]
    print(f"bank {args.num_bank} x queries {args.num_queries} x dim {args.dim}, k={args.k}, device={args.device}")
    print(f"{'':<22}{'faiss':>14}{'torch':>14}{'torch/faiss':>14}")
    rows = [
        ("best_s", "time (best)", "s"),
        ("median_s", "time (median)", "s"),
        ("host_mib", "peak host RSS rise", "MiB"),
        ("cuda_mib", "peak CUDA alloc", "MiB"),
    ]
    for key, label, unit in rows:
        cells = [_fmt(faiss_r[key], unit), _fmt(torch_r[key], unit), _ratio(torch_r[key], faiss_r[key])]
        print(f"{label:<22}" + "".join(f"{cell:>14}" for cell in cells))
    same = float(np.mean(faiss_r["idx"] == torch_r["idx"]))
    gap = float(np.abs(faiss_r["sims"] - torch_r["sims"]).max())
    print(f"agreement: {100 * same:.3f}% identical neighbour indices, max |similarity difference| {gap:.2e}")
    if args.device == "cuda":
        print("note: faiss-gpu allocates outside torch's allocator, so its CUDA figure is n/a")


if __name__ == "__main__":
    main()
