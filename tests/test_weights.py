import pytest
import timm
import torch

from ssl_xcit.backbones import build_backbone
from ssl_xcit.weights import export_backbone, load_backbone
from ssl_xcit.errors import UserError


def _teacher_backbone_state(ckpt_path):
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    return {k[len("teacher.backbone."):]: v for k, v in state.items() if k.startswith("teacher.backbone.")}


def test_ssl_xcit_checkpoint_gives_the_teacher(tiny_checkpoint):
    loaded = load_backbone(tiny_checkpoint)
    assert loaded.arch == "xcit_nano_12_p8_224" and not loaded.model.training
    want = _teacher_backbone_state(tiny_checkpoint)
    got = loaded.model.state_dict()
    assert want.keys() == {k for k in got if not k.startswith("head.")}
    assert all(torch.equal(got[k], want[k]) for k in want)
    student = load_backbone(tiny_checkpoint, which="student")
    assert student.source.endswith(":student")


def official_layout(state: dict, prefix: str = "module.backbone.") -> dict:
    """A timm XCiT state dict rewritten the way the original DINO/XCiT code saves it."""
    out = {}
    for key, value in state.items():
        out[prefix + key.replace("pos_embed.", "pos_embeder.")] = value
    blocks = {k.split(".attn.")[0] for k in state if k.startswith("cls_attn_blocks.") and ".attn.q." in k}
    for block in blocks:
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{prefix}{block}.attn.{x}.{kind}") for x in "qkv"]
            out[f"{prefix}{block}.attn.qkv.{kind}"] = torch.cat(parts)
    out["module.head.mlp.0.weight"] = torch.zeros(2, 2)  # DINO head weights are dropped
    return out


def test_official_dino_checkpoint_is_mapped(tmp_path):
    reference = build_backbone("xcit_nano_12_p16_224").eval()
    path = tmp_path / "dino_xcit.pth"
    torch.save({"teacher": official_layout(reference.state_dict()), "epoch": 300}, path)
    loaded = load_backbone(path, arch="xcit_nano_12_p16_224")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.model(x), reference(x), atol=1e-6)


def test_official_checkpoint_without_arch_is_refused(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {}}, path)
    with pytest.raises(UserError, match="pass --arch"):
        load_backbone(path)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = tmp_path / "wrong.pth"
    state = build_backbone("xcit_nano_12_p16_224", depth=3).state_dict()
    torch.save({"teacher": official_layout(state)}, path)
    with pytest.raises(UserError, match=r"wrong.pth: does not fit the backbone \(missing keys: \['blocks.3"):
        load_backbone(path, arch="xcit_nano_12_p16_224")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(UserError, match="nothing.ckpt does not exist"):
        load_backbone(tmp_path / "nothing.ckpt")


def test_exported_backbone_loads_in_plain_timm(tmp_path):
    reference = build_backbone("xcit_nano_12_p16_224")
    path = tmp_path / "official.pth"
    torch.save({"teacher": official_layout(reference.state_dict())}, path)
    out = export_backbone(load_backbone(path, arch="xcit_nano_12_p16_224"), tmp_path / "backbone.safetensors")
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), reference.eval()(x), atol=1e-6)
    assert torch.allclose(load_backbone(out).model(x), model(x), atol=1e-6)
