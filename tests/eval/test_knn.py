import json
import math

import numpy as np
import pytest

from ssl_xcit.eval.feature_store import FeatureError
from ssl_xcit.eval.knn import format_table, knn_evaluate, knn_search, knn_vote, l2_normalize, true_class_rank

T = 0.07


def _on_circle(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


# Hand-made 2-D bank: 7 classes on the unit circle. The points at +-53.13 degrees are
# (0.6, +-0.8), the two nearest to a query at 0 degrees and exactly as similar, so with
# k=2 that query sees tied votes. Elsewhere no two neighbours tie at any tested k boundary.
BANK_DEG = [53.13010235, -53.13010235, 97, 128, 161, 187, 213, 241, 268, 284, 69, 113, 149, 227]
BANK_LABELS = np.array([1, 0, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6, 0, 1])
QUERY_DEG = [0, 0, 120, 198, 275, 10, 170, 250]
QUERY_LABELS = np.array([0, 1, 3, 5, 4, 6, 4, 2])


def _brute_force(bank, bank_labels, queries, query_labels, k, num_classes, temperature):
    """Naive weighted k-NN: per query, sort the bank by similarity and add up exp(s / T) votes.

    Returns (top-1 correct list, top-5 correct list); ties in class score go to the lower class.
    """
    top1, top5 = [], []
    for q, label in zip(queries.astype(np.float64), query_labels):
        sims = [float(np.dot(q, b)) for b in bank.astype(np.float64)]
        order = sorted(range(len(bank)), key=lambda j: -sims[j])
        if k < len(bank):
            assert sims[order[k - 1]] > sims[order[k]] + 1e-6, "hand-made data must not tie at the k boundary"
        scores = [0.0] * num_classes
        for j in order[:k]:
            scores[bank_labels[j]] += math.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        top1.append(ranking[0] == label)
        top5.append(label in ranking[:5])
    return top1, top5


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("temperature", [T, 1.0])  # at T=1 far neighbours still sway the vote
def test_knn_evaluate_matches_brute_force_on_hand_made_points(backend, temperature):
    bank, queries = _on_circle(BANK_DEG), _on_circle(QUERY_DEG)
    ks = (2, 3, 5, 10)  # 10 > 7 classes; k=1 would cut the tie at 0 degrees arbitrarily
    report = knn_evaluate(bank, BANK_LABELS, queries, QUERY_LABELS, ks=ks, temperature=temperature, backend=backend)
    assert [r["k"] for r in report["results"]] == list(ks)
    for row in report["results"]:
        top1, top5 = _brute_force(bank, BANK_LABELS, queries, QUERY_LABELS, row["k"], 7, temperature)
        assert row["top1"] == pytest.approx(100.0 * np.mean(top1))
        assert row["top5"] == pytest.approx(100.0 * np.mean(top5))
        for c in np.unique(QUERY_LABELS):
            expected = 100.0 * np.mean([t for t, lab in zip(top1, QUERY_LABELS) if lab == c])
            assert row["per_class_top1"][str(c)] == pytest.approx(expected)
    json.dumps(report)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_tied_class_scores_go_to_lower_class(backend):
    # k=2: the query at 0 degrees gets one vote of exp(0.6 / T) each from class 1 and class 0.
    bank, queries = _on_circle(BANK_DEG), _on_circle([0, 0])
    report = knn_evaluate(bank, BANK_LABELS, queries, np.array([0, 1]), ks=(2,), backend=backend)
    assert report["results"][0]["per_class_top1"] == {"0": 100.0, "1": 0.0}


def test_knn_vote_matches_formula_and_breaks_ties_low():
    sims = np.array([[0.9, 0.5, 0.5, 0.1], [0.6, 0.6, 0.2, 0.0]], dtype=np.float32)
    labels = np.array([[2, 0, 1, 2], [1, 0, 2, 2]])
    scores = knn_vote(sims, labels, num_classes=3, k=3, temperature=0.1)
    e = lambda s: math.exp(np.float32(s) / 0.1)  # noqa: E731
    assert scores[0] == pytest.approx([e(0.5), e(0.5), e(0.9)])
    assert scores[1] == pytest.approx([e(0.6), e(0.6), e(0.2)])
    assert scores[1, 0] == scores[1, 1]
    assert true_class_rank(scores, np.array([0, 0])).tolist() == [1, 0]
    assert true_class_rank(scores, np.array([1, 1])).tolist() == [2, 1]


def test_faiss_and_torch_agree_on_random_data():
    rng = np.random.default_rng(0)
    bank = l2_normalize(rng.normal(size=(3000, 32)))
    queries = l2_normalize(rng.normal(size=(257, 32)))
    sims_f, idx_f = knn_search(bank, queries, 50, backend="faiss", batch_size=100)
    sims_t, idx_t = knn_search(bank, queries, 50, backend="torch", batch_size=100)
    assert sims_f.dtype == sims_t.dtype == np.float32 and idx_f.dtype == idx_t.dtype == np.int64
    assert sims_f.shape == idx_t.shape == (257, 50)
    np.testing.assert_allclose(sims_f, sims_t, atol=1e-5)
    assert np.all(np.diff(sims_f, axis=1) <= 0)
    assert np.mean(idx_f == idx_t) > 0.999
    labels = rng.integers(0, 10, size=3000)
    test_labels = rng.integers(0, 10, size=257)
    by_backend = [knn_evaluate(bank, labels, queries, test_labels, backend=b)["results"] for b in ("faiss", "torch")]
    assert by_backend[0] == by_backend[1]


def test_torch_search_is_independent_of_batch_size():
    rng = np.random.default_rng(1)
    bank, queries = l2_normalize(rng.normal(size=(500, 16))), l2_normalize(rng.normal(size=(40, 16)))
    whole = knn_search(bank, queries, 7, backend="torch", batch_size=1024)
    chunked = knn_search(bank, queries, 7, backend="torch", batch_size=3)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], atol=1e-6)


