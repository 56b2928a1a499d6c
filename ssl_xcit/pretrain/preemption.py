"""Signals that ask a run to stop: recorded by the handlers, acted on by the training loop.

A cluster signals every process of a job step at any moment: SLURM sends USR2 before a
time-out or a pre-emption and SIGTERM on ``scancel`` or its own requeue; a user sends
SIGTERM to a local run. Acting inside a signal handler (mid-step, mid-save) would lose
work, so the handlers here only record the signal; the
:class:`~ssl_xcit.pretrain.stop.StopController` reads the record at its next decision
point, every rank agrees, and the run stops at a point from which it restarts exactly,
with ``last.ckpt`` written for that step.

Data-loader workers ignore these signals (:func:`ignore_stop_signals`): the main process
decides when to stop, and a worker killed by SIGTERM would crash the epoch instead.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator, Optional, Sequence


class PreemptionFlag:
    """Signal handlers that only record which signals arrived; the training loop acts on them.

    SIGTERM (a pre-emption notice, or ``scancel``) asks for a checkpoint and a clean stop;
    ``requeue_signal`` (USR2, submitit's pre-emption/time-out signal) asks for a checkpoint
    and, under submitit, a requeue.
    """

    def __init__(self, requeue_signal: int = signal.SIGUSR2, stop_signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self.requeue_signal = requeue_signal
        self.signals = (requeue_signal, *stop_signals)
        self.received: list[int] = []
        self.replaced: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return bool(self.received)

    @property
    def requeue(self) -> bool:
        return self.requeue_signal in self.received

    def describe(self) -> str:
        """The signals received, e.g. 'SIGTERM' or 'SIGUSR2, SIGTERM'."""
        return ", ".join(signal.Signals(s).name for s in self.received) or "no signal"

    def install(self) -> None:
        """Put the recording handler in front; the first handlers replaced are kept (submitit's)."""
        for signum in self.signals:
            previous = signal.signal(signum, self._record)
            self.replaced.setdefault(signum, previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers found at the first :meth:`install`."""
        for signum, previous in self.replaced.items():
            signal.signal(signum, previous)

    @contextmanager
    def installed(self) -> Iterator["PreemptionFlag"]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum not in self.received:
            self.received.append(signum)


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the pretraining loader: stop signals are the main process's to act on.

    USR2 is ignored. SIGTERM is ignored when the cluster (or anyone else) sends it, but obeyed
    when it comes from the worker's parent: that is how Python's multiprocessing ends a
    worker that did not stop by itself, and ignoring it there would hang the parent's exit.
    Where the sender cannot be known (no ``sigwaitinfo``, e.g. macOS), SIGTERM keeps its default.
    (Setting a ``worker_init_fn`` also keeps Lightning from adding its worker seeding; the
    augmentation draws every random choice from per-sample seeds and does not need it.)
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started after inherit the mask
        threading.Thread(target=_obey_sigterm_from_parent, args=(os.getppid(),), daemon=True,
                         name="sigterm-from-parent").start()


def _obey_sigterm_from_parent(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(128 + signal.SIGTERM)
