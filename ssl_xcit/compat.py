"""Every touch of a private API of submitit, Lightning or Pillow, in one place.

Each function here leans on something a library does not promise to keep. They are few,
named for what they give, and ``tests/test_compat.py`` fails loudly when an upgrade
moves any of them; pyproject.toml pins both libraries below their next minor release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import submitit


def submitit_requeue_signal() -> int:
    """The signal submitit's SLURM jobs receive before a time-out or on pre-emption (USR2 by default)."""
    return submitit.JobEnvironment._usr_sig()


def slurm_script(folder: Path, parameters: dict[str, Any]) -> str:
    """The sbatch script submitit would submit with these SlurmExecutor ``parameters``.

    Rendered without ``srun``/``sbatch`` (a dry run on a laptop): submitit's executor refuses
    to exist where ``srun`` is missing, so a subclass that never submits says it may.
    """
    from submitit.slurm.slurm import SlurmExecutor

    class RenderOnly(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    executor = RenderOnly(folder=folder)
    executor.update_parameters(**parameters)
    return executor._make_submission_file_text("python -u -m submitit.core._submit " + str(executor.folder), "UID")


def batches_done(trainer: pl.Trainer) -> int:
    """Batches of the current epoch the training loop has processed (its restart point)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def grad_scaler(trainer: pl.Trainer) -> Optional[Any]:
    """The fp16 GradScaler of the precision plugin, or None (fp32, bf16)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def pil_point_lut(img: Any, lut: list[int]) -> Any:
    """``img.point(lut)`` for a list of whole numbers (256 per band), through Pillow's core call:
    the public ``Image.point`` rounds each of the 768 entries in Python first, which costs more
    than the lookup on a small crop. Raises AttributeError when Pillow no longer has the call."""
    return img._new(img.im.point(lut, None))
