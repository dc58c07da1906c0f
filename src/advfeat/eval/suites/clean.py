"""``clean``: top-1 (and top-5 with more than five classes) accuracy on the test set; for
detection and segmentation, the task's metrics (AP / AP50 / AP75, or mIoU and pixel accuracy)."""

from __future__ import annotations

from typing import Any

from advfeat.eval.accuracy import evaluate_accuracy
from advfeat.eval.context import EvalContext
from advfeat.eval.suites.dense import dense_task, task_metrics
from advfeat.eval.suites.registry import register_suite

__all__ = ["run"]


@register_suite(
    "clean", "top-1 / top-5 accuracy (AP or mIoU for dense tasks) on the clean test set"
)
def run(ctx: EvalContext) -> dict[str, Any]:
    dataset = ctx.test_set()
    task = dense_task(ctx)
    if task is not None:
        return ctx.unit("clean", lambda: task_metrics(ctx, task, dataset, "clean"))
    topk = (1, 5) if ctx.data.num_classes > 5 else (1,)

    def compute() -> dict[str, Any]:
        result: dict[str, Any] = evaluate_accuracy(
            ctx.model, dataset, batch_size=ctx.config.batch_size, device=ctx.device, topk=topk
        )
        result["n"] = len(dataset)  # type: ignore[arg-type]
        return result

    return ctx.unit("clean", compute)