def test_l2_normalize():
    x = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])


def test_top5_only_with_at_least_five_classes():
    bank, queries = _on_circle(BANK_DEG), _on_circle(QUERY_DEG)
    four = knn_evaluate(bank, BANK_LABELS % 4, queries, QUERY_LABELS % 4, ks=(3,))
    assert four["results"][0]["top5"] is None
    assert "-" in format_table(four).splitlines()[-1]
    seven = knn_evaluate(bank, BANK_LABELS, queries, QUERY_LABELS, ks=(3,))
    assert seven["results"][0]["top5"] is not None


def test_format_table_lists_every_k():
    bank, queries = _on_circle(BANK_DEG), _on_circle(QUERY_DEG)
    table = format_table(knn_evaluate(bank, BANK_LABELS, queries, QUERY_LABELS, ks=(1, 5)))
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["1", "5"]


def _good():
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    return train, np.arange(20) % 3, test, np.arange(6) % 3


def _nan_in_test_row(args):
    args[2][4, 1] = np.nan
    return args


@pytest.mark.parametrize(
    "corrupt, kwargs, message",
    [
        (lambda a: (a[0], a[1], a[2][:, :3], a[3]), {}, "train features have dim 4, test features have dim 3"),
        (_nan_in_test_row, {}, "test features has a non-finite value in row 4"),
        (lambda a: (a[0], a[1][:-1], a[2], a[3]), {}, "train labels have shape (19,)"),
        (lambda a: (a[0][:0], a[1][:0], a[2], a[3]), {}, "train features must be a non-empty"),
        (lambda a: a, {"ks": (10, 21)}, "k=21 must be between 1 and the number of bank (training) features, 20"),
        (lambda a: a, {"ks": (5,), "backend": "annoy"}, "unknown k-NN backend 'annoy'"),
        (lambda a: a, {"ks": (5,), "num_classes": 2}, "label 2 is out of range for num_classes=2"),
    ],
)
def test_knn_evaluate_rejects_bad_input(corrupt, kwargs, message):
    with pytest.raises(FeatureError) as err:
        knn_evaluate(*corrupt(list(_good())), **kwargs)
    assert message in str(err.value)


