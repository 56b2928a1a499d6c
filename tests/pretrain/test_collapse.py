"""The collapse alarm, RankMe, and the alarm in a run whose head has collapsed."""

import math

import pytest
import torch

from ssl_xcit.cli import main
from ssl_xcit.pretrain.collapse import CollapseWatch, rankme
from tests.helpers import tiny_pretrain_args

LOG_K = math.log(1024)


def healthy(step: int) -> dict:
    """Signals shaped like the quick start's: near log K early, then the teacher sharpens."""
    return {"teacher_entropy": 6.84 - 0.0015 * step, "kl_to_uniform": 0.02 + 0.0003 * step}


def test_silent_on_a_healthy_run():
    watch = CollapseWatch(1024, start_step=0, patience=20)
    assert all(watch.update(step, healthy(step)) is None for step in range(0, 500, 5))


@pytest.mark.parametrize("signal,form", [("teacher_entropy", "uniform outputs"), ("kl_to_uniform", "one prototype")])
def test_fires_once_after_patience_naming_the_signal_and_remedies(signal, form):
    watch = CollapseWatch(1024, start_step=100, patience=5)
    collapsed = {"teacher_entropy": 0.1, "kl_to_uniform": 0.1, signal: LOG_K - 0.001}
    said = [watch.update(step, collapsed) for step in range(0, 200, 10)]
    fired = [(step, line) for step, line in zip(range(0, 200, 10), said) if line]
    assert len(fired) == 1 and fired[0][0] == 140  # steps 100..140 are the first 5 judged
    assert "collapse at step 140" in fired[0][1] and form in fired[0][1] and "usual remedies" in fired[0][1]


def test_a_streak_is_broken_by_one_healthy_step():
    watch = CollapseWatch(1024, start_step=0, patience=3)
    near = {"teacher_entropy": LOG_K, "kl_to_uniform": 0.0}
    steps = [near, near, healthy(0) | {"teacher_entropy": 5.0}, near, near]
    assert all(watch.update(i, s) is None for i, s in enumerate(steps))


def test_rankme_counts_the_directions_used():
    basis = torch.linalg.qr(torch.randn(64, 64))[0]
    codes = torch.randn(1000, 5)
    codes = torch.linalg.qr(codes)[0] * 10  # 5 equal singular values
    assert rankme(codes @ basis[:5]) == pytest.approx(5, rel=1e-4)
    assert rankme(torch.randn(5000, 32)) > 30  # isotropic: nearly every dimension


def collapsed_head(self, x):
    """A head whose every output is the same: the teacher's distribution is uniform."""
    return torch.zeros(x.shape[0], self.last_layer.weight.shape[0], requires_grad=True) + 0 * x.sum()


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_the_alarm_sounds_in_a_collapsed_run(tmp_path, capsys, monkeypatch, recwarn, action):
    monkeypatch.setattr("ssl_xcit.pretrain.head.DINOHead.forward", collapsed_head)
    args = tiny_pretrain_args("synthetic", tmp_path, data__synthetic_size="64", data__synthetic_resolution="40",
                              trainer__max_epochs="2", trainer__log_every_n_steps="1", optim__warmup_epochs="0",
                              run__collapse_patience="4", run__on_collapse=action)
    code = main(["pretrain", *args])
    said = capsys.readouterr().err + " ".join(str(w.message) for w in recwarn)
    assert "collapse at step 3: the teacher's per-sample entropy" in said
    if action == "warn":
        assert code == 0
        assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16
    else:
        assert code == 1 and "run.on_collapse is stop" in said
        assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
