"""Every bundled recipe parses against the typed config and states only deltas that matter."""

from pathlib import Path

import pytest

from tests.helpers import REPO
import yaml

from ssl_xcit.pretrain.command import parse_pretrain_args

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_the_bundled_recipes_exist():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "cifar10_xcit_tiny", "imagenette_xcit_small", "imagenet_xcit_small_12_p16",
            "imagenet_xcit_medium_24_p8"} <= names


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.stem)
def test_recipe_parses_and_crops_fit_the_patch(recipe):
    cfg = parse_pretrain_args(["--config", str(recipe)])[0]
    patch = 8 if "_p8_" in cfg.model.arch else 16
    assert cfg.augment.global_crops_size % patch == 0 and cfg.augment.local_crops_size % patch == 0
    raw = yaml.safe_load(recipe.read_text())
    assert set(raw) <= {"model", "data", "augment", "dino", "optim", "trainer", "run", "monitor"}


@pytest.mark.parametrize("name,arch,drop_path", [("imagenet_xcit_small_12_p16", "xcit_small_12_p16_224", 0.05),
                                                 ("imagenet_xcit_medium_24_p8", "xcit_medium_24_p8_224", 0.15)])
def test_published_recipes(name, arch, drop_path):
    cfg = parse_pretrain_args(["--config", str(Path(CONFIGS[0].parent, f"{name}.yaml"))])[0]
    assert (cfg.model.arch, cfg.model.drop_path_rate, cfg.model.norm_last_layer) == (arch, drop_path, False)
    assert (cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp, cfg.dino.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (cfg.optim.lr, cfg.trainer.max_epochs) == (0.0005, 300)


def test_continuation_recipe_keeps_the_pretrained_teacher():
    cfg = parse_pretrain_args(["--config", str(REPO / "configs" / "continue_dino_xcit_small.yaml")])[0]
    assert (cfg.model.arch, cfg.model.out_dim, cfg.model.init_which) == ("xcit_small_12_p16_224", 65536, "teacher")
    assert cfg.model.init and not cfg.model.norm_last_layer and cfg.optim.freeze_last_layer == 0
    assert cfg.optim.lr < 0.0005 and cfg.optim.warmup_epochs > 0 and cfg.optim.momentum_teacher >= 0.999
    assert cfg.dino.warmup_teacher_temp == cfg.dino.teacher_temp and cfg.dino.warmup_teacher_temp_epochs == 0
    assert cfg.monitor.at_start is True
