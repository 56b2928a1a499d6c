"""Evaluation's backbone loader, and the checkpoint reader under it, against the official layout.

Official checkpoints are built from ``tests/fixtures/official_dino_xcit_nano_12_p16_full_checkpoint.txt``,
the keys and shapes DINO's code saves for XCiT-nano/16 (written from the official XCiT and DINO
definitions, not from our mapping), filled with random values. Every official tensor must land
in our model unchanged, whole or split along its first dimension (the fused class-attention
``qkv``), and every tensor of our model must come from one: no key is dropped, none is left at
its initial value.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

from ssl_xcit.errors import UserError
from ssl_xcit.pretrain.config import PretrainConfig
from ssl_xcit.pretrain.init_weights import initialise
from ssl_xcit.pretrain.module import build_student
from ssl_xcit.weight_files import read_weight_file
from ssl_xcit.weights import export_backbone, load_backbone
from tests.helpers import official_layout, random_tensors

ARCH = "xcit_nano_12_p16_224"
BACKBONE, HEAD = "module.backbone.", "module.head."


def official_checkpoint() -> dict:
    """DINO's full checkpoint of the fixture's layout: two networks (their backbones differ,
    their heads are shared to save memory) and the loss's center."""
    layout = official_layout()
    nets = {k: s for k, s in layout.items() if k.startswith("module.")}
    teacher, student = random_tensors(nets, seed=0), random_tensors(nets, seed=1)
    student.update({k: v for k, v in teacher.items() if k.startswith(HEAD)})
    return {"teacher": teacher, "student": student, "epoch": 300, "args": None,
            "dino_loss": random_tensors({"center": layout["dino_loss.center"]}, seed=2)}


@pytest.fixture(scope="module")
def official():
    return official_checkpoint()


def backbone_only(network: dict) -> dict:
    """DINO's backbone-only release (``dino_xcit_*_pretrain.pth``): the teacher's backbone, no prefixes."""
    return {k[len(BACKBONE):]: v for k, v in network.items() if k.startswith(BACKBONE)}


def assert_lands_whole_or_split(official: dict, ours: dict) -> None:
    """Each official tensor equals one of ``ours``, or consecutive ones of ``ours`` cut along
    dim 0 in the order the model declares them (a fused qkv: q, k, v); every tensor of
    ``ours`` is used exactly once."""
    unused, order = dict(ours), {name: i for i, name in enumerate(ours)}
    for key, tensor in official.items():
        row, parts = 0, []
        while not parts or row < len(tensor):
            rest = tensor if tensor.dim() == 0 else tensor[row:]
            found = next((name for name, t in unused.items()
                          if t.dtype == tensor.dtype and t.shape[1:] == rest.shape[1:] and t.numel() <= rest.numel()
                          and torch.equal(t, rest if tensor.dim() == 0 else rest[:len(t)])), None)
            assert found is not None, f"official {key} (rows from {row}) is nowhere in the model"
            parts.append(found)
            row += 1 if tensor.dim() == 0 else len(unused.pop(found))
            if tensor.dim() == 0:
                unused.pop(found)
                break
        positions = [order[p] for p in parts]
        assert positions == sorted(positions), f"official {key} split out of order: {parts}"
    assert not unused, f"{len(unused)} tensors of the model come from no official key, e.g. {sorted(unused)[:3]}"


def test_official_full_checkpoint_fills_every_backbone_tensor(official, tmp_path):
    path = tmp_path / "dino_xcit_nano_12_p16_pretrain_full_checkpoint.pth"
    torch.save(official, path)
    for which in ("teacher", "student"):
        loaded = load_backbone(path, which, arch=ARCH)
        assert loaded.source.endswith(f":{which}") and not loaded.model.training
        backbone = {k: v for k, v in official[which].items() if k.startswith(BACKBONE)}
        assert_lands_whole_or_split(backbone, loaded.model.state_dict())


def test_official_backbone_only_checkpoint_fills_every_tensor(official, tmp_path):
    path = tmp_path / "dino_xcit_nano_12_p16_pretrain.pth"
    torch.save(backbone_only(official["teacher"]), path)
    assert_lands_whole_or_split(backbone_only(official["teacher"]), load_backbone(path, arch=ARCH).model.state_dict())


