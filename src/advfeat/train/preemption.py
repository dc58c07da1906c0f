"""Cluster preemption: a signal asks a run to checkpoint at its next step and stop.

SLURM and other schedulers send ``SIGTERM`` (or a ``--signal``, ``SIGUSR1`` here) some time
before they kill a job. :class:`PreemptionWatch` catches these signals while a run trains and
says, at each step, whether one arrived — on every process of a distributed run alike, so that
all of them stop after the same step; the trainer then writes a checkpoint that ``--resume``
continues bit-identically and raises :class:`Preempted`.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType
from typing import Any

import torch

__all__ = ["PREEMPTED_EXIT", "PREEMPTION_SIGNALS", "Preempted", "PreemptionWatch"]


class Preempted(RuntimeError):
    """SIGTERM / SIGUSR1 arrived: a checkpoint was written (mid-epoch) and the run stopped;
    ``--resume`` continues it exactly. The command line exits with :data:`PREEMPTED_EXIT`."""


PREEMPTED_EXIT = 75
"""Exit status of a preempted run (``EX_TEMPFAIL``: try again, e.g. re-queue with --resume)."""

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
"""Signals that make the trainer checkpoint at the next step and stop (cluster preemption)."""


class PreemptionWatch:
    """Catches :data:`PREEMPTION_SIGNALS` inside ``with watch:`` (the handlers found there are
    restored on leaving; outside the main thread, where Python allows no handler, nothing is
    caught). ``distributed``: :meth:`requested` agrees across the processes of the run."""

    def __init__(self, device: torch.device, *, distributed: bool = False) -> None:
        self.device = device
        self.distributed = distributed
        self.signum: int | None = None
        """The signal that arrived, if any."""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPTION_SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def requested(self) -> bool:
        """Whether a signal arrived (in a distributed run: on any process, read by all)."""
        if not self.distributed:
            return self.signum is not None
        flag = torch.tensor([float(self.signum is not None)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def name(self, default: str = "a signal") -> str:
        """The arrived signal's name (``SIGTERM``), else ``default``."""
        return signal.Signals(self.signum).name if self.signum else default
