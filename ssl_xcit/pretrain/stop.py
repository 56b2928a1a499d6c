"""Every reason a run stops itself, decided for all ranks at once, at fixed points.

A reason is noted where it arises, on the rank that sees it, and nobody is told yet: a
signal (SIGTERM, or the cluster's USR2 before a time-out or a pre-emption), a non-finite
loss (read from the device), an unreadable image, too many unreadable images, a collapse
alarm, a failed checkpoint write. At the decision points, which every rank reaches at the
same step, one boolean reduction tells every rank whether any rank noted something; only
then are the reasons gathered and the earliest one chosen. So every rank stops at the
same step, names the same reason and the rank it came from, and writes the same
``last.ckpt`` or none. Between decision points nothing is exchanged and nothing is read
back from the device.

The decision points: the logging steps, the checkpoint steps, the last batch of each
epoch and of the run, the end of each epoch after its epoch-end work (the k-NN monitor),
and right after each checkpoint write.

Whether the state at the stop may be saved depends on the reason: a signal, a collapse
alarm or too many unreadable images (``data.on_bad_image: skip``) leave a sound state,
saved at the stop; a non-finite loss, an unreadable image (``fail``) or a failed write do
not, and the run stops with the previous ``last.ckpt`` as its restart point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch.distributed as dist

from ssl_xcit.compat import batches_done
from ssl_xcit.pretrain.preemption import PreemptionFlag

# kind -> (whether the state at the stop may be saved, rank among reasons noted at the same step)
KINDS: dict[str, tuple[bool, int]] = {
    "nonfinite_loss": (False, 0),
    "nonfinite_gradients": (False, 1),
    "bad_image": (False, 2),
    "write_failed": (False, 3),
    "too_many_bad_images": (True, 4),
    "collapse": (True, 5),
    "signal": (True, 6),
}


@dataclass(frozen=True)
class StopReason:
    """Why a run stops: what (``kind``, one of :data:`KINDS`), where (step and rank it was noted
    at) and the one line that says it."""

    kind: str
    step: int
    rank: int
    message: str

    @property
    def saves(self) -> bool:
        """Whether the state at the stop is sound enough to be saved as ``last.ckpt``."""
        return KINDS[self.kind][0]

    def order(self) -> tuple[int, int, int]:
        """Earliest first; at one step the reasons that forbid a save first; then the lowest rank."""
        return self.step, KINDS[self.kind][1], self.rank


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective); ``[obj]`` outside ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def is_decision_step(trainer: pl.Trainer, batch_idx: int, checkpoint_every_n_steps: int) -> bool:
    """Whether the step just finished (``trainer.global_step`` already counts it) is a decision
    point: a logging step, a checkpoint step, or the last batch of an epoch or of the run.
    The same on every rank, from the step count alone."""
    step = trainer.global_step
    return (
        step % trainer.log_every_n_steps == 0
        or (checkpoint_every_n_steps > 0 and step % checkpoint_every_n_steps == 0)
        or batch_idx + 1 == trainer.num_training_batches
        or step == trainer.max_steps
    )


class StopController(pl.Callback):
    """Notes stop reasons locally and decides them for all ranks at the decision points.

    Register it after the callbacks whose epoch-end work a stop must follow (the monitor)
    and before :class:`~ssl_xcit.pretrain.checkpointing.RunCheckpoints`, which asks
    :attr:`may_save` before writing and calls :meth:`decide` again after each write.

    The LightningModule may offer ``pending_stop() -> (kind, message, step) | None``, read at
    each decision point (where it may read the device: a host sync at the cadence only).

    Args:
        flag: the signal handlers' record (installed from ``on_train_start``, since Lightning
            installs a SIGTERM handler of its own when fitting starts); None: signals not watched.
        checkpoint_every_n_steps: ``run.checkpoint_every_n_steps``, whose steps are decision points.
    """

    def __init__(self, flag: Optional[PreemptionFlag] = None, checkpoint_every_n_steps: int = 0) -> None:
        self.flag = flag
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.noted: Optional[StopReason] = None
        self.decision: Optional[StopReason] = None

    @property
    def may_save(self) -> bool:
        """False once a stop has been decided whose state must not be saved."""
        return self.decision is None or self.decision.saves

    @property
    def stopped_by_signal(self) -> bool:
        return self.decision is not None and self.decision.kind == "signal"

    def note(self, trainer: pl.Trainer, kind: str, message: str, step: Optional[int] = None) -> None:
        """Record a reason on this rank (the first one noted is kept until it is decided)."""
        assert kind in KINDS, kind
        if self.noted is None:
            self.noted = StopReason(kind, trainer.global_step if step is None else step, trainer.global_rank, message)

    # -- hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.flag is not None:
            self.flag.install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if is_decision_step(trainer, batch_idx, self.checkpoint_every_n_steps):
            self.decide(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the epoch-end work of the callbacks registered before this one."""
        self.decide(trainer, pl_module)

    # -- the decision -------------------------------------------------------------------
    def decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[StopReason]:
        """One boolean reduction over the ranks; if any noted a reason, gather them all and
        stop every rank for the earliest. Every rank must call this at the same point."""
        if self.decision is not None:
            return self.decision
        self._look(trainer, pl_module)
        if not trainer.strategy.reduce_boolean_decision(self.noted is not None, all=False):
            return None
        reasons = [r for r in gather_objects(self.noted) if r is not None]
        self.decision = min(reasons, key=StopReason.order)
        trainer.should_stop = True
        return self.decision

    def _look(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note what the module and the signal handlers have seen since the last decision."""
        pending = getattr(pl_module, "pending_stop", None)
        found = pending() if callable(pending) else None
        if found is not None:
            kind, message, step = found
            self.note(trainer, kind, message, step)
        if self.flag is not None and self.flag.raised and not run_ends_here(trainer):
            self.note(trainer, "signal", f"stopped by {self.flag.describe()}")


def run_ends_here(trainer: pl.Trainer) -> bool:
    """Whether the step just finished is the run's last (max_steps, or the last batch of the last
    epoch): a signal there needs no stop, the run ends and its last checkpoint is written anyway."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
    return last_epoch and batches_done(trainer) >= trainer.num_training_batches
