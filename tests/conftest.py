"""Shared fixtures: small slices of the real CIFAR-10 JPEGs in ../shared/data, tiny configs."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from tests.helpers import slice_cifar, tiny_pretrain_args

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree ``train/`` (30 per class) and ``test/`` (10 per class) of real JPEGs."""
    return slice_cifar(tmp_path_factory.mktemp("cifar"), {"train": 30, "test": 10})


@pytest.fixture(scope="session")
def cifar_slice_archive(cifar_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same slice as a .tar.gz, laid out like the full archive."""
    archive = tmp_path_factory.mktemp("archive") / "cifar-slice.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_slice, arcname="CIFAR-10-images")
    return archive


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real last.ckpt of a few pretraining steps of the tiny model on synthetic images."""
    from ssl_xcit.pretrain.command import parse_pretrain_args
    from ssl_xcit.pretrain.run import run_pretraining

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    args = tiny_pretrain_args("synthetic", run_dir, data__synthetic_size="16", data__synthetic_resolution="40",
                              trainer__max_epochs="1")
    return run_pretraining(parse_pretrain_args(args)[0], run_dir)
