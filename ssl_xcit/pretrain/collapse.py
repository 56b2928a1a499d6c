"""Collapse signals of DINO's teacher (arXiv 2104.14294, Sec. 5.3 and Fig. 7).

Collapse takes one of two forms: every output uniform (sharpening lost: the teacher's
per-sample entropy climbs to log K) or one prototype dominating for every image
(centering lost: the batch-mean distribution concentrates, its KL to uniform climbs to
log K while per-sample entropy falls to 0). Logging both tells the forms apart; the
center's norm shows drift.
"""

from __future__ import annotations

import math

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
