import pytest
import torch

from ssl_xcit.backbones import MultiCropNet, build_backbone, compile_blocks, patch_size
from ssl_xcit.compat import compiled_graph_count
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


def _train_both_sizes(model, sizes=(32, 16)):
    """Forward and backward at each crop size (B=4: XCiT's BatchNorm wants batches of 2+);
    the outputs and the gradients of the inputs and of every parameter."""
    results = []
    for size in sizes:
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(size), requires_grad=True)
        out = model(x)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()  # a loss that weighs each feature
        results.append((out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    return results


@pytest.mark.parametrize("depth", [1, 3])
def test_compiled_blocks_share_one_graph_per_block_class_and_crop_size(depth):
    """Dynamo's own count: 2 block classes × 2 crop sizes = 4 graphs at any depth (backend
    'eager': dynamo's capture without the code generation, which is what is shared)."""
    torch.compiler.reset()
    before = compiled_graph_count()
    _train_both_sizes(compile_blocks(build_backbone("xcit_nano_12_p8_224", depth=depth), backend="eager"))
    assert compiled_graph_count() - before == 4


def test_compiled_blocks_keep_every_variant_a_run_needs():
    """A run's variants under bf16 autocast: XCA blocks 2 dtypes (the first block's bf16 input,
    the others' float32) × (student at 2 sizes + teacher + 2 eval batches) = 10, class
    attention 5; dynamo's default limit of 8 would run the XCA blocks' tenth eagerly."""
    torch.compiler.reset()
    before = compiled_graph_count()
    student = compile_blocks(build_backbone("xcit_nano_12_p8_224", depth=2), backend="eager")
    teacher = compile_blocks(build_backbone("xcit_nano_12_p8_224", depth=2), backend="eager").requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for size in (32, 16):
            student(torch.randn(4, 3, size, size)).float().sum().backward()
        teacher(torch.randn(4, 3, 32, 32))
        with torch.no_grad():
            for batch in (4, 3):
                teacher.eval()(torch.randn(batch, 3, 32, 32))
    assert compiled_graph_count() - before == 15


@pytest.mark.slow
def test_compiled_blocks_give_eager_outputs_and_gradients_with_the_same_names():
    """Inductor's per-block code against the eager model with the same weights, at two crop
    sizes, forward and backward: equal within float32 reassociation (rtol 1e-4, atol 1e-5)."""
    torch.manual_seed(0)
    eager = build_backbone("xcit_nano_12_p8_224", depth=2)
    compiled = build_backbone("xcit_nano_12_p8_224", depth=2)
    compiled.load_state_dict(eager.state_dict())
    torch.compiler.reset()
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    for (out, x_grad, grads), (ref, ref_x_grad, ref_grads) in zip(_train_both_sizes(compiled), _train_both_sizes(eager)):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
