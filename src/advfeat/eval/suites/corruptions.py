"""``corruptions``: accuracy under the 15 common corruptions × 5 severities, and mCE.

Corrupted images are generated on the fly (:mod:`advfeat.eval.corruption`). mCE is normalised
by a baseline the user names (an earlier evaluation JSON, or a checkpoint evaluated here with the
same settings); without one, the unnormalised mean corruption error is reported.
"""

from __future__ import annotations

from typing import Any

import torch

from advfeat.errors import AdvfeatError
from advfeat.eval.context import EvalContext
from advfeat.eval.corruption import (
    corrupt_batch,
    corrupted_size,
    corruption_errors,
    require_imagecorruptions,
)
from advfeat.eval.plots import plot_corruptions
from advfeat.eval.report import md_table, pct
from advfeat.eval.robust import correct
from advfeat.eval.suites.registry import register_suite

__all__ = ["corruption_table", "run"]


def corruption_table(ctx: EvalContext) -> dict[str, Any]:
    """Clean accuracy and accuracy per corruption and severity on the (sub)set of test images."""
    require_imagecorruptions()
    cfg = ctx.config
    n = cfg.corruption_max_images if cfg.corruption_max_images is not None else cfg.max_images
    dataset = ctx.test_set(n)

    def clean() -> float:
        hits = [c for x, y in ctx.batches(dataset) for c in correct(ctx.model, x, y).tolist()]
        return sum(hits) / max(len(hits), 1)

    clean_acc = ctx.unit("corruptions/clean", clean)
    table: dict[str, dict[str, float]] = {}
    bar = ctx.bar(len(cfg.corruptions) * len(cfg.severities), "corruptions")
    try:
        for name in cfg.corruptions:
            table[name] = {}
            for severity in cfg.severities:
                key = f"corruptions/{name}/{severity}"

                def compute(name: str = name, severity: int = severity, key: str = key) -> float:
                    base = ctx.seed_for(key)
                    hits: list[bool] = []
                    position = 0
                    for x, y in ctx.batches(dataset):
                        seeds = [base + position + i for i in range(x.shape[0])]
                        position += x.shape[0]
                        with torch.no_grad():
                            xc = corrupt_batch(x, name, severity, seeds)
                        hits += correct(ctx.model, xc, y).tolist()
                    return sum(hits) / max(len(hits), 1)

                table[name][str(severity)] = ctx.unit(key, compute)
                bar.update(1)
    finally:
        bar.close()
    first = dataset[0][0]
    height, width = int(first.shape[-2]), int(first.shape[-1])
    return {
        "clean_accuracy": clean_acc,
        "accuracy": table,
        "n": len(dataset),  # type: ignore[arg-type]
        "severities": list(cfg.severities),
        "corrupted_at": list(corrupted_size(height, width)),
        "image_size": [height, width],
    }


def _baseline(ctx: EvalContext) -> dict[str, Any] | None:
    base = ctx.baseline
    if base is None:
        return None
    if isinstance(base, dict):
        found = base.get("suites", {}).get("corruptions", base)
        if "accuracy" not in found:
            raise AdvfeatError(
                "the baseline evaluation has no corruption results; evaluate it with "
                "--suite corruptions first (or pass its checkpoint)"
            )
        return found  # type: ignore[no-any-return]
    return corruption_table(ctx.child(base, "baseline"))


@register_suite(
    "corruptions",
    "15 common corruptions × 5 severities (CIFAR-10-C style), mCE",
    order=20,
    title="Corruptions",
    report=lambda result, _task: _corruptions(result),
    plots={"corruptions": plot_corruptions},
    per_branch=True,
    ready=lambda _config: require_imagecorruptions(),
)
def run(ctx: EvalContext) -> dict[str, Any]:
    result = corruption_table(ctx)
    table = result["accuracy"]
    per_type = {c: sum(row.values()) / len(row) for c, row in table.items()}
    result["mean_accuracy"] = per_type
    result["mean_corruption_accuracy"] = sum(per_type.values()) / len(per_type)
    result["mean_corruption_error"] = 1 - result["mean_corruption_accuracy"]
    baseline = _baseline(ctx)
    if baseline is None:
        result["mce"] = None
        result["mce_note"] = "no baseline given (--baseline PATH): mCE not normalised"
        return result
    result.update(
        corruption_errors(
            table,
            baseline["accuracy"],
            clean_accuracy=result["clean_accuracy"],
            baseline_clean_accuracy=baseline.get("clean_accuracy"),
        )
    )
    result["baseline"] = ctx.config.extra.get("baseline", "given")
    return result


def _corruptions(cor: dict[str, Any]) -> list[str]:
    sev = [str(s) for s in cor["severities"]]
    head = ["corruption", *[f"s{s}" for s in sev], "mean"]
    has_ce = "ce" in cor
    if has_ce:
        head.append("CE")
    rows = []
    for name, row in cor["accuracy"].items():
        cells = [
            name.replace("_", " "),
            *[pct(row[s]) for s in sev],
            pct(cor["mean_accuracy"][name]),
        ]
        if has_ce:
            cells.append(pct(cor["ce"][name]))
        rows.append(cells)
    lines = [
        f"{cor['n']} test images, corrupted at {cor['corrupted_at'][0]}×{cor['corrupted_at'][1]} "
        f"px; clean accuracy on them {pct(cor['clean_accuracy'])}.",
        "",
    ]
    lines += md_table(head, rows)
    if cor.get("mce") is not None:
        extra = f", relative mCE {pct(cor['relative_mce'])}" if "relative_mce" in cor else ""
        lines += [
            f"mCE {pct(cor['mce'])}{extra} (baseline: `{cor.get('baseline', 'given')}`).",
            "",
        ]
    else:
        lines += [
            f"Mean corruption error {pct(cor['mean_corruption_error'])} ({cor.get('mce_note', '')}).",
            "",
        ]
    return lines
