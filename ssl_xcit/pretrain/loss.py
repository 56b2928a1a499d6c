"""DINO self-distillation loss with teacher centering (arXiv 2104.14294, Alg. 1 and Eq. 3–4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def dino_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    n_student_views: int,
    n_teacher_views: int,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean cross-entropy between teacher and student over all pairs of different views.

    The teacher distribution of view ``t`` is ``P_t = softmax((teacher_t - center) / teacher_temp)``;
    the student's of view ``s`` is ``log p_s = log_softmax(student_s / student_temp)``. The loss is
    ``-sum_c P_t[c] log p_s[c]`` averaged over the batch and then over every pair ``(t, s)``
    with ``t != s``; teacher views are the first ``n_teacher_views`` student views.

    The sum over pairs is computed as two products instead of one per pair:
    ``sum_t sum_{s != t} P_t . log p_s = (sum_t P_t) . (sum_s log p_s) - sum_t P_t . log p_t``,
    so backward keeps (B, K) tensors a fixed number of times, not once per pair.

    Args:
        student_logits: (n_student_views * B, K), views stacked view-major.
        teacher_logits: (n_teacher_views * B, K), the global views, same order.
        center: (1, K) running mean of teacher logits.

    Returns:
        Scalar loss (float32 whatever the input dtype).
    """
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1).unflatten(0, (n_student_views, -1))  # (V, B, K)
    teacher = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()
    teacher = teacher.unflatten(0, (n_teacher_views, -1))  # (T, B, K)
    every_pair = (teacher.sum(dim=0) * log_p.sum(dim=0)).sum(dim=-1)  # (B,): all (t, s), t == s included
    same_view = (teacher * log_p[:n_teacher_views]).sum(dim=(0, -1))  # (B,): the pairs t == s
    n_pairs = n_teacher_views * (n_student_views - 1)
    return (same_view - every_pair).mean() / n_pairs


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average ``x`` over all processes; the identity outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class DINOLoss(nn.Module):
    """DINO loss holding the teacher center as a buffer (so it is checkpointed).

    The center moves in two steps: :meth:`batch_center` (the teacher logits' mean over the
    global batch, all-reduced, taken with the loss) and :meth:`update_center` once the step's
    fate is known, so that a skipped step never moves it.

    Args:
        out_dim: K, the number of prototypes of the head.
        n_student_views: 2 global + the local crops.
        n_teacher_views: global views seen by the teacher (2).
        student_temp: τ_s (0.1 in DINO).
        center_momentum: EMA momentum of the center (0.9 in DINO).
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        n_student_views: int,
        n_teacher_views: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.n_student_views = n_student_views
        self.n_teacher_views = n_teacher_views
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The loss against the current center (the center itself is not moved here)."""
        return dino_cross_entropy(
            student_logits,
            teacher_logits,
            self.center,
            self.n_student_views,
            self.n_teacher_views,
            self.student_temp,
            teacher_temp,
        )

    @torch.no_grad()
    def batch_center(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """(1, K): the mean of the teacher logits over the global batch (one all-reduce)."""
        return all_reduce_mean(teacher_logits.float().mean(dim=0, keepdim=True))

    @torch.no_grad()
    def update_center(self, batch_center: torch.Tensor, skip: Optional[torch.Tensor] = None) -> None:
        """``center <- m * center + (1 - m) * batch_center``, unless ``skip`` (a 0-d bool tensor,
        the same on every rank) says the step was skipped: then the center stays as it is."""
        moved = self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum)
        self.center.copy_(moved if skip is None else torch.where(skip, self.center, moved))


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko entropy term DINOv2 adds to DINO (arXiv 2304.07193, Sec. 4;
    Sablayrolles et al., 2019): ``-mean_i log ||x_i - x_nn(i)||`` over L2-normalised
    embeddings, ``nn(i)`` the nearest other embedding of the batch. Minimising it spreads
    the embeddings over the sphere, which nearest-neighbour retrieval rewards.

    Args:
        embeddings: (B, D) the student's class tokens of one view, B >= 2.
    """
    x = F.normalize(embeddings.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T  # (B, B)
        similarity.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = similarity.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()
