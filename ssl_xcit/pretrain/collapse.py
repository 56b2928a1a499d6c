"""Collapse signals of DINO's teacher (arXiv 2104.14294, Sec. 5.3 and Fig. 7).

Collapse takes one of two forms: every output uniform (sharpening lost: the teacher's
per-sample entropy climbs to log K) or one prototype dominating for every image
(centering lost: the batch-mean distribution concentrates, its KL to uniform climbs to
log K while per-sample entropy falls to 0). Logging both tells the forms apart; the
center's norm shows drift.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_signals(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> dict[str, float]:
    """Health signals of the teacher's centred, sharpened output distribution.

    Args:
        teacher_logits: (N, K) raw teacher outputs.
        center: (1, K) the loss's center.

    Returns:
        ``teacher_entropy``: mean per-sample entropy of the teacher probabilities (nats;
        near ``log K`` means uniform outputs); ``kl_to_uniform``: KL(mean prob ‖ uniform)
        = log K − H(mean prob) (near ``log K`` means every sample picks the same
        prototype); ``center_norm``: L2 norm of the center.
    """
    probs = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean()
    mean_probs = probs.mean(dim=0)
    mean_entropy = -(mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum()
    return {
        "teacher_entropy": entropy.item(),
        "kl_to_uniform": math.log(probs.shape[-1]) - mean_entropy.item(),
        "center_norm": center.norm().item(),
    }


def rankme(features: torch.Tensor) -> float:
    """RankMe (Garrido et al., 2023, arXiv 2210.02885): the effective rank of embeddings,
    ``exp(H(p))`` with ``p_k = σ_k / Σσ + ε`` over the singular values σ of (N, D) ``features``.
    Between 1 (all embeddings on one line: dimensional collapse) and min(N, D)."""
    sigma = torch.linalg.svdvals(torch.as_tensor(features).double())
    p = sigma / sigma.sum() + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


class CollapseWatch:
    """Says when a collapse signal has stayed near log K for ``patience`` logged steps.

    Uniform collapse: the teacher's per-sample entropy within ``margin`` × log K of log K.
    One-prototype collapse: the KL of its batch mean to uniform within the same of log K.
    Steps before ``start_step`` (the lr and teacher-temperature warm-ups, where DINO's
    outputs sit near uniform by design) are not judged. Each form is reported once.
    """

    REMEDIES = {
        "teacher_entropy": ("the teacher's per-sample entropy", "uniform outputs: sharpening lost",
                            "lower dino.teacher_temp, lower optim.lr or lengthen optim.warmup_epochs, "
                            "raise optim.momentum_teacher"),
        "kl_to_uniform": ("the KL of the teacher's batch mean to uniform", "one prototype wins for every image: "
                          "centering lost", "lower dino.center_momentum, raise dino.teacher_temp, lower optim.lr, "
                          "keep model.norm_last_layer true"),
    }

    def __init__(self, out_dim: int, start_step: int, patience: int = 20, margin: float = 0.01) -> None:
        self.log_k, self.start_step, self.patience, self.margin = math.log(out_dim), start_step, patience, margin
        self.streak = {signal: 0 for signal in self.REMEDIES}
        self.reported: set[str] = set()

    def update(self, step: int, signals: dict[str, float]) -> Optional[str]:
        """Feed one logged step's signals; the alarm's one line when a collapse is established."""
        if step < self.start_step:
            return None
        for signal, (what, form, remedies) in self.REMEDIES.items():
            near = signals[signal] >= (1 - self.margin) * self.log_k
            self.streak[signal] = self.streak[signal] + 1 if near else 0
            if self.streak[signal] >= self.patience and signal not in self.reported:
                self.reported.add(signal)
                return (f"collapse at step {step}: {what} has stayed within {self.margin:.0%} of log K = "
                        f"{self.log_k:.2f} for {self.patience} logged steps ({form}); usual remedies: {remedies}")
        return None
