"""model.init: checkpoints in the official DINO layout (built here from small random models),
timm weight files and ssl-xcit checkpoints give the student and teacher the source's function."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ssl_xcit.backbones import build_backbone
from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.pretrain.head import DINOHead
from ssl_xcit.pretrain.init_weights import initialise
from ssl_xcit.pretrain.module import build_student
from ssl_xcit.weight_files import dino_head_state, read_weight_file

ARCH, EMBED = "xcit_nano_12_p16_224", 128


def read_init_checkpoint(path, which="teacher"):
    """What ``--model.init path`` (with ``model.init_which``) reads."""
    return read_weight_file(path, which, "model.init")


class OldDINOHead(nn.Module):
    """DINO's head as the original code builds it: MLP (a bare Linear for one layer), L2,
    and a last layer under the old ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v``)."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden=32, bottleneck=16):
        super().__init__()
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck)
        else:
            dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
            layers = []
            for i in range(nlayers):
                layers.append(nn.Linear(dims[i], dims[i + 1]))
                if i < nlayers - 1:
                    layers.append(nn.GELU())
            self.mlp = nn.Sequential(*layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated form is the point here
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.weight_g.uniform_(0.5, 2.0)  # learned magnitudes (norm_last_layer false)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def official_backbone(state: dict, prefix: str) -> dict:
    """A timm XCiT state dict as the original XCiT/DINO code names it."""
    out = {}
    for key, value in state.items():
        if ".attn.k." in key or ".attn.v." in key:
            continue
        if key.startswith("cls_attn_blocks.") and ".attn.q." in key:
            block, kind = key.split(".attn.q.")
            value = torch.cat([state[f"{block}.attn.{x}.{kind}"] for x in "qkv"])
            key = f"{block}.attn.qkv.{kind}"
        out[prefix + key.replace("pos_embed.", "pos_embeder.")] = value
    return out


def official_full_checkpoint(path, teacher, student, center=None):
    """DINO's ``checkpoint.pth``: both networks under ``module.`` (XCiT has BatchNorm, so
    DINO wraps the teacher in DDP too), optimizer and args beside them."""
    ckpt = {"epoch": 300, "optimizer": {}, "args": None}
    for name, (backbone, head) in (("teacher", teacher), ("student", student)):
        net = official_backbone(backbone.state_dict(), "module.backbone.")
        net.update({f"module.head.{k}": v for k, v in head.state_dict().items()})
        ckpt[name] = net
    if center is not None:
        ckpt["dino_loss"] = {"center": center}
    torch.save(ckpt, path)
    return path


def config(**model) -> PretrainConfig:
    cfg = PretrainConfig()
    m = dict(arch=ARCH, backbone_kwargs={"depth": 2}, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
             norm_last_layer=False)
    m.update(model)
    for key, value in m.items():
        setattr(cfg.model, key, value)
    return cfg


def target(cfg):
    """A fresh student, teacher and center, as DINOModule holds them."""
    torch.manual_seed(123)
    return build_student(cfg, 0.0), build_student(cfg, 0.0), torch.zeros(1, cfg.model.out_dim)


@pytest.fixture()
def source():
    torch.manual_seed(0)
    teacher = (build_backbone(ARCH, depth=2).eval(), OldDINOHead(EMBED, 64).eval())
    student = (build_backbone(ARCH, depth=2).eval(), OldDINOHead(EMBED, 64).eval())
    return teacher, student, torch.randn(1, 64)


def test_old_weight_norm_maps_to_ours():
    head = OldDINOHead(8, 10, nlayers=1, hidden=0, bottleneck=4)
    mapped = dino_head_state(head.state_dict())
    ours = DINOHead(8, 10, nlayers=1, bottleneck_dim=4, norm_last_layer=False)
    ours.load_state_dict(mapped)  # strict: one-layer mlp.* → mlp.0.*, weight_g/_v → the parametrization
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(ours(x), head(x), atol=1e-6)
        w = head.last_layer.weight  # recomputed by head's forward from g and v
        ours.load_state_dict(dino_head_state({**head.mlp.state_dict(prefix="mlp."), "last_layer.weight": w}))
        assert torch.allclose(ours(x), head(x), atol=1e-6)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_official_full_checkpoint_gives_backbone_head_and_center(tmp_path, source, which):
    teacher, student, center = source
    path = official_full_checkpoint(tmp_path / "checkpoint.pth", teacher, student, center)
    cfg = config()
    s, t, c = target(cfg)
    line = initialise(s, t, c, read_init_checkpoint(path, which))
    assert line.endswith("backbone loaded; head loaded; center loaded") and f"checkpoint.pth:{which}" in line
    backbone, head = teacher if which == "teacher" else student
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = backbone(x)
        for net in (t.eval(), s.eval()):
            assert torch.allclose(net.backbone(x), features, atol=1e-5)
            assert torch.allclose(net.head(features), head(features), atol=1e-5)
        # the old weight norm written out: w = g v / ||v|| per row, on the L2-normalised bottleneck
        w = head.last_layer.weight_g * head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
        assert torch.allclose(t.head(features), F.normalize(head.mlp(features), dim=-1) @ w.T, atol=1e-5)
    assert torch.equal(c, center)


def test_norm_last_layer_keeps_loaded_magnitudes_and_says_so(tmp_path, source):
    path = official_full_checkpoint(tmp_path / "checkpoint.pth", *source[:2])  # no center
    s, t, c = target(config(norm_last_layer=True))
    line = initialise(s, t, c, read_init_checkpoint(path), norm_last_layer=True)
    g = s.head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, source[0][1].last_layer.weight_g)
    assert "no center in the checkpoint" in line and "prototype norms stay frozen" in line


