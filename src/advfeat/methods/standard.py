"""Standard (empirical-risk) training: the baseline of every paper."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from advfeat.methods.base import Method, MethodOutput, cross_entropy
from advfeat.methods.registry import register_method

__all__ = ["Standard"]


@register_method
class Standard(Method):
    """Minimise the cross-entropy of clean examples."""

    name = "standard"
    paper = "baseline"

    @dataclass
    class Options:
        label_smoothing: float = 0.0

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        logits = model(x)
        loss = cross_entropy(logits, y, self.opts.label_smoothing)
        return MethodOutput(loss=loss, logits=logits, logs=self.detach_logs(loss_clean=loss))
