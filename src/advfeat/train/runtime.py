"""Process-wide run settings: deterministic algorithms and SyncBN under DDP."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["set_deterministic", "sync_batchnorm"]


def set_deterministic(enabled: bool) -> None:
    """``enabled``: deterministic kernels only (``torch.use_deterministic_algorithms``; an op
    without a deterministic version raises), cuDNN autotuning off, and the cuBLAS workspace that
    deterministic matrix products need on CUDA ≥ 10.2."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def sync_batchnorm(model: nn.Module, process_group: object = None) -> nn.Module:
    """Batch statistics over all processes: multi-branch BN becomes SyncBN *per branch*
    (:func:`advfeat.norm.convert_sync_multibn`, routing kept), plain BN via
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. Returns the converted model."""
    from advfeat.norm import MultiBatchNorm, convert_sync_multibn

    if any(isinstance(m, MultiBatchNorm) for m in model.modules()):
        # never torch's converter on these: it would rebuild them as plain layers, losing routing
        return convert_sync_multibn(model, process_group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)  # type: ignore[arg-type]
