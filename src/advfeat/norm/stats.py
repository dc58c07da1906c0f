"""What a batch-norm-like layer is, and keeping its running statistics exactly as they are.

:func:`has_running_statistics` (also called :func:`is_batchnorm_like`) is the predicate every
layer of advfeat uses to recognise a normalization layer with running statistics (attacks freeze
them, feature sites keep the layer whole, dense tasks put it in eval mode). It is not the question
"can this layer be given branches" (AdvProp's auxiliary norm): that is
:func:`advfeat.norm.families.can_have_branches`, true for LayerNorm too, which has no running
statistics. A model family with a BN class of its own that does not subclass torch's registers
it once::

    @register_batchnorm_class
    class MyBatchNorm(nn.Module): ...   # updates running stats only if training and track_running_stats

:func:`frozen_bn_statistics` is used by every attack (an attack step must never move BN
statistics, unlike the public reference code of the five papers, which attacks in train mode
and so updates them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "batchnorm_modules",
    "frozen_bn_statistics",
    "has_running_statistics",
    "is_batchnorm_like",
    "register_batchnorm_class",
]

_BATCHNORM_CLASSES: list[type[nn.Module]] = [_NormBase]
"""torch's normalization layers with running statistics (BatchNorm1d/2d/3d, SyncBatchNorm,
InstanceNorm with ``track_running_stats``) and their subclasses (advfeat's MultiBatchNorm, timm's
BatchNormAct2d), then every class given to :func:`register_batchnorm_class`."""

C = TypeVar("C", bound=type[nn.Module])


def register_batchnorm_class(cls: C) -> C:
    """Class decorator: make :func:`has_running_statistics` recognise ``cls`` (and its subclasses).

    The class must behave like torch's batch norm: a ``training`` flag, and running statistics
    updated only while ``training and track_running_stats`` (so that attacks can freeze them).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_batchnorm_class needs an nn.Module class, got {cls!r}")
    if not issubclass(cls, tuple(_BATCHNORM_CLASSES)):
        _BATCHNORM_CLASSES.append(cls)
    return cls


def has_running_statistics(module: Any) -> bool:
    """Whether ``module`` is a normalization layer with running statistics: torch's batch norms,
    SyncBatchNorm, multi-branch BN, timm's BatchNormAct2d, or a registered class (not LayerNorm,
    GroupNorm or RMSNorm, which normalise each sample on its own)."""
    return isinstance(module, tuple(_BATCHNORM_CLASSES))


is_batchnorm_like = has_running_statistics
"""The name :func:`has_running_statistics` had before norm families: a batch-norm-like layer."""


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """Every batch-norm-like module of ``model`` (see :func:`has_running_statistics`)."""
    return [m for m in model.modules() if has_running_statistics(m)]


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without updating any BN running statistic.

    In train mode the BN layers still normalise with batch statistics; in eval mode they use
    their running statistics. Nothing is copied: ``track_running_stats`` is switched off for the
    duration, which makes PyTorch's batch norm skip the running-average update (and the
    ``num_batches_tracked`` counter) while keeping the normalisation it would otherwise use.
    """
    saved: list[tuple[nn.Module, bool]] = []
    for m in batchnorm_modules(model):
        if getattr(m, "track_running_stats", False) and m.training:
            saved.append((m, True))
            setattr(m, "track_running_stats", False)  # noqa: B010 (any BN-like class)
    try:
        yield
    finally:
        for m, flag in saved:
            setattr(m, "track_running_stats", flag)  # noqa: B010
