"""Keep batch-norm running statistics exactly as they are while a network is run.

Used by every attack (an attack step must never move BN statistics, unlike the public
reference code of the five papers, which attacks in train mode and so updates them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["batchnorm_modules", "frozen_bn_statistics"]


def batchnorm_modules(model: nn.Module) -> list[_NormBase]:
    """Every batch-norm-like module of ``model`` (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses)."""
    return [m for m in model.modules() if isinstance(m, _NormBase)]


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without updating any BN running statistic.

    In train mode the BN layers still normalise with batch statistics; in eval mode they use
    their running statistics. Nothing is copied: ``track_running_stats`` is switched off for the
    duration, which makes PyTorch's batch norm skip the running-average update (and the
    ``num_batches_tracked`` counter) while keeping the normalisation it would otherwise use.
    """
    saved: list[tuple[_NormBase, bool]] = []
    for m in batchnorm_modules(model):
        if m.track_running_stats and m.training:
            saved.append((m, m.track_running_stats))
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.track_running_stats = flag
