"""Multi-branch batch normalization: AdvProp's auxiliary BN, the batch-norm family of branches.

AdvProp (Xie et al. 2020, Sec. 4.2 and Algorithm 1) keeps a *main* BN for clean images and an
*auxiliary* BN for adversarial examples; its fine-grained variant (Sec. 5.4) one auxiliary BN per
data source; AFA's stage I (Wang et al., Sec. 4.1) one BN branch per attack strength. The branch
mechanism itself (routing, stripping, parameter groups) is :mod:`advfeat.norm.branches`, for any
norm family; this module is what batch norm adds to it:

* a BN branch owns its running statistics and affine parameters (family ``"batchnorm"``:
  BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d with its activation);
* :class:`MultiBatchNorm` honours the layer-level ``track_running_stats`` switch for every branch
  and keeps SyncBN's collectives in step in split mode;
* SyncBN per branch (:func:`convert_sync_multibn`, ``convert_multibn(..., sync=True)``).

:func:`convert_multibn` converts batch-norm layers only (as before the other families existed);
:func:`advfeat.norm.convert_branches` converts every registered family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from advfeat.errors import AdvfeatError
from advfeat.norm import branches as _branches
from advfeat.norm.branches import (
    BranchNorm,
    branch_class,
    branch_layers,
    convert_branches,
    convert_sync_branches,
    strip_branches,
)
from advfeat.norm.families import register_norm_family

__all__ = [
    "BATCHNORM_FAMILY",
    "MultiBatchNorm",
    "convert_multibn",
    "convert_sync_multibn",
    "multibn_layers",
    "strip_aux_bn",
]

BATCHNORM_FAMILY = "batchnorm"
"""The family name of torch's ``_BatchNorm`` layers (and timm's BatchNormAct2d)."""


class MultiBatchNorm(BranchNorm, _BatchNorm):
    """A batch-norm layer with several branches of statistics and affine parameters.

    Created by :func:`convert_multibn` / :func:`~advfeat.norm.convert_branches` (never directly):
    each converted layer is an instance of ``Multi<Original>`` deriving from this class *and* from
    the layer's original class. ``track_running_stats`` switched off on the layer applies to every
    branch (each aux branch also honours its own flag, which is what
    :func:`~advfeat.norm.frozen_bn_statistics` toggles).
    """

    _plain_class: type[_BatchNorm]

    def _run_aux(self, name: str, x: Tensor) -> Tensor:
        branch = cast(_BatchNorm, self.aux[name])
        if self.track_running_stats or not branch.track_running_stats:
            return cast(Tensor, branch(x))
        branch.track_running_stats = False  # the layer-level switch covers every branch
        try:
            return cast(Tensor, branch(x))
        finally:
            branch.track_running_stats = True

    def _keeps_empty_chunks(self) -> bool:
        # SyncBN in a process group must take part in every collective, even with an empty chunk.
        return (
            isinstance(self, nn.SyncBatchNorm)
            and self.training
            and dist.is_available()
            and dist.is_initialized()
        )


def timm_norm_act() -> Any:
    """timm's ``norm_act`` module, or ``None`` when timm is not installed."""
    try:
        from timm.layers import norm_act
    except ImportError:  # timm is optional
        return None
    return norm_act


def sync_variant(layer: nn.Module, process_group: Any = None) -> nn.Module:
    """``layer`` as a SyncBatchNorm sharing its parameters/buffers (timm BatchNormAct2d →
    SyncBatchNormAct)."""
    if isinstance(layer, nn.SyncBatchNorm):
        return layer
    norm_act = timm_norm_act()
    if norm_act is not None and isinstance(layer, norm_act.BatchNormAct2d):
        synced = norm_act.convert_sync_batchnorm(layer, process_group)
    else:
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(layer, process_group)
    return cast(nn.Module, synced)


register_norm_family(
    _BatchNorm,
    owned=("statistics", "affine"),
    name=BATCHNORM_FAMILY,
    sync=sync_variant,
    base=MultiBatchNorm,
)
for _plain in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    branch_class(_plain, MultiBatchNorm)


def __getattr__(name: str) -> Any:  # pickles made when these classes lived here
    if name.startswith("Multi"):
        return getattr(_branches, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def multibn_layers(model: nn.Module) -> list[BranchNorm]:
    """Every multi-branch layer of ``model`` (see :func:`advfeat.norm.branches.branch_layers`)."""
    return branch_layers(model)


def convert_multibn(
    model: nn.Module, branches: Sequence[str] = ("clean", "adv"), *, sync: bool = False
) -> nn.Module:
    """Give every batch-norm layer of ``model`` one BN branch per name (AdvProp Sec. 4.2), in place.

    Converts BatchNorm1d/2d/3d, SyncBatchNorm and timm's BatchNormAct2d (activation kept in every
    branch) and no other norm (:func:`~advfeat.norm.convert_branches` converts every family).
    ``branches[0]`` is the main branch (the layer's own parameters; ``state_dict`` keys
    unchanged); the others start as copies of the layer's statistics and affine parameters.
    Eval outputs are unchanged bit for bit. With ``sync=True`` every branch is a
    ``SyncBatchNorm`` (for DistributedDataParallel; timm's BatchNormAct2d becomes its
    SyncBatchNormAct). Returns ``model`` (a new object only when ``model`` itself is a
    batch-norm layer converted with ``sync=True``).
    """
    _branches.validate_branches(branches)
    if not any(isinstance(m, BranchNorm) for m in model.modules()) and not any(
        isinstance(m, _BatchNorm) for m in model.modules()
    ):
        raise AdvfeatError(
            f"{type(model).__name__} has no batch-norm layer to convert (looked for "
            "BatchNorm1d/2d/3d, SyncBatchNorm and timm BatchNormAct2d); "
            "advfeat.norm.convert_branches also converts LayerNorm, GroupNorm and RMSNorm"
        )
    return convert_branches(model, branches, families=(BATCHNORM_FAMILY,), sync=sync)


def convert_sync_multibn(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every BN branch of an already converted model a ``SyncBatchNorm``, keeping the routing.

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (and timm's) must not be used on a converted
    model: it rebuilds each layer as a plain ``SyncBatchNorm`` and silently drops the routing
    (advfeat then raises, naming this function). Parameters and buffers are shared, not copied, so
    optimizer parameter groups stay valid. Branched LayerNorm / GroupNorm layers, which have no
    batch statistics, stay as they are. In place; returns ``model``.
    """
    return convert_sync_branches(model, process_group)


def strip_aux_bn(model: nn.Module, keep: str | None = None, *, inplace: bool = False) -> nn.Module:
    """The plain model of the original architecture, with branch ``keep`` in every layer.

    The name AdvProp's auxiliary BN gave it; :func:`~advfeat.norm.strip_branches` strips every
    norm family the same way (this is that function).
    """
    return strip_branches(model, keep, inplace=inplace)
