import pytest
import torch

from ssl_xcit.backbones import MultiCropNet, build_backbone, patch_size
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.head import DINOHead


class CountingBackbone(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batch_shapes = inner, []

    def forward(self, x):
        self.batch_shapes.append(tuple(x.shape))
        return self.inner(x)


def test_one_backbone_forward_per_resolution_then_one_head():
    inner = build_backbone("xcit_nano_12_p8_224", depth=1).eval()
    backbone = CountingBackbone(inner)
    head = DINOHead(inner.num_features, 32, hidden_dim=16, bottleneck_dim=8).eval()
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        out = MultiCropNet(backbone, head)(crops)
        separately = torch.cat([head(inner(c)) for c in crops])
    assert backbone.batch_shapes == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert out.shape == (10, 32) and torch.allclose(out, separately, atol=1e-5)


def test_backbone_is_the_cls_embedding_without_classifier():
    model = build_backbone("xcit_nano_12_p16_224", drop_path_rate=0.1, depth=2)
    assert model.num_classes == 0 and len(model.blocks) == 2 and patch_size(model) == 16
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, model.num_features)


def test_unknown_override_is_named():
    with pytest.raises(UserError, match="model.backbone_kwargs"):
        build_backbone("xcit_nano_12_p16_224", not_a_kwarg=3)
