"""Weighted k-NN classification of frozen features, the protocol of DINO.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (2021,
arXiv 2104.14294), Sec. 4.1 and ``eval_knn.py``: features are L2-normalised, each test
feature finds its k nearest training features by cosine similarity, and neighbour j
votes for its class with weight ``exp(s_j / T)`` (T = 0.07).

Tie rule, used for every prediction and top-5 ranking here: when classes have equal
scores, the lower class index ranks first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ssl_xcit.devices import default_device
from ssl_xcit.eval.feature_store import FeatureError, validate_train_test

if TYPE_CHECKING:
    import faiss

DEFAULT_KS = (10, 20, 100, 200)
_FAISS_GPU_MAX_K = 2048  # faiss GPU indexes refuse larger k


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (N, D) scaled to unit L2 norm, as float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_k(k: int, bank_size: int) -> None:
    if not 1 <= k <= bank_size:
        raise FeatureError(f"k={k} must be between 1 and the number of bank (training) features, {bank_size}")


def _faiss_index(bank: np.ndarray, k: int, device: str | None) -> faiss.Index:
    try:  # imported here: the torch backend works where faiss is not installed
        import faiss
    except ImportError as err:
        raise FeatureError("k-NN backend faiss: faiss is not installed (pip install faiss-cpu); "
                           "or choose the torch backend") from err
    index = faiss.IndexFlatIP(bank.shape[1])
    gpu_ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu_ok and device != "cpu" and k <= _FAISS_GPU_MAX_K:
        # the process's own GPU (see ssl_xcit.devices.bind_local_gpu); faiss numbers GPUs as CUDA does
        gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
    index.add(bank)
    return index


def _search_faiss(bank: np.ndarray, queries: np.ndarray, k: int, device: str | None) -> tuple[np.ndarray, np.ndarray]:
    # One call: faiss already tiles queries x bank (4096 x 1024 blocks on CPU), so its
    # memory stays bounded without chunking here.
    sims, idx = _faiss_index(bank, k, device).search(queries, k)
    return sims, idx.astype(np.int64)


def _search_torch(
    bank: np.ndarray, queries: np.ndarray, k: int, batch_size: int, device: str | None
) -> tuple[np.ndarray, np.ndarray]:
    dev = default_device(device)
    bank_t = torch.from_numpy(bank).to(dev)
    sims, idx = [], []
    for i in range(0, len(queries), batch_size):
        chunk = torch.from_numpy(queries[i : i + batch_size]).to(dev)
        top = torch.topk(chunk @ bank_t.T, k, dim=1)  # (B, N) similarities -> (B, k), sorted descending
        sims.append(top.values.cpu().numpy())
        idx.append(top.indices.cpu().numpy())
    return np.concatenate(sims), np.concatenate(idx).astype(np.int64)


def knn_search(
    bank: np.ndarray,
    queries: np.ndarray,
    k: int,
    backend: str = "faiss",
    batch_size: int = 1024,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product search: the k bank rows most similar to each query.

    Args:
        bank: (N, D) L2-normalised float32 training features.
        queries: (Q, D) L2-normalised float32 features to classify.
        k: neighbours per query, 1 <= k <= N.
        backend: "faiss" (``IndexFlatIP``, on GPU when faiss has one; it bounds its own
            memory by tiling) or "torch" (matmul + ``topk`` over chunks of ``batch_size``
            queries, so at most a (batch_size, N) similarity block exists at a time).
        batch_size: queries per chunk of the torch backend.
        device: None picks the GPU when available; "cpu" forces the CPU (both backends).

    Returns:
        (similarities (Q, k) float32 sorted descending, bank indices (Q, k) int64). The order
        of neighbours with exactly equal similarity is backend-specific.
    """
    _check_k(k, len(bank))
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if backend == "faiss":
        return _search_faiss(bank, queries, k, device)
    if backend == "torch":
        return _search_torch(bank, queries, k, batch_size, device)
    raise FeatureError(f"unknown k-NN backend {backend!r}; choose 'faiss' or 'torch'")


