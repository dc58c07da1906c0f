"""Mixed precision of a training step: bf16 autocast (no scaling needed), or fp16 autocast with a
``GradScaler`` for GPUs without bf16 (Micikevicius et al., ICLR 2018: loss scaling keeps small
fp16 gradients from flushing to zero)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from advfeat.errors import AdvfeatError, unknown_name

__all__ = ["AMP_DTYPES", "MixedPrecision"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class MixedPrecision:
    """``autocast()`` for the forward pass and ``step(loss, optimizer)`` for backward + update.

    ``enabled=False`` (or a CPU device with bf16: advfeat trains in float32 on CPU) runs plain
    float32; ``float16`` needs a CUDA device and raises :class:`AdvfeatError` elsewhere.
    """

    def __init__(self, device: torch.device, *, enabled: bool, dtype: str = "bfloat16") -> None:
        if dtype not in AMP_DTYPES:
            raise unknown_name("amp_dtype", dtype, list(AMP_DTYPES))
        if enabled and dtype == "float16" and device.type != "cuda":
            raise AdvfeatError(
                f"amp_dtype=float16 (with a GradScaler) needs a CUDA GPU, the device is "
                f"{device}; use amp_dtype=bfloat16 or amp=false"
            )
        self.device = device
        self.dtype = AMP_DTYPES[dtype] if enabled and device.type == "cuda" else None
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.dtype is torch.float16 else None  # type: ignore[attr-defined]
        )

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            yield

    def step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and ``optimizer.step()``, scaled under fp16 (steps with inf/NaN
        gradients are skipped and the scale lowered, as ``GradScaler`` does)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else dict(self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
