import copy

import pytest
import torch

from ssl_xcit.backbones import MultiCropNet, build_backbone
from ssl_xcit.pretrain.head import DINOHead
from ssl_xcit.pretrain.optim import clip_gradients_per_tensor, ema_update, gradient_norms, param_groups
from tests.helpers import REPO


@pytest.fixture(scope="module")
def net() -> MultiCropNet:
    backbone = build_backbone("xcit_nano_12_p16_224", depth=2)
    return MultiCropNet(backbone, DINOHead(backbone.num_features, 32, hidden_dim=16, bottleneck_dim=8))


def _names(net, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in net.named_parameters() if id(p) in ids}


def test_xcit_weight_decay_rule(net):
    decay, no_decay = param_groups(net, "xcit")
    decayed, free = _names(net, decay), _names(net, no_decay)
    assert decay["apply_weight_decay"] and not no_decay["apply_weight_decay"] and no_decay["weight_decay"] == 0
    assert {"backbone.cls_token", "backbone.blocks.0.attn.temperature"} <= free
    assert "backbone.pos_embed.token_projection.weight" in free  # timm declares pos_embed.* decay-free
    params = dict(net.named_parameters())
    multi_dim_free = {n for n in free if params[n].ndim > 1}
    temperatures = {f"backbone.blocks.{i}.attn.temperature" for i in range(2)}
    assert multi_dim_free == {"backbone.cls_token", "backbone.pos_embed.token_projection.weight"} | temperatures
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.mlp.fc1.weight", "head.mlp.0.weight",
            "head.last_layer.parametrizations.weight.original1"} <= decayed
    assert not any(n.endswith(".bias") for n in decayed)
    assert all(p.ndim > 1 for p in decay["params"])


def dino_get_params_groups(model):
    """DINO's rule as its utils.get_params_groups states it: trainable parameters named *.bias or of
    one dimension are not regularised; every other trainable tensor is."""
    regularized, not_regularized = set(), set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or len(param.shape) == 1 else regularized).add(name)
    return regularized, not_regularized


@pytest.mark.parametrize("recipe", ["imagenet_xcit_small_12_p16.yaml", "imagenet_xcit_medium_24_p8.yaml"])
def test_imagenet_recipes_decay_exactly_what_dino_decays(recipe):
    """On the recipe's own backbone and head shape (out_dim cut to 1,024 to stay light), tensor by tensor."""
    from ssl_xcit.pretrain.command import parse_pretrain_args

    cfg = parse_pretrain_args(["--config", str(REPO / "configs" / recipe)]).options
    backbone = build_backbone(cfg.model.arch)
    model = MultiCropNet(backbone, DINOHead(backbone.num_features, 1024, norm_last_layer=cfg.model.norm_last_layer))
    decay, no_decay = param_groups(model, cfg.optim.decay_rule)
    regularized, not_regularized = dino_get_params_groups(model)
    assert cfg.optim.decay_rule == "dino"
    assert _names(model, decay) == regularized and _names(model, no_decay) == not_regularized
    assert {"backbone.cls_token", "backbone.blocks.0.attn.temperature",
            "backbone.pos_embed.token_projection.weight"} <= regularized


def test_every_trainable_parameter_in_exactly_one_group(net):
    groups = param_groups(net)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in net.parameters())


def test_frozen_head_magnitude_not_in_groups(net):
    g = net.head.last_layer.parametrizations.weight.original0
    assert all(id(g) != id(p) for group in param_groups(net) for p in group["params"])


def test_per_tensor_clipping():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    norms = gradient_norms([a, b])
    assert torch.allclose(norms, torch.tensor([5.0, 0.5]))
    clip_gradients_per_tensor([a, b], 1.0, norms)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))


def test_ema_formula_and_momentum_one_is_a_no_op(net):
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(list(teacher.parameters()), list(net.parameters()), momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update(list(teacher.parameters()), list(net.parameters()), momentum=0.75)
    for t0, t1, s in zip(before, teacher.parameters(), net.parameters()):
        assert torch.allclose(t1, 0.75 * t0 + 0.25 * s)


def test_ema_with_a_skip_flag_moves_only_when_the_flag_is_false(net):
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(list(teacher.parameters()), list(net.parameters()), 0.75, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update(list(teacher.parameters()), list(net.parameters()), 0.75, skip=torch.tensor(False))
    for t0, t1, s in zip(before, teacher.parameters(), net.parameters()):
        assert torch.allclose(t1, 0.75 * t0 + 0.25 * s)


def test_gradient_norms_flag_a_non_finite_gradient():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([1.0, 1.0]), torch.tensor([float("nan"), 0.0])
    assert not gradient_norms([a, b]).isfinite().all()
    b.grad = torch.tensor([float("inf"), 0.0])
    assert not gradient_norms([a, b]).isfinite().all()
