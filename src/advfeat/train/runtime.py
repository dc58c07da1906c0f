"""Process-wide run settings: deterministic algorithms, SyncBN under DDP, a CUDA memory cap."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from advfeat.errors import AdvfeatError

__all__ = [
    "CUDA_MEMORY_FRACTION_ENV",
    "cap_cuda_memory",
    "resolve_device",
    "set_deterministic",
    "sync_batchnorm",
]

CUDA_MEMORY_FRACTION_ENV = "ADVFEAT_CUDA_MEMORY_FRACTION"
"""Environment variable: the share of its GPU's memory a run may allocate (``advfeat compare
--jobs N`` sets it for runs that share a GPU)."""


def resolve_device(name: str) -> torch.device:
    """The device ``name`` asks for (``auto``: CUDA when there is one), refused in one line when
    it is unknown or absent here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AdvfeatError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdvfeatError(f"device {name!r} asked for, but CUDA is not available here (use cpu)")
    return device


def set_deterministic(enabled: bool) -> None:
    """``enabled``: deterministic kernels only (``torch.use_deterministic_algorithms``; an op
    without a deterministic version raises), cuDNN autotuning off, and the cuBLAS workspace that
    deterministic matrix products need on CUDA ≥ 10.2; otherwise cuDNN autotuning on."""
    if not enabled:
        # static shapes (drop_last): cuDNN picks the fastest convolution once per shape
        torch.backends.cudnn.benchmark = True
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


def cap_cuda_memory(device: torch.device) -> float | None:
    """Cap this process's CUDA allocations on ``device`` at the share of the GPU's memory that
    ``$ADVFEAT_CUDA_MEMORY_FRACTION`` gives (nothing when unset, or on CPU); return the share."""
    text = os.environ.get(CUDA_MEMORY_FRACTION_ENV, "").strip()
    if not text or device.type != "cuda":
        return None
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        raise AdvfeatError(
            f"{CUDA_MEMORY_FRACTION_ENV}={text!r}: expected a share of the GPU's memory in (0, 1]"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)  # it wants the GPU's index
    return fraction
