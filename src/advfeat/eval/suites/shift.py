"""``shift``: the task's metrics on shifted test domains, and the mean of its headline one over
the domains (:attr:`~advfeat.tasks.Task.eval_metric`: top-1 accuracy, AP50 or mIoU).

The domains are the dataset's own (``shapes``, ``shapes-det``, ``shapes-seg``: ``colour``,
``fog``, ``noise``, ``style``) and, for classification, any image folder the user adds
(``--domain NAME=PATH``, see :mod:`advfeat.eval.folders`). Each domain holds the task's metrics
and ``n`` (:func:`~advfeat.eval.suites.metrics.task_metrics`, one path for every task); the
result names its headline, ``{"domains": ..., "metric": "top1", "mean_top1": ...}``.
"""

from __future__ import annotations

from typing import Any

from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.report import md_table, metric_keys, metric_label, pct
from advfeat.eval.suites.metrics import task_metrics
from advfeat.eval.suites.registry import register_suite, skipped

__all__ = ["run"]


def report(sh: dict[str, Any], task: str) -> list[str]:
    """The task's metrics (accuracy, AP / mIoU) per shifted domain."""
    domains = sh["domains"]
    keys = metric_keys(next(iter(domains.values())))
    rows = [[d, *[pct(r.get(k)) for k in keys], str(r["n"])] for d, r in domains.items()]
    return md_table(["domain", *[metric_label(k) for k in keys], "images"], rows)


@register_suite(
    "shift",
    "accuracy (AP50 / mIoU for dense tasks) on shifted test domains",
    order=30,
    tasks=None,  # every task, those registered later too
    title="Shifted domains",
    report=report,
    per_branch=True,
)
def run(ctx: EvalContext) -> dict[str, Any]:
    task = ctx.data.task
    if not ctx.data.shifted:
        # image folders (advfeat.eval.folders) hold class labels
        hint = "; add one with --domain NAME=PATH" if task.classifier else ""
        return skipped(f"the {task.name} dataset has no shifted domains{hint}")
    results: dict[str, Any] = {}
    bar = ctx.bar(len(ctx.data.shifted), "shift")
    try:
        for name, domain in ctx.data.shifted.items():
            dataset = seeded_subset(domain, ctx.config.max_images, ctx.config.seed)
            key = f"shift/{name}"

            def compute(dataset: Any = dataset, key: str = key) -> dict[str, Any]:
                return task_metrics(ctx, dataset, key)

            results[name] = ctx.unit(key, compute)
            bar.update(1)
    finally:
        bar.close()
    metric = task.eval_metric
    values = [r[metric] for r in results.values() if r.get(metric) is not None]
    mean = sum(values) / len(values) if values else None
    return {"domains": results, "metric": metric, f"mean_{metric}": mean}