def test_knn_search_rejects_k_above_bank_size():
    with pytest.raises(ValueError, match="k=6 .* 5"):
        knn_search(l2_normalize(np.eye(5, 3)), l2_normalize(np.eye(2, 3)), 6)


def test_the_torch_backend_works_without_faiss_installed(tmp_path):
    """A machine without faiss (as some GPU images are): the module imports, torch searches,
    and asking for faiss says what to do."""
    import subprocess
    import sys

    from tests.helpers import REPO

    script = """
import sys
sys.modules["faiss"] = None  # any `import faiss` now raises ImportError
import numpy as np
from ssl_xcit.errors import UserError
from ssl_xcit.eval.knn import knn_evaluate
x = np.eye(4, dtype=np.float32)
print(knn_evaluate(x, np.arange(4), x, np.arange(4), ks=(1,), backend="torch")["results"][0]["top1"])
try:
    knn_evaluate(x, np.arange(4), x, np.arange(4), ks=(1,), backend="faiss")
except UserError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "100.0", "k-NN backend faiss: faiss is not installed (pip install faiss-cpu); or choose the torch backend"]


def test_the_faiss_gpu_index_goes_on_the_current_device(monkeypatch):
    """Under torchrun, rank r's current device is cuda:r (ssl_xcit.devices.bind_local_gpu): its
    index goes there, not to GPU 0. faiss and torch.cuda are stand-ins here."""
    import sys
    import types

    import torch

    placed = []
    fake = types.SimpleNamespace(
        IndexFlatIP=lambda dim: types.SimpleNamespace(add=lambda bank: None, search=None),
        StandardGpuResources=lambda: "resources",
        get_num_gpus=lambda: 4,
        index_cpu_to_gpu=lambda resources, gpu, index: placed.append(gpu) or index,
    )
    monkeypatch.setitem(sys.modules, "faiss", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    from ssl_xcit.eval.knn import _faiss_index

    _faiss_index(np.eye(4, dtype=np.float32), k=2, device=None)
    assert placed == [3]
    _faiss_index(np.eye(4, dtype=np.float32), k=2, device="cpu")
    assert placed == [3]  # "cpu" keeps the index on the CPU


def test_knn_on_held_out_training_images_classifies_them_against_the_rest(tmp_path, capsys):
    """knn --holdout-fraction: the queries are that share of each class of the training store,
    the bank the rest, never a test split; the figure is the brute-force k-NN of those sets."""
    from ssl_xcit.cli import main
    from ssl_xcit.eval.feature_store import FeatureStoreWriter

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 25)
    features = (rng.normal(size=(100, 8)) + 2.0 * np.eye(8)[labels]).astype(np.float32)
    writer = FeatureStoreWriter(tmp_path / "train", 100, 8, {"arch": "x", "checkpoint": "c"})
    writer.write(0, features, labels, [f"img{i}" for i in range(100)])
    writer.finish()
    out = tmp_path / "report.json"
    assert main(["knn", "--train", str(tmp_path / "train"), "--holdout-fraction", "0.2", "--k", "5",
                 "--backend", "torch", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "held out" in report["test_store"] and report["num_test"] == 20
    # the split's own promise, checked from the outside: 5 rows of each class held out, disjoint from the bank
    from ssl_xcit.eval.linear_grid import stratified_split

    bank, held = stratified_split(labels, 0.2, 0)
    assert not set(bank) & set(held) and np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    top1, _ = _brute_force(unit[bank], labels[bank], unit[held], labels[held], 5, 4, T)
    assert report["results"][0]["top1"] == pytest.approx(100.0 * np.mean(top1))
    assert main(["knn", "--train", str(tmp_path / "train"), "--holdout-fraction", "0.2",
                 "--test", str(tmp_path / "train")]) == 2
    assert "give no --test" in capsys.readouterr().err
