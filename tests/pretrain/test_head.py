import torch

from ssl_xcit.pretrain.head import DINOHead


def test_output_shape_and_layers():
    head = DINOHead(in_dim=32, out_dim=100, nlayers=3, hidden_dim=64, bottleneck_dim=16)
    assert head(torch.randn(5, 32)).shape == (5, 100)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(32, 64), (64, 64), (64, 16)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert head.last_layer.bias is None


def test_batchnorm_option():
    head = DINOHead(in_dim=8, out_dim=10, nlayers=3, hidden_dim=16, bottleneck_dim=4, use_bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == 2


def test_norm_last_layer_freezes_unit_magnitude():
    head = DINOHead(in_dim=8, out_dim=10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    head(torch.randn(3, 8)).sum().backward()
    assert g.grad is None


def test_logits_are_cosines_with_unit_prototypes():
    head = DINOHead(in_dim=8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(3, 8)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.parametrizations.weight.original1
    want = z @ torch.nn.functional.normalize(w, dim=1).T
    assert torch.allclose(head(x), want, atol=1e-6)
    assert head(x).abs().max() <= 1 + 1e-6


def test_free_last_layer_magnitude_is_trainable():
    head = DINOHead(in_dim=8, out_dim=10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    g = head.last_layer.parametrizations.weight.original0
    head(torch.randn(3, 8)).sum().backward()
    assert g.requires_grad and g.grad is not None