def test_other_out_dim_reinitialises_only_the_last_layer(tmp_path, source):
    path = official_full_checkpoint(tmp_path / "checkpoint.pth", *source)
    s, t, c = target(config(out_dim=48))
    fresh_last = s.head.last_layer.state_dict()
    line = initialise(s, t, c, read_init_checkpoint(path))
    assert "last layer re-initialised, MLP loaded (checkpoint head: out_dim 64, bottleneck 16" in line
    assert "config: out_dim 48, bottleneck 16" in line and "center of shape (1, 64) not used" in line
    src_head = source[0][1]
    for net in (s, t):
        assert all(torch.equal(v, src_head.mlp.state_dict()[k]) for k, v in net.head.mlp.state_dict().items())
        assert all(torch.equal(v, fresh_last[k]) for k, v in net.head.last_layer.state_dict().items())
    assert torch.all(c == 0)


def test_other_bottleneck_reinitialises_the_head(tmp_path, source):
    path = official_full_checkpoint(tmp_path / "checkpoint.pth", *source)
    s, t, c = target(config(head_bottleneck_dim=8))
    fresh = {k: v.clone() for k, v in s.head.state_dict().items()}
    line = initialise(s, t, c, read_init_checkpoint(path))
    assert "head re-initialised (checkpoint head: out_dim 64, bottleneck 16, MLP 128→32→32→16; " \
           "config: out_dim 64, bottleneck 8, MLP 128→32→32→8)" in line
    assert all(torch.equal(v, fresh[k]) for k, v in t.head.state_dict().items())


def test_wrong_architecture_names_the_keys(tmp_path, source):
    path = official_full_checkpoint(tmp_path / "deeper.pth", *source)
    s, t, c = target(config(backbone_kwargs={"depth": 1}))
    with pytest.raises(UserError, match=r"deeper.pth:teacher does not fit the backbone of model.arch \(missing keys: "
                                        r"none; unexpected keys: \[blocks.1.gamma1"):
        initialise(s, t, c, read_init_checkpoint(path))
    s, t, c = target(config(arch="xcit_tiny_12_p16_224"))
    with pytest.raises(UserError, match=r"wrong shapes \(checkpoint vs model\): \[cls_token \(1, 1, 128\) vs "
                                        r"\(1, 1, 192\)"):
        initialise(s, t, c, read_init_checkpoint(path))


def test_missing_network_and_file_are_named(tmp_path, source):
    path = tmp_path / "teacher_only.pth"
    torch.save({"teacher": official_backbone(source[0][0].state_dict(), "backbone.")}, path)
    with pytest.raises(UserError, match=r"has no 'student' weights \(model.init_which\)"):
        read_init_checkpoint(path, "student")
    with pytest.raises(UserError, match="model.init: .*nothing.pth does not exist"):
        read_init_checkpoint(tmp_path / "nothing.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_file_sets_the_classifier_aside(tmp_path, suffix):
    torch.manual_seed(1)
    model = timm.create_model(ARCH, pretrained=False, num_classes=10, depth=2).eval()
    path = tmp_path / f"timm{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    s, t, c = target(config())
    line = initialise(s, t, c, read_init_checkpoint(path))
    assert "backbone loaded; no DINO head in the checkpoint: head randomly initialised" in line
    assert "not used: [head.bias, head.weight]" in line
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(t.eval().backbone(x), model.forward_head(model.forward_features(x), pre_logits=True),
                              atol=1e-5)


def test_ssl_xcit_checkpoint_carries_backbone_head_and_center(tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=False)
    cfg = PretrainConfig()
    for key, value in ckpt["hyper_parameters"]["config"]["model"].items():
        setattr(cfg.model, key, value)
    s, t, c = target(cfg)
    line = initialise(s, t, c, read_init_checkpoint(tiny_checkpoint, "student"))
    assert line.endswith("backbone loaded; head loaded; center loaded")
    want = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    assert want.keys() == t.state_dict().keys()
    assert all(torch.equal(v, want[k]) for k, v in t.state_dict().items())
    assert torch.equal(c, ckpt["state_dict"]["loss_fn.center"])
