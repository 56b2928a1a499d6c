"""Per-step schedules of the DINO recipe, as pure functions of the optimizer step.

DINO (Caron et al., 2021, arXiv 2104.14294, Sec. 3 and App. B) schedules four quantities:
the learning rate (linear warm-up, then cosine), the weight decay (cosine), the teacher's
EMA momentum (cosine towards 1) and the teacher temperature (linear warm-up). All four are
evaluated here at one optimizer step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (clamped after)."""
    if total_steps <= 0:
        return end
    progress = min(max(step, 0), total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: int, total_steps: int, peak: float, end: float, warmup_steps: int, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``peak`` over ``warmup_steps``, then cosine to ``end``.

    The warm-up reaches ``peak`` exactly at ``warmup_steps``; the cosine then spans the
    remaining ``total_steps - warmup_steps`` steps.
    """
    if step < warmup_steps:
        return warmup_start + (peak - warmup_start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` (step 0) to ``end`` (``warmup_steps`` and after)."""
    if step >= warmup_steps or warmup_steps <= 0:
        return end
    return start + (end - start) * step / warmup_steps


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """Linear scaling rule of DINO: ``lr = base_lr * global_batch / 256``."""
    return base_lr * global_batch_size / 256.0


@dataclass(frozen=True)
class ScheduleValues:
    """Every scheduled quantity at one optimizer step."""

    lr: float
    weight_decay: float
    momentum_teacher: float
    teacher_temp: float


@dataclass(frozen=True)
class DinoSchedules:
    """The DINO schedules of one run, with every length in optimizer steps.

    Attributes:
        total_steps: optimizer steps in the whole run.
        peak_lr: learning rate after warm-up (already scaled by the global batch).
        min_lr: learning rate at the end of the cosine.
        lr_warmup_steps: steps of linear lr warm-up from 0.
        weight_decay: weight decay at step 0; ``weight_decay_end`` at the last step.
        momentum_teacher: teacher EMA momentum at step 0; it follows a cosine to 1.
        warmup_teacher_temp: teacher temperature at step 0, ramped linearly to
            ``teacher_temp`` over ``teacher_temp_warmup_steps``.
    """

    total_steps: int
    peak_lr: float
    min_lr: float
    lr_warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    teacher_temp_warmup_steps: int

    def at(self, step: int) -> ScheduleValues:
        """The values to use for optimizer step ``step`` (0-based)."""
        return ScheduleValues(
            lr=warmup_cosine(step, self.total_steps, self.peak_lr, self.min_lr, self.lr_warmup_steps),
            weight_decay=cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            momentum_teacher=cosine(step, self.total_steps, self.momentum_teacher, 1.0),
            teacher_temp=linear_warmup(
                step, self.teacher_temp_warmup_steps, self.warmup_teacher_temp, self.teacher_temp
            ),
        )
