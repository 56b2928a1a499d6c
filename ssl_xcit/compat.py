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
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer


def submitit_requeue_signal() -> int:
    """The signal submitit's SLURM jobs receive before a time-out or on pre-emption (USR2 by default)."""
    return submitit.JobEnvironment._usr_sig()


def submitit_timed_out(handler: Any) -> bool:
    """Whether submitit's USR2 handler (the bound ``checkpoint_and_try_requeue`` our flag
    replaced) judges the job timed out rather than pre-empted: its own rule, which decides what
    it counts against ``max_num_timeout``. False when ``handler`` is not submitit's."""
    owner = getattr(handler, "__self__", None)
    return bool(owner is not None and hasattr(owner, "has_timed_out") and owner.has_timed_out())


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


def skip_optimizer_step_if(optimizer: Any, skip: torch.Tensor) -> None:
    """Make the coming ``optimizer.step()`` a no-op on the device when the 0-d bool ``skip`` is
    true, without reading it on the host: torch's fused optimizers (``_step_supports_amp_scaling``)
    read ``found_inf`` (and ``grad_scale``) off the optimizer, the protocol GradScaler uses, and
    skip the whole update (step counts included) when it is 1. Other optimizers are left alone:
    under fp16 the GradScaler skips a step with non-finite gradients itself."""
    optimizer = _unwrapped(optimizer)
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale = None
        optimizer.found_inf = skip.float()


def clear_optimizer_skip(optimizer: Any) -> None:
    """Remove what :func:`skip_optimizer_step_if` set, so the next step decides afresh."""
    optimizer = _unwrapped(optimizer)
    for name in ("grad_scale", "found_inf"):
        if name in vars(optimizer):
            delattr(optimizer, name)


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` (hooks get either)."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def pil_point_lut(img: Any, lut: list[int]) -> Any:
    """``img.point(lut)`` for a list of whole numbers (256 per band), through Pillow's core call:
    the public ``Image.point`` rounds each of the 768 entries in Python first, which costs more
    than the lookup on a small crop. Raises AttributeError when Pillow no longer has the call."""
    return img._new(img.im.point(lut, None))


def compiled_graph_count() -> int:
    """Graphs torch.compile has captured in this process so far (dynamo's private counters):
    the number that regional compilation keeps independent of depth."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def allow_compiled_variants(n: int) -> None:
    """Let torch.compile keep at least ``n`` compiled variants of one function before it runs
    that function eagerly (dynamo's recompile limit, 8 by default; one limit for the process)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), n))
