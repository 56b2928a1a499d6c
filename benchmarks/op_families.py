"""Where a training step's time goes: torch.profiler's self times grouped by op family.

Self time (an op's own time, without the ops it calls) adds up without double counting:
``aten::linear`` costs nothing of its own, the ``aten::addmm`` under it holds the time. On a
GPU each op's self device time is the time of the kernels it launched itself.
"""

from __future__ import annotations

from typing import Any

# First match wins, so the specific families come before the broad ones. Each entry: names
# matched exactly, then substrings; both on the op's name without its "aten::" prefix.
FAMILIES: list[tuple[str, frozenset[str], tuple[str, ...]]] = [
    ("collectives", frozenset(), ("nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
                                  "broadcast_", "barrier", "c10d")),
    ("optimizer, EMA, clipping", frozenset(), ("_foreach_", "adam", "Optimizer.", "clip_grad")),
    ("matmul / linear", frozenset({"mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "dot", "addmv",
                                   "_scaled_mm"}), ("gemm",)),
    ("attention / softmax", frozenset(), ("softmax", "attention", "flash", "sdpa")),
    ("norms", frozenset(), ("norm",)),
    ("convolution", frozenset(), ("convolution", "conv2d", "conv_depthwise", "conv1d")),
    ("copies / casts / layout", frozenset({"to", "t", "cat", "pad", "view", "stack", "flip", "alias", "detach",
                                           "empty", "fill_", "zero_", "zeros", "ones", "full", "roll", "unfold",
                                           "im2col", "col2im", "lift_fresh", "set_", "resize_", "item",
                                           "_local_scalar_dense"}),
     ("copy", "clone", "contiguous", "index", "gather", "scatter", "expand", "reshape", "permute", "transpose",
      "slice", "select", "narrow", "unbind", "split", "chunk", "as_strided", "squeeze", "flatten", "repeat",
      "empty_", "_pad", "Memcpy", "Memset", "memcpy", "memset", "_unsafe_view", "replication_pad")),
    ("CUDA runtime (launches, syncs)", frozenset(), ("cuda", "cuLaunch", "cuMemcpy", "cuStream", "cuEvent")),
]
ELEMENTWISE = "elementwise / reductions"
OTHER = "other (Python, framework, data wait)"


def op_family(name: str) -> str:
    """The family of a profiler event: the first of :data:`FAMILIES` that names it; any other
    aten op is elementwise or a reduction; anything else (Python, Lightning's hooks, the
    data loader, record_function ranges) is other."""
    base = name.removeprefix("aten::")
    for family, exact, parts in FAMILIES:
        if base in exact or any(p in base for p in parts):
            return family
    return ELEMENTWISE if name.startswith("aten::") else OTHER


def grouped_self_times(events: Any, steps: int) -> dict[str, Any]:
    """Per family: self CPU and self device milliseconds per step, their shares, and the
    three ops of largest self time. ``events``: ``profiler.key_averages()`` over ``steps``."""
    families: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.device_type.name != "CPU":  # kernels themselves: their time is in their op's self device time
            continue
        f = families.setdefault(op_family(e.key), {"cpu_ms": 0.0, "device_ms": 0.0, "ops": {}})
        cpu, device = e.self_cpu_time_total / 1e3 / steps, e.self_device_time_total / 1e3 / steps
        f["cpu_ms"] += cpu
        f["device_ms"] += device
        f["ops"][e.key] = f["ops"].get(e.key, 0.0) + max(cpu, device)
    totals = {k: sum(f[k] for f in families.values()) or 1.0 for k in ("cpu_ms", "device_ms")}
    for f in families.values():
        f["cpu_share"], f["device_share"] = f["cpu_ms"] / totals["cpu_ms"], f["device_ms"] / totals["device_ms"]
        f["top_ops"] = sorted(f.pop("ops").items(), key=lambda kv: -kv[1])[:3]
    return dict(sorted(families.items(), key=lambda kv: -max(kv[1]["cpu_ms"], kv[1]["device_ms"])))


def format_table(families: dict[str, Any], device: bool) -> str:
    """A Markdown table of :func:`grouped_self_times` (device columns when a GPU was profiled)."""
    head = "| op family | self CPU ms/step | share |" + (" self GPU ms/step | share |" if device else "") + " largest ops |"
    rule = "|---|---:|---:|" + ("---:|---:|" if device else "") + "---|"
    rows = []
    for name, f in families.items():
        gpu = f" {f['device_ms']:.2f} | {f['device_share']:.1%} |" if device else ""
        ops = ", ".join(op.removeprefix("aten::") for op, _ in f["top_ops"])
        rows.append(f"| {name} | {f['cpu_ms']:.2f} | {f['cpu_share']:.1%} |{gpu} {ops} |")
    return "\n".join([head, rule, *rows])