def knn_vote(
    neighbor_sims: np.ndarray, neighbor_labels: np.ndarray, num_classes: int, k: int, temperature: float
) -> np.ndarray:
    """DINO's weighted vote: class score = sum over the first k neighbours of that class of exp(s / T).

    Args:
        neighbor_sims: (Q, K) similarities, K >= k, sorted descending.
        neighbor_labels: (Q, K) class index of each neighbour.
        num_classes: C.
        k: how many leading neighbours vote.
        temperature: T.

    Returns:
        (Q, C) float64 class scores.
    """
    q = len(neighbor_sims)
    weights = np.exp(neighbor_sims[:, :k].astype(np.float64) / temperature)  # (Q, k)
    slots = np.arange(q)[:, None] * num_classes + neighbor_labels[:, :k]  # (Q, k) flat (query, class) slot
    return np.bincount(slots.ravel(), weights=weights.ravel(), minlength=q * num_classes).reshape(q, num_classes)


def true_class_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each true class among the scores, ties going to the lower class index.

    Args:
        scores: (Q, C) class scores.
        labels: (Q,) true class indices.

    Returns:
        (Q,) int64 ranks: 0 means a correct top-1 prediction, < 5 a correct top-5.
    """
    true = np.take_along_axis(scores, labels[:, None], axis=1)  # (Q, 1)
    lower_index = np.arange(scores.shape[1])[None, :] < labels[:, None]  # (Q, C)
    return ((scores > true) | ((scores == true) & lower_index)).sum(axis=1)


def _per_class_top1(correct: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    classes, counts = np.unique(labels, return_counts=True)
    hits = np.bincount(labels, weights=correct, minlength=classes.max() + 1)[classes]
    return {str(c): 100.0 * h / n for c, h, n in zip(classes.tolist(), hits.tolist(), counts.tolist())}


def knn_evaluate(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    backend: str = "faiss",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Weighted k-NN accuracy of the test features against the training features.

    Both sets are L2-normalised here (a no-op for already normalised features). One search
    at ``max(ks)`` serves every k, since the k nearest are the first k of the max(ks) nearest.

    Args:
        train_features: (N, D) bank features.
        train_labels: (N,) class indices.
        test_features: (Q, D) query features.
        test_labels: (Q,) class indices.
        ks: neighbour counts to report.
        temperature: T of the vote.
        backend: see ``knn_search``.
        num_classes: C; by default 1 + the largest label in either split.

    Returns:
        JSON-serialisable report: temperature, backend, num_train, num_test, num_classes and
        ``results``, one dict per k with ``top1``, ``top5`` (None when C < 5) and
        ``per_class_top1`` (class index as str -> %, for classes present in the test set),
        all in percent.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    validate_train_test(train_features, train_labels, test_features, test_labels)
    if not ks:
        raise FeatureError("ks must name at least one k")
    for k in ks:
        _check_k(k, len(train_features))
    max_label = int(max(train_labels.max(), test_labels.max()))
    num_classes = max_label + 1 if num_classes is None else num_classes
    if max_label >= num_classes:
        raise FeatureError(f"label {max_label} is out of range for num_classes={num_classes}")
    sims, idx = knn_search(l2_normalize(train_features), l2_normalize(test_features), max(ks), backend)
    neighbor_labels = np.asarray(train_labels, dtype=np.int64)[idx]  # (Q, max k)
    results = []
    test_labels = test_labels.astype(np.int64)
    for k in ks:
        rank = true_class_rank(knn_vote(sims, neighbor_labels, num_classes, k, temperature), test_labels)
        results.append(
            {
                "k": int(k),
                "top1": 100.0 * float(np.mean(rank == 0)),
                "top5": 100.0 * float(np.mean(rank < 5)) if num_classes >= 5 else None,
                "per_class_top1": _per_class_top1(rank == 0, test_labels),
            }
        )
    return {
        "temperature": temperature,
        "backend": backend,
        "num_train": len(train_features),
        "num_test": len(test_features),
        "num_classes": num_classes,
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report of ``knn_evaluate`` as a small text table (one row per k)."""
    lines = [
        f"weighted k-NN (T={report['temperature']}, backend={report['backend']}, "
        f"{report['num_train']} train / {report['num_test']} test, {report['num_classes']} classes)",
        f"{'k':>5}  {'top1 %':>7}  {'top5 %':>7}",
    ]
    for row in report["results"]:
        top5 = "-" if row["top5"] is None else f"{row['top5']:.2f}"
        lines.append(f"{row['k']:>5}  {row['top1']:>7.2f}  {top5:>7}")
    return "\n".join(lines)
