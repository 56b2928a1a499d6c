"""DINO self-distillation loss with teacher centering (arXiv 2104.14294, Alg. 1 and Eq. 3–4)."""

from __future__ import annotations

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

    The teacher distribution of view ``t`` is ``softmax((teacher_t - center) / teacher_temp)``;
    the student's of view ``s`` is ``log_softmax(student_s / student_temp)``. The loss is
    ``-sum_c P_t[c] log P_s[c]`` averaged over the batch and then over every pair
    ``(t, s)`` with ``t != s``; teacher views are the first ``n_teacher_views`` student views.

    Args:
        student_logits: (n_student_views * B, K), views stacked view-major.
        teacher_logits: (n_teacher_views * B, K), the global views, same order.
        center: (1, K) running mean of teacher logits.

    Returns:
        Scalar loss (float32 whatever the input dtype).
    """
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    teacher_probs = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()
    student_views = student_log_probs.chunk(n_student_views)
    teacher_views = teacher_probs.chunk(n_teacher_views)
    total, n_pairs = student_logits.new_zeros((), dtype=torch.float32), 0
    for t, p_teacher in enumerate(teacher_views):
        for s, log_p_student in enumerate(student_views):
            if s == t:
                continue
            total = total + torch.sum(-p_teacher * log_p_student, dim=-1).mean()
            n_pairs += 1
    return total / n_pairs


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average ``x`` over all processes; the identity outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class DINOLoss(nn.Module):
    """DINO loss holding the teacher center as a buffer (so it is checkpointed).

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

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Loss against the current center, then the center's EMA update from this batch."""
        loss = dino_cross_entropy(
            student_logits,
            teacher_logits,
            self.center,
            self.n_student_views,
            self.n_teacher_views,
            self.student_temp,
            teacher_temp,
        )
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher logits over the global batch)``."""
        batch_center = all_reduce_mean(teacher_logits.float().mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


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
