import math

import pytest
import torch

from ssl_xcit.pretrain.loss import DINOLoss, dino_cross_entropy, koleo_loss


def naive_dino_loss(student, teacher, center, n_views, student_temp, teacher_temp):
    """Eq. (3) of DINO written out per sample, per pair of views, with explicit exp/log."""
    batch = teacher.shape[0] // 2
    total, pairs = 0.0, 0
    for t in range(2):
        for s in range(n_views):
            if s == t:
                continue
            pair = 0.0
            for b in range(batch):
                tl = [(x - c) / teacher_temp for x, c in zip(teacher[t * batch + b].tolist(), center[0].tolist())]
                sl = [x / student_temp for x in student[s * batch + b].tolist()]
                tz = sum(math.exp(v - max(tl)) for v in tl)
                p_t = [math.exp(v - max(tl)) / tz for v in tl]
                log_sz = max(sl) + math.log(sum(math.exp(v - max(sl)) for v in sl))
                pair += -sum(p * (v - log_sz) for p, v in zip(p_t, sl))
            total += pair / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_views,batch,dim", [(2, 3, 5), (4, 2, 7), (10, 2, 4)])
def test_loss_matches_naive_per_pair_loop(n_views, batch, dim):
    gen = torch.Generator().manual_seed(n_views)
    student = torch.randn(n_views * batch, dim, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2 * batch, dim, generator=gen, dtype=torch.float64)
    center = torch.randn(1, dim, generator=gen, dtype=torch.float64) * 0.1
    got = dino_cross_entropy(student, teacher, center, n_views, 2, 0.1, 0.04)
    want = naive_dino_loss(student, teacher, center, n_views, 0.1, 0.04)
    assert got.item() == pytest.approx(want, rel=1e-5)


def pairwise_loss_float64(student, teacher, center, n_views, student_temp, teacher_temp):
    """The loss as DINO writes it, one (B, K) product per pair of views, in float64 with autograd."""
    log_p = torch.log_softmax(student / student_temp, dim=-1).chunk(n_views)
    p_t = torch.softmax((teacher - center) / teacher_temp, dim=-1).detach().chunk(2)
    terms = [(-p_t[t] * log_p[s]).sum(dim=-1).mean() for t in range(2) for s in range(n_views) if s != t]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n_views,batch,dim", [(2, 4, 16), (10, 3, 64), (12, 2, 1000)])
def test_two_product_loss_and_gradient_equal_the_pairwise_formula(n_views, batch, dim):
    gen = torch.Generator().manual_seed(dim)
    student = torch.randn(n_views * batch, dim, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(2 * batch, dim, generator=gen, dtype=torch.float64) * 3
    center = torch.randn(1, dim, generator=gen, dtype=torch.float64)
    want_input = student.clone().requires_grad_(True)
    want = pairwise_loss_float64(want_input, teacher, center, n_views, 0.1, 0.04)
    want.backward()
    got_input = student.float().requires_grad_(True)
    got = dino_cross_entropy(got_input, teacher.float(), center.float(), n_views, 2, 0.1, 0.04)
    got.backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(got_input.grad.double(), want_input.grad, rtol=1e-4, atol=1e-7 * want_input.grad.abs().max())


def test_loss_gives_no_gradient_to_teacher():
    student = torch.randn(6, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    dino_cross_entropy(student, teacher, torch.zeros(1, 8), 3, 2, 0.1, 0.04).backward()
    assert student.grad is not None and teacher.grad is None


def test_center_is_ema_of_batch_mean():
    loss = DINOLoss(out_dim=3, n_student_views=2, center_momentum=0.9)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 6.0], [4.0, 4.0, 2.0]])
    loss.update_center(loss.batch_center(teacher))
    assert torch.allclose(loss.center, 0.1 * torch.tensor([[2.0, 2.0, 3.0]]))
    loss.update_center(loss.batch_center(teacher))
    assert torch.allclose(loss.center, (0.9 * 0.1 + 0.1) * torch.tensor([[2.0, 2.0, 3.0]]))


def test_a_skipped_step_leaves_the_center_and_a_non_finite_batch_never_reaches_it():
    loss = DINOLoss(out_dim=3, n_student_views=2, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 2.0, 3.0]]))
    before = loss.center.clone()
    loss.update_center(torch.tensor([[float("nan"), 1.0, float("inf")]]), skip=torch.tensor(True))
    assert torch.equal(loss.center, before)
    loss.update_center(torch.tensor([[1.0, 2.0, 3.0]]), skip=torch.tensor(False))
    assert torch.allclose(loss.center, (0.9 * 0.1 + 0.1) * torch.tensor([[1.0, 2.0, 3.0]]))


def test_loss_uses_the_current_center_and_does_not_move_it():
    loss = DINOLoss(out_dim=4, n_student_views=2)
    loss.center.fill_(0.5)
    student, teacher = torch.randn(4, 4), torch.randn(4, 4)
    want = dino_cross_entropy(student, teacher, torch.full((1, 4), 0.5), 2, 2, 0.1, 0.07)
    assert torch.allclose(loss(student, teacher, 0.07), want)
    assert torch.equal(loss.center, torch.full((1, 4), 0.5))


def test_center_is_in_state_dict():
    assert "center" in DINOLoss(out_dim=4, n_student_views=2).state_dict()


def naive_koleo(points):
    """-1/n Σ_i log min_{j≠i} ||x_i/|x_i| - x_j/|x_j|||, by brute force over every pair."""
    unit = [[v / math.sqrt(sum(w * w for w in p)) for v in p] for p in points]
    total = 0.0
    for i, a in enumerate(unit):
        total += math.log(min(math.dist(a, b) for j, b in enumerate(unit) if j != i))
    return -total / len(unit)


@pytest.mark.parametrize("batch,dim", [(2, 3), (7, 4), (16, 8)])
def test_koleo_matches_brute_force_nearest_neighbours(batch, dim):
    points = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch), dtype=torch.float64) * 3
    assert koleo_loss(points).item() == pytest.approx(naive_koleo(points.tolist()), rel=1e-5)


def test_koleo_rewards_spread_embeddings():
    tight = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [1.0, 0.02]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(spread) < koleo_loss(tight)
