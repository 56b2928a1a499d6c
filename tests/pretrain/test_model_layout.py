"""model.channels_last and model.compile change how the step runs, never what it computes."""

import shutil
from pathlib import Path

import pytest
import torch

from ssl_xcit.pretrain.module import DINOModule
from ssl_xcit.pretrain.run import run_pretraining
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


@pytest.mark.slow  # compiling the student's two resolutions and the teacher takes ~90 s on 2 cores
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_channels_last_run_trains_like_the_default(tmp_path):
    """A whole short run (forward, backward, AdamW, EMA, checkpoint) with both options on ends
    with the same checkpoint keys and a teacher that computes, within float tolerance, what the
    default run's teacher computes. (Outputs, not raw parameters: AdamW turns the float noise in
    gradients that are zero in exact arithmetic, such as the key biases', into lr-sized steps.)"""
    outputs = {}
    for name, options in (("default", {}), ("both", {"model__compile": "true", "model__channels_last": "true"})):
        overrides = dict(model__drop_path_rate="0.0", optim__lr="0.5", optim__momentum_teacher="0.5")
        run_pretraining(tiny_config(tmp_path / name, **overrides, **options), tmp_path / name)
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        module = _module(tmp_path / "eval", **overrides)
        if name == "default":
            crops = _crops(module)[:2]
            with torch.no_grad():
                outputs["start"] = module.teacher(crops)
        assert state.keys() == module.state_dict().keys()
        module.load_state_dict(state)
        with torch.no_grad():
            outputs[name] = module.teacher(crops)
    assert (outputs["default"] - outputs["start"]).abs().max() > 0.1  # the run trained, far beyond the tolerance
    torch.testing.assert_close(outputs["both"], outputs["default"], rtol=1e-3, atol=1e-3)
