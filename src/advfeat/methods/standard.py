"""Standard (empirical-risk) training: the baseline of every paper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from advfeat.errors import AdvfeatError
from advfeat.methods.base import Method, MethodOutput, cross_entropy
from advfeat.methods.registry import register_method

__all__ = ["Standard"]


@register_method
class Standard(Method):
    """Minimise the task loss of clean examples (cross-entropy for classification)."""

    name = "standard"
    paper = "baseline"
    tasks = ("classification", "detection", "segmentation")

    @dataclass
    class Options:
        label_smoothing: float = 0.0  # classification only

    def validate_options(self) -> None:
        if self.opts.label_smoothing and self.task.name != "classification":
            raise AdvfeatError(
                f"label_smoothing applies to classification, not {self.task.name}; leave it 0"
            )

    capturable_step = True  # one pass and its loss

    def forward(self, model: nn.Module, x: Any, y: Any) -> MethodOutput:  # type: ignore[override]
        self.task.check(x, y)
        output = self.task.forward_output(model, x, y)
        loss, parts = self.task.output_loss(output, y)
        if self.opts.label_smoothing:
            loss = cross_entropy(output, y, self.opts.label_smoothing)
        logs = self.detach_logs(loss_clean=loss, **self.task.log_parts(parts))
        return MethodOutput(loss=loss, logits=self.task.logits(output), logs=logs)
