"""Cost against resolution: peak memory and time per image of an XCiT and the ViT of its size.

XCiT's claim (arXiv 2106.09681, Sec. 3): cross-covariance attention costs O(N d^2) for N
tokens instead of self-attention's O(N^2 d), so memory and time grow linearly with the
pixels. This script measures it through the same timm models ssl-xcit trains, at one batch
size, forward only (no_grad, eval mode: feature export) and forward + backward (a
training step's backbone part: the loss is the sum of the embeddings).

Models: the XCiT (default xcit_small_12_p16_224), timm's ViT of the same width, depth and
patch (vit_small_patch16_224, dynamic_img_size=True) with its default attention (PyTorch's
scaled_dot_product_attention, a fused kernel where one exists), and the same ViT with the
attention written out (softmax(q k^T) v, the N x N matrix kept for backward: the
textbook cost that XCiT's paper compares against).

Memory: on CUDA, torch.cuda.max_memory_allocated() above what was allocated before the step
(weights and input). On CPU, the peak over the step of the bytes of live tensor storages
created during it, sampled after every ATen operation (a TorchDispatchMode holding a weak
reference to each new storage): allocator-level, exact for tensors, blind to scratch memory
a single kernel allocates and frees inside itself. Both count the weight gradients of the
backward pass. Time: the median of ``--repeats`` timed steps after one warm-up step,
measured apart from the memory pass (whose sampling slows the step).

  python benchmarks/resolution_bench.py --device cpu --batch 2 --out docs/resolution_bench_cpu
  python benchmarks/resolution_bench.py --device cuda --batch 8 --out docs/resolution_bench_cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from timm.models.vision_transformer import Attention
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 2**20


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # a view or an in-place result shares an input's storage: nothing new
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in inputs:
                    self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def build(name: str) -> torch.nn.Module:
    """``name`` from timm without classifier; ``<vit>+explicit`` writes the attention out."""
    arch, _, variant = name.partition("+")
    kwargs = {"dynamic_img_size": True} if arch.startswith("vit_") else {}
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    if variant == "explicit":
        for module in model.modules():
            if isinstance(module, Attention):
                module.fused_attn = False
    return model


def step(model: torch.nn.Module, images: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One forward (no_grad) or forward + backward of ``model`` on ``images``."""
    def run() -> None:
        if backward:
            model.zero_grad(set_to_none=True)
            model(images).sum().backward()
        else:
            with torch.no_grad():
                model(images)
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak memory of ``run`` above what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakTensorBytes() as counter:
        run()
    return counter.peak


def seconds(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall time of ``repeats`` runs after one warm-up."""
    run()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, size: int, batch: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Memory and time per image of one model at one square size, forward and forward + backward."""
    model = build(name).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    row: dict[str, Any] = {"model": name, "size": size, "pixels": size * size, "batch": batch}
    for mode, backward in (("forward", False), ("train", True)):
        model.train(backward)
        run = step(model, images, backward)
        try:
            row[f"{mode}_mib_per_image"] = peak_bytes(run, device) / batch / MiB
            row[f"{mode}_ms_per_image"] = 1000 * seconds(run, device, repeats) / batch
        except (RuntimeError, MemoryError) as err:  # out of memory: recorded, the sweep goes on
            row[f"{mode}_error"] = str(err).splitlines()[0][:200]
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.0f}" if key in row else "did not fit"
    lines = ["| model | size | batch | MiB/image fwd | MiB/image fwd+bwd | ms/image fwd | ms/image fwd+bwd |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['size']} | {r['batch']} | {cell(r, 'forward_mib_per_image')} "
              f"| {cell(r, 'train_mib_per_image')} "
              f"| {cell(r, 'forward_ms_per_image')} | {cell(r, 'train_ms_per_image')} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, out: Path) -> None:
    """Memory and time per image against megapixels, one line per model, forward and fwd + bwd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("train_mib_per_image", "MiB per image, forward + backward"),
              ("forward_mib_per_image", "MiB per image, forward only"),
              ("train_ms_per_image", "ms per image, forward + backward"),
              ("forward_ms_per_image", "ms per image, forward only")]
    for ax, (key, label) in zip(axes.flat, panels):
        for name in dict.fromkeys(r["model"] for r in rows):
            points = [(r["pixels"] / 1e6, r[key]) for r in rows if r["model"] == name and key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("megapixels per image (224 px = 0.05, 896 px = 0.80)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def limit_memory(gib: float) -> None:
    """Allocations beyond ``gib`` GiB more than the process holds now fail with a RuntimeError
    (recorded as "did not fit") instead of calling the kernel's out-of-memory killer."""
    import resource

    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()  # virtual size now
    limit = held + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="+",
                        default=["xcit_small_12_p16_224", "vit_small_patch16_224", "vit_small_patch16_224+explicit"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 384, 512, 640, 768, 896])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-limit-gib", type=float, default=None,
                        help="on CPU, fail (and record) allocations beyond this many GiB instead of exhausting the host")
    parser.add_argument("--out", type=Path, default=Path("docs/resolution_bench"),
                        help="OUT.json (rows already there are kept and not measured again), OUT.md, OUT.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cpu_limit_gib and device.type == "cpu":
        limit_memory(args.cpu_limit_gib)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = f"{where}, torch {torch.__version__}, timm {timm.__version__}"
    results = args.out.with_suffix(".json")
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        for size in args.sizes:
            if any((r["model"], r["size"], r["batch"]) == (name, size, args.batch) for r in rows):
                continue
            torch.manual_seed(0)
            rows.append(measure(name, size, args.batch, device, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
            results.write_text(json.dumps({"setting": title, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(f"{title}\n\n{table(rows)}\n")
    batches = "/".join(sorted({str(r["batch"]) for r in rows}))
    plot(rows, f"{title}, batch {batches}", args.out.with_suffix(".png"))
    print(f"{title}\n{table(rows)}")


if __name__ == "__main__":
    main()
