"""Helpers shared by the tests: the repository's paths, real-image slices, tiny run arguments."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def slice_cifar(dest: Path, per_class: dict[str, int]) -> Path:
    """Extract the first N images per class of each split into ``dest/CIFAR-10-images``."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real images not found at {CIFAR_ARCHIVE}")
    taken: Counter = Counter()
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        for member in tar:
            parts = Path(member.name).parts  # CIFAR-10-images/<split>/<class>/<file>.jpg
            if not member.isfile() or len(parts) != 4 or parts[1] not in per_class:
                continue
            key = (parts[1], parts[2])
            if taken[key] < per_class[parts[1]]:
                tar.extract(member, dest, filter="data")
                taken[key] += 1
    return dest / "CIFAR-10-images"


def tiny_pretrain_args(data_path: str, run_dir: Path, **overrides: str) -> list[str]:
    """CLI arguments of a pretraining run that takes seconds on a CPU (2-block nano XCiT, p8, 32/16 px crops)."""
    args = {
        "model.arch": "xcit_nano_12_p8_224",
        "model.backbone_kwargs": "{depth: 2}",
        "model.out_dim": "256",
        "model.head_hidden_dim": "128",
        "model.head_bottleneck_dim": "64",
        "data.path": data_path,
        "data.batch_size_per_device": "8",
        "data.num_workers": "0",
        "data.cache_dir": str(run_dir.parent / "cache"),
        "augment.global_crops_size": "32",
        "augment.local_crops_size": "16",
        "augment.local_crops_number": "2",
        "augment.global_crops_scale": "[0.5, 1.0]",
        "augment.local_crops_scale": "[0.2, 0.5]",
        "trainer.max_epochs": "2",
        "trainer.log_every_n_steps": "2",
        "trainer.enable_progress_bar": "false",
        "optim.warmup_epochs": "1",
        "run.dir": str(run_dir),
    }
    args.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [token for key, value in args.items() for token in (f"--{key}", value)]


OFFICIAL_XCIT_NANO = REPO / "tests" / "fixtures" / "official_dino_xcit_nano_12_p16_full_checkpoint.txt"


def official_layout(fixture: Path = OFFICIAL_XCIT_NANO) -> dict[str, tuple[int, ...]]:
    """KEY -> shape of an official DINO checkpoint, as the fixture file lists them."""
    lines = [line.split() for line in fixture.read_text().splitlines() if line and not line.startswith("#")]
    return {key: () if shape == "-" else tuple(int(d) for d in shape.split(",")) for key, shape in lines}


def random_tensors(layout: dict[str, tuple[int, ...]], seed: int) -> dict:
    """Random values under ``layout``'s keys and shapes, all distinct (BatchNorm step counts as
    int64, running variances positive)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    values = {key: torch.randint(1, 2**40, (), generator=generator) if key.endswith("num_batches_tracked")
              else torch.randn(shape, generator=generator) for key, shape in layout.items()}
    return {key: value.abs() if key.endswith("running_var") else value for key, value in values.items()}


def assert_same_checkpoint(a: dict, b: dict, step: int) -> None:
    """Two ``last.ckpt`` dicts of runs that must be identical: both at ``step``, every weight and
    every optimizer state tensor equal bit for bit."""
    import torch

    assert a["global_step"] == b["global_step"] == step, (a["global_step"], b["global_step"], step)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} of {len(a['state_dict'])} tensors differ, e.g. {different[:3]}"
    moments_a, moments_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert moments_a.keys() == moments_b.keys()
    different = [i for i in moments_a if not all(torch.equal(moments_a[i][k], moments_b[i][k]) for k in moments_a[i])]
    assert not different, f"optimizer state of {len(different)} of {len(moments_a)} parameters differs"


def slice_image_mask_pairs(archive: Path, dest: Path, count: int) -> Path:
    """The first ``count`` stems (by name) of an ``images/`` + ``masks/`` archive of ../shared/data
    (CamVid, Weizmann Horse), their masks and ``classes.txt``, extracted into ``dest``; returns
    the dataset's folder (``dest/<archive's top folder>``)."""
    if not archive.is_file():
        pytest.skip(f"real images not found at {archive}")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        images = sorted(m.name for m in members if m.isfile() and Path(m.name).parent.name == "images")[:count]
        stems = {Path(name).stem for name in images}
        wanted = [m for m in members if m.isfile() and (Path(m.name).name == "classes.txt" or (
            Path(m.name).parent.name in ("images", "masks") and Path(m.name).stem in stems))]
        tar.extractall(dest, members=wanted, filter="data")
    return dest / Path(images[0]).parts[0]
