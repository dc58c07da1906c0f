"""What a training epoch keeps on the device: the running sums of its step metrics and the watch
for non-finite losses and weights.

Updating either queues a few small device operations and never waits for the device (no host
synchronisation in a training step); reading copies all of it to the host at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Divergence", "DivergenceWatch", "RunningSums", "weight_norm"]


class RunningSums:
    """Sums over an epoch's steps (the loss and the method's logs times the batch's images, the
    running metrics' hits), kept as float64 tensors on ``device``; ``start`` continues a resumed
    epoch's sums."""

    def __init__(self, device: torch.device, start: Mapping[str, float] | None = None) -> None:
        self.device = device
        self.totals: dict[str, Tensor] = {}
        self.add(start or {})

    def reset(self, start: Mapping[str, float] | None = None) -> None:
        """Start a new epoch's sums (at ``start`` when resuming one), in place: the tensors stay
        the ones a captured step (:mod:`advfeat.train.graphs`) adds to."""
        for total in self.totals.values():
            total.zero_()
        self.add(start or {})

    def add(self, values: Mapping[str, Tensor | float], weight: int = 1) -> None:
        """Add ``weight * value`` to the sum of each key (a new key starts at 0); tensor values
        are one-element tensors, on the device or the CPU."""
        for key, value in values.items():
            total = self.totals.get(key)
            if total is None:
                total = self.totals[key] = torch.zeros((), dtype=torch.float64, device=self.device)
            if isinstance(value, Tensor):
                total.add_(value.detach().reshape(()), alpha=weight)
            else:
                total.add_(float(value) * weight)

    def read(self) -> dict[str, float]:
        """Every sum as a float, in the order the keys were first added (one copy to the host)."""
        if not self.totals:
            return {}
        values = torch.stack(list(self.totals.values())).tolist()
        return dict(zip(self.totals, values, strict=True))


@dataclass(frozen=True)
class Divergence:
    """The first non-finite value of an epoch: ``what`` (``"loss"`` or ``"weights"``, the
    weights' float32 L2 norm), the 0-based ``step`` and the ``value`` there."""

    what: str
    step: int
    value: float


class DivergenceWatch:
    """Records on ``device`` the first step of an epoch at which the loss, or the norm of the
    weights after the update, was NaN or infinite; :meth:`first` reports it."""

    WATCHED = ("loss", "weights")

    def __init__(self, device: torch.device) -> None:
        self.steps = torch.full((len(self.WATCHED),), -1, dtype=torch.int64, device=device)
        """The first non-finite step of each watched value, -1 while it has stayed finite."""
        self.values = torch.zeros(len(self.WATCHED), dtype=torch.float32, device=device)

    def reset(self) -> None:
        """Forget what was seen (a new epoch), in place like :meth:`observe`."""
        self.steps.fill_(-1)
        self.values.zero_()

    def observe(self, step: int | Tensor, loss: Tensor, weight_norm: Tensor) -> None:
        """Note step ``step``'s loss and weight norm (one-element tensors; the step a number or
        a one-element integer tensor on the device). The record is updated in place, so that a
        captured step keeps writing to the tensors :meth:`first` reads."""
        values = torch.stack([loss.detach().float().reshape(()), weight_norm.float().reshape(())])
        first = ~torch.isfinite(values) & (self.steps < 0)
        self.steps.copy_(torch.where(first, step, self.steps))
        self.values.copy_(torch.where(first, values, self.values))

    def first(self) -> Divergence | None:
        """The earliest non-finite value (the loss before the weights of the same step), or
        ``None`` while everything stayed finite (one copy to the host)."""
        record = torch.cat([self.steps.double(), self.values.double()]).tolist()
        steps, values = record[: len(self.WATCHED)], record[len(self.WATCHED) :]
        seen = [(int(step), i) for i, step in enumerate(steps) if step >= 0]
        if not seen:
            return None
        step, i = min(seen)
        return Divergence(self.WATCHED[i], step, values[i])


def weight_norm(model: nn.Module, device: torch.device) -> Tensor:
    """The L2 norm of all of ``model``'s parameters in float32, on the device: ``inf`` / ``nan``
    once any weight is non-finite or so large that its square overflows (what
    :class:`DivergenceWatch` watches after each update)."""
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    if not params:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm([p.float() for p in params])
    return torch.linalg.vector_norm(torch.stack(norms))