def test_model_init_takes_every_official_tensor_and_the_center(official, tmp_path):
    """DINO's defaults (out_dim 65536, MLP 2048 wide to a 256 bottleneck): backbone, head and center load."""
    path = tmp_path / "checkpoint.pth"
    torch.save(official, path)
    cfg = PretrainConfig()
    cfg.model.arch, cfg.model.norm_last_layer = ARCH, False
    student, teacher, center = build_student(cfg, 0.0), build_student(cfg, 0.0), torch.zeros(1, cfg.model.out_dim)
    line = initialise(student, teacher, center, read_weight_file(path, "teacher", "model.init"))
    assert line.endswith("backbone loaded; head loaded; center loaded"), line
    assert_lands_whole_or_split({**official["teacher"], "center": official["dino_loss"]["center"]},
                                {**teacher.state_dict(), "center": center})


@pytest.mark.parametrize("key", ["pos_embeder.token_projection.weight", "cls_attn_blocks.1.attn.qkv.bias",
                                 "blocks.11.local_mp.bn.running_var"])
def test_a_missing_or_renamed_official_key_is_refused(official, tmp_path, key):
    state = backbone_only(official["teacher"])
    path = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in state.items() if k != key}, path)
    with pytest.raises(UserError, match=r"--checkpoint: .*backbone.pth does not fit the backbone of "
                                        rf"{ARCH} \(missing keys: \[\w"):
        load_backbone(path, arch=ARCH)
    renamed = key.replace(".weight", ".kernel").replace(".bias", ".offset").replace(".running_var", ".variance")
    torch.save({(renamed if k == key else k): v for k, v in state.items()}, path)
    with pytest.raises(UserError, match=rf"unexpected keys: \[\S*{re.escape(renamed.split('.', 1)[1])}\]"):
        load_backbone(path, arch=ARCH)


def test_another_architecture_names_the_shapes(official, tmp_path):
    path = tmp_path / "nano.pth"
    torch.save(backbone_only(official["teacher"]), path)
    with pytest.raises(UserError,
                       match=r"wrong shapes \(checkpoint vs model\): \[cls_token \(1, 1, 128\) vs \(1, 1, 192\)"):
        load_backbone(path, arch="xcit_tiny_12_p16_224")


def test_official_checkpoint_without_arch_is_refused(official, tmp_path):
    path = tmp_path / "dino.pth"
    torch.save({"teacher": official["teacher"]}, path)
    with pytest.raises(UserError, match="dino.pth:teacher does not name its architecture; pass --arch"):
        load_backbone(path)
    with pytest.raises(UserError, match=r"has no 'student' weights \(--which\)"):
        load_backbone(path, "student", arch=ARCH)


def _teacher_backbone_state(ckpt_path):
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    return {k[len("teacher.backbone."):]: v for k, v in state.items() if k.startswith("teacher.backbone.")}


def test_ssl_xcit_checkpoint_gives_the_teacher(tiny_checkpoint):
    loaded = load_backbone(tiny_checkpoint)
    assert loaded.arch == "xcit_nano_12_p8_224" and not loaded.model.training
    want = _teacher_backbone_state(tiny_checkpoint)
    got = loaded.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert load_backbone(tiny_checkpoint, which="student").source.endswith(":student")
    with pytest.raises(UserError, match="--arch: xcit_nano_12_p16_224 given, but .* holds a xcit_nano_12_p8_224"):
        load_backbone(tiny_checkpoint, arch="xcit_nano_12_p16_224")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(UserError, match="nothing.ckpt does not exist"):
        load_backbone(tmp_path / "nothing.ckpt")


def test_exported_backbone_loads_in_plain_timm(official, tmp_path):
    path = tmp_path / "official.pth"
    torch.save(backbone_only(official["teacher"]), path)
    loaded = load_backbone(path, arch=ARCH)
    out = export_backbone(loaded, tmp_path / "backbone.safetensors")
    model = timm.create_model(ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
        assert torch.equal(load_backbone(out).model(x), model(x))
