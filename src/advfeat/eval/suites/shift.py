"""``shift``: accuracy on shifted test domains (for detection and segmentation: the task's
metrics per domain, and the mean of the headline one, AP50 or mIoU).

The domains are the dataset's own (``shapes``, ``shapes-det``, ``shapes-seg``: ``colour``,
``fog``, ``noise``, ``style``) and, for classification, any image folder the user adds
(``--domain NAME=PATH``, see :mod:`advfeat.eval.folders`).
"""

from __future__ import annotations

from typing import Any

from advfeat.eval.accuracy import evaluate_accuracy
from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.report import DENSE_METRICS, dense_scalars, md_table, pct
from advfeat.eval.suites.dense import task_metrics
from advfeat.eval.suites.registry import ALL_TASKS, register_suite, skipped

__all__ = ["run"]


def report(sh: dict[str, Any], task: str) -> list[str]:
    """Accuracy (AP / mIoU for dense tasks) per shifted domain."""
    if task != "classification":
        return _dense_shift(sh)
    return md_table(
        ["domain", "accuracy", "images"],
        [[d, pct(r["accuracy"]), str(r["n"])] for d, r in sh["domains"].items()],
    )


@register_suite(
    "shift",
    "accuracy (AP50 / mIoU for dense tasks) on shifted test domains",
    order=30,
    tasks=ALL_TASKS,
    title="Shifted domains",
    report=report,
    per_branch=True,
)
def run(ctx: EvalContext) -> dict[str, Any]:
    task = ctx.data.dense_task
    if not ctx.data.shifted:
        if task is not None:
            return skipped(f"the {task.name} dataset has no shifted domains")
        return skipped("the dataset has no shifted domains; add one with --domain NAME=PATH")
    results: dict[str, Any] = {}
    bar = ctx.bar(len(ctx.data.shifted), "shift")
    try:
        for name, domain in ctx.data.shifted.items():
            dataset = seeded_subset(domain, ctx.config.max_images, ctx.config.seed)
            key = f"shift/{name}"

            def compute(dataset: Any = dataset, key: str = key) -> dict[str, Any]:
                if task is not None:
                    return task_metrics(ctx, task, dataset, key)
                acc: dict[str, Any] = evaluate_accuracy(
                    ctx.model, dataset, batch_size=ctx.config.batch_size, device=ctx.device
                )
                return {"accuracy": acc["top1"], "n": len(dataset)}

            results[name] = ctx.unit(key, compute)
            bar.update(1)
    finally:
        bar.close()
    if task is None:
        accs = [r["accuracy"] for r in results.values()]
        return {"domains": results, "mean_accuracy": sum(accs) / len(accs)}
    metric = task.primary_metric
    values = [r[metric] for r in results.values() if r.get(metric) is not None]
    mean = sum(values) / len(values) if values else None
    return {"domains": results, "metric": metric, f"mean_{metric}": mean}


def _dense_shift(sh: dict[str, Any]) -> list[str]:
    domains = sh["domains"]
    keys = dense_scalars(next(iter(domains.values())))
    rows = [[d, *[pct(r.get(k)) for k in keys], str(r["n"])] for d, r in domains.items()]
    return md_table(["domain", *[DENSE_METRICS[k] for k in keys], "images"], rows)
