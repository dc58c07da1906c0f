"""What a training step captured as one CUDA graph may not do, said by the code that does it.

A graph replays kernels only: a step may not read the device, nor call what capture refuses
(``torch.cuda.get_rng_state`` / ``set_rng_state``, for one), and a capture that fails half-way
can leave the process's CUDA random generator unusable. So code that knows it cannot be
captured says so with :func:`block_capture` whenever it runs; the eager warm-up steps before a
capture run inside :func:`noting_capture_blockers`, and a step that was blocked is never
captured (:mod:`advfeat.train.graphs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["block_capture", "noting_capture_blockers"]

_BLOCKERS: ContextVar[list[str] | None] = ContextVar("advfeat_capture_blockers", default=None)


@contextmanager
def noting_capture_blockers() -> Iterator[list[str]]:
    """Collect, in the list yielded, why the code run inside cannot be captured (in order,
    each reason once)."""
    found: list[str] = []
    token = _BLOCKERS.set(found)
    try:
        yield found
    finally:
        _BLOCKERS.reset(token)


def block_capture(reason: str) -> None:
    """Say that the running step cannot be captured, and why (a no-op outside
    :func:`noting_capture_blockers`)."""
    found = _BLOCKERS.get()
    if found is not None and reason not in found:
        found.append(reason)
