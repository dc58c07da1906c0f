"""``clean``: top-1 (and top-5 with more than five classes) accuracy on the test set; for
detection and segmentation, the task's metrics (AP / AP50 / AP75, or mIoU and pixel accuracy)."""

from __future__ import annotations

from typing import Any

from advfeat.eval.accuracy import evaluate_accuracy
from advfeat.eval.context import EvalContext
from advfeat.eval.report import DENSE_METRICS, dense_scalars, pct
from advfeat.eval.suites.dense import task_metrics
from advfeat.eval.suites.registry import ALL_TASKS, register_suite

__all__ = ["run"]


def report(c: dict[str, Any], task: str) -> list[str]:
    """Top-1 (and top-5) accuracy; AP / mIoU for detection and segmentation."""
    if task != "classification":
        return _dense_clean(c)
    top5 = f", top-5 {pct(c['top5'])}" if "top5" in c else ""
    return [f"Top-1 {pct(c['top1'])}{top5} on {c['n']} images.", ""]


@register_suite(
    "clean",
    "top-1 / top-5 accuracy (AP or mIoU for dense tasks) on the clean test set",
    order=0,
    tasks=ALL_TASKS,
    title="Clean",
    report=report,
    per_branch=True,
)
def run(ctx: EvalContext) -> dict[str, Any]:
    dataset = ctx.test_set()
    task = ctx.data.dense_task
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


def _dense_clean(c: dict[str, Any]) -> list[str]:
    values = ", ".join(f"{DENSE_METRICS[k]} {pct(c[k])}" for k in dense_scalars(c))
    lines = [f"{values} on {c['n']} images.", ""]
    if "iou_per_class" in c:
        ious = ", ".join("–" if v is None else f"{v:.3f}" for v in c["iou_per_class"])
        lines += [f"IoU per class (class 0 first): {ious}.", ""]
    return lines
