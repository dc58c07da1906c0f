"""``clean``: the task's metrics on the test set — top-1 (and top-5 with more than five classes)
accuracy for classification, AP / AP50 / AP75 for detection, mIoU and pixel accuracy for
segmentation (:func:`~advfeat.eval.suites.metrics.task_metrics`, one path for every task)."""

from __future__ import annotations

from typing import Any

from advfeat.eval.context import EvalContext
from advfeat.eval.report import metric_keys, metric_label, pct
from advfeat.eval.suites.metrics import task_metrics
from advfeat.eval.suites.registry import register_suite

__all__ = ["run"]


def report(c: dict[str, Any], task: str) -> list[str]:
    """Top-1 (and top-5) accuracy; AP / mIoU (and IoU per class) for detection and
    segmentation: each metric the result holds."""
    if "top1" in c:
        top5 = f", top-5 {pct(c['top5'])}" if "top5" in c else ""
        return [f"Top-1 {pct(c['top1'])}{top5} on {c['n']} images.", ""]
    values = ", ".join(f"{metric_label(k)} {pct(c[k])}" for k in metric_keys(c))
    lines = [f"{values} on {c['n']} images.", ""]
    if "iou_per_class" in c:
        ious = ", ".join("–" if v is None else f"{v:.3f}" for v in c["iou_per_class"])
        lines += [f"IoU per class (class 0 first): {ious}.", ""]
    return lines


@register_suite(
    "clean",
    "top-1 / top-5 accuracy (AP or mIoU for dense tasks) on the clean test set",
    order=0,
    tasks=None,  # every task, those registered later too
    title="Clean",
    report=report,
    per_branch=True,
)
def run(ctx: EvalContext) -> dict[str, Any]:
    dataset = ctx.test_set()
    return ctx.unit("clean", lambda: task_metrics(ctx, dataset, "clean", detailed=True))
