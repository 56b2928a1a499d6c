"""Fixtures of the dense evaluations: a few real CamVid scenes and Weizmann horses with their masks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO, slice_image_mask_pairs

DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def camvid_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 CamVid scenes (480x360) and masks, split 6 / 3 / 3 by lists in ``splits/``."""
    root = slice_image_mask_pairs(DATA / "camvid.tar.gz", tmp_path_factory.mktemp("camvid"), 12)
    stems = sorted(p.stem for p in (root / "images").iterdir())
    (root / "splits").mkdir()
    for name, part in (("train", stems[:6]), ("val", stems[6:9]), ("test", stems[9:])):
        (root / "splits" / f"{name}.txt").write_text("\n".join(part) + "\n")
    return root


@pytest.fixture(scope="session")
def horse_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 Weizmann horses (sizes differ) and their binary masks."""
    return slice_image_mask_pairs(DATA / "weizmann_horse.tar.gz", tmp_path_factory.mktemp("horse"), 4)
