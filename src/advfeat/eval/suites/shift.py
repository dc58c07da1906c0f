"""``shift``: accuracy on shifted test domains.

The domains are the dataset's own (``shapes``: ``colour``, ``fog``, ``noise``, ``style``) and any
image folder the user adds (``--domain NAME=PATH``, see :mod:`advfeat.eval.folders`).
"""

from __future__ import annotations

from typing import Any

from advfeat.eval.accuracy import evaluate_accuracy
from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.suites.registry import register_suite, skipped

__all__ = ["run"]


@register_suite("shift", "accuracy on shifted test domains (dataset's own and image folders)")
def run(ctx: EvalContext) -> dict[str, Any]:
    if not ctx.data.shifted:
        return skipped("the dataset has no shifted domains; add one with --domain NAME=PATH")
    results: dict[str, Any] = {}
    bar = ctx.bar(len(ctx.data.shifted), "shift")
    try:
        for name, domain in ctx.data.shifted.items():
            dataset = seeded_subset(domain, ctx.config.max_images, ctx.config.seed)

            def compute(dataset: Any = dataset) -> dict[str, Any]:
                acc: dict[str, Any] = evaluate_accuracy(
                    ctx.model, dataset, batch_size=ctx.config.batch_size, device=ctx.device
                )
                return {"accuracy": acc["top1"], "n": len(dataset)}

            results[name] = ctx.unit(f"shift/{name}", compute)
            bar.update(1)
    finally:
        bar.close()
    accs = [r["accuracy"] for r in results.values()]
    return {"domains": results, "mean_accuracy": sum(accs) / len(accs)}
