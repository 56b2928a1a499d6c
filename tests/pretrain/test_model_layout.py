"""model.channels_last and model.compile change how the step runs, never what it computes."""

import shutil
from pathlib import Path

import pytest
import torch

from ssl_xcit.pretrain.module import DINOModule
from tests.pretrain.test_module import tiny_config


def _module(run_dir: Path, **overrides: str) -> DINOModule:
    torch.manual_seed(0)
    return DINOModule(tiny_config(run_dir, **overrides))


def _crops(module: DINOModule) -> list[torch.Tensor]:
    g, n_local = module.cfg.augment.global_crops_size, module.cfg.augment.local_crops_number
    generator = torch.Generator().manual_seed(1)
    sizes = [g, g] + [module.cfg.augment.local_crops_size] * n_local
    return [torch.randn(4, 3, s, s, generator=generator) for s in sizes]


def test_channels_last_same_logits_same_checkpoint_keys(tmp_path):
    plain, last = _module(tmp_path), _module(tmp_path, model__channels_last="true")
    convs = [m.weight for m in last.student.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not convs[0].is_contiguous()  # the stem's 3x3 convolution: a layout change, not a no-op
    assert plain.state_dict().keys() == last.state_dict().keys()
    crops = _crops(plain)
    batch = last.on_after_batch_transfer({"crops": crops, "bad": [""] * 4}, 0)
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in batch["crops"])
    with torch.no_grad():
        torch.testing.assert_close(last.teacher(batch["crops"]), plain.teacher(crops), rtol=1e-4, atol=1e-5)  # no drop-path


@pytest.mark.slow  # compiling takes 30-80 s on 2 cores
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_backbone_same_logits_same_checkpoint_keys(tmp_path):
    plain, compiled = _module(tmp_path), _module(tmp_path, model__compile="true")
    assert plain.state_dict().keys() == compiled.state_dict().keys()
    crops = _crops(plain)
    with torch.no_grad():
        torch.testing.assert_close(compiled.teacher(crops[:2]), plain.teacher(crops[:2]), rtol=1e-4, atol=1e-5)
