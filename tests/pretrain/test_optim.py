import copy

import pytest
import torch

from ssl_xcit.backbones import MultiCropNet, build_backbone
from ssl_xcit.pretrain.head import DINOHead
from ssl_xcit.pretrain.optim import clip_gradients_per_tensor, ema_update, param_groups


@pytest.fixture(scope="module")
def net() -> MultiCropNet:
    backbone = build_backbone("xcit_nano_12_p16_224", depth=2)
    return MultiCropNet(backbone, DINOHead(backbone.num_features, 32, hidden_dim=16, bottleneck_dim=8))


def _names(net, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in net.named_parameters() if id(p) in ids}


def test_weight_decay_rule(net):
    decay, no_decay = param_groups(net)
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
    clip_gradients_per_tensor([a, b], max_norm=1.0)
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
