"""Exponential moving average of a model's weights (Polyak averaging; e.g. timm's ``ModelEmaV2``).

After every optimiser step, every floating-point parameter and buffer of the copy moves towards
the trained model's: ``ema ← decay·ema + (1 − decay)·value`` (integer buffers such as BN's
``num_batches_tracked`` are copied). The copy is what the run evaluates and exports when
``ema_decay`` is set; the trained weights are kept for resuming.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from advfeat.errors import AdvfeatError

__all__ = ["ModelEMA"]


class ModelEMA:
    """An averaged copy of ``model`` (same architecture, eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise AdvfeatError(f"ema_decay must lie in (0, 1), e.g. 0.999, got {decay!r}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model``'s current weights: the floating-point tensors in
        one fused ``lerp`` over the whole list (a few kernel launches, not two per tensor)."""
        current = model.state_dict()
        averaged, targets = [], []
        for key, value in self.model.state_dict().items():
            new = current[key].detach()
            if value.dtype.is_floating_point:
                averaged.append(value)
                targets.append(new.to(value.dtype))
            else:
                value.copy_(new)
        if averaged:  # ema + (1 − decay)·(new − ema) = decay·ema + (1 − decay)·new
            torch._foreach_lerp_(averaged, targets, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
