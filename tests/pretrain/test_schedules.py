import math

import pytest

from ssl_xcit.pretrain.schedules import DinoSchedules, cosine, linear_warmup, scaled_lr, warmup_cosine


def test_scaled_lr_is_linear_in_global_batch():
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    assert scaled_lr(5e-4, 256) == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "step,want",
    [(0, 0.0), (5, 0.5e-3), (10, 1e-3), (55, 1e-6 + 0.5 * (1e-3 - 1e-6)), (100, 1e-6), (150, 1e-6)],
)
def test_lr_table(step, want):
    assert warmup_cosine(step, 100, 1e-3, 1e-6, 10) == pytest.approx(want, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("step,want", [(0, 0.04), (50, 0.22), (100, 0.4)])
def test_weight_decay_table(step, want):
    assert cosine(step, 100, 0.04, 0.4) == pytest.approx(want)


@pytest.mark.parametrize("step,want", [(0, 0.04), (15, 0.055), (30, 0.07), (99, 0.07)])
def test_teacher_temp_table(step, want):
    assert linear_warmup(step, 30, 0.04, 0.07) == pytest.approx(want)


def test_all_schedules_together():
    s = DinoSchedules(
        total_steps=1000,
        peak_lr=2e-3,
        min_lr=1e-6,
        lr_warmup_steps=100,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=300,
    )
    start, warm, end = s.at(0), s.at(100), s.at(1000)
    assert (start.lr, start.weight_decay, start.momentum_teacher, start.teacher_temp) == pytest.approx(
        (0.0, 0.04, 0.996, 0.04)
    )
    assert warm.lr == pytest.approx(2e-3)
    assert warm.weight_decay == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 0.1)))
    assert s.at(300).teacher_temp == pytest.approx(0.07)
    assert (end.lr, end.weight_decay, end.momentum_teacher) == pytest.approx((1e-6, 0.4, 1.0))
