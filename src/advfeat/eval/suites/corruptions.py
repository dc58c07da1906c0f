"""``corruptions``: accuracy under the 15 common corruptions × 5 severities, and mCE.

Corrupted images are generated on the fly (:mod:`advfeat.eval.corruption`; CIFAR-10-C's
severities for images of at most 32 px where implemented (all but frost), ImageNet-C's otherwise,
recorded per corruption with the reason for each fallback), or read from the released CIFAR-10-C / CIFAR-100-C / ImageNet-C files
(``corruption_set``, ``corruption_dir``; :mod:`advfeat.data.corruptions_released`). mCE
(Hendrycks & Dietterich 2019) is normalised by a baseline the user names (an earlier evaluation
JSON, or a checkpoint evaluated here with the same settings); on the released ImageNet-C with all
five severities and no baseline, by AlexNet's published errors, as in the paper. Without a
baseline the unnormalised mean corruption error is reported.
"""

from __future__ import annotations

import importlib.util
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from advfeat.data.corruptions_released import released_corruption
from advfeat.errors import AdvfeatError
from advfeat.eval.config import CORRUPTION_NAMES, EvalConfig, names_of
from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.corruption import (
    ALEXNET_ERRORS,
    IMAGENET_ONLY,
    MISSING_IMAGECORRUPTIONS,
    corrupt_batch,
    corrupted_size,
    corruption_errors,
    require_imagecorruptions,
    severity_scale,
)
from advfeat.eval.corruption_cifar import has_cifar_severities
from advfeat.eval.plots import plot_corruptions
from advfeat.eval.report import md_table, pct
from advfeat.eval.robust import correct
from advfeat.eval.suites.registry import options_of, register_suite
from advfeat.options import Choice, Integer, Text, option

__all__ = ["CorruptionOptions", "corruption_table", "needs_imagecorruptions", "ready", "run"]


@dataclass
class CorruptionOptions:
    """Settings of the ``corruptions`` suite (Hendrycks & Dietterich 2019)."""

    types: tuple[str, ...] = CORRUPTION_NAMES
    """The corruption types (default: the 15 of CIFAR-10-C / ImageNet-C)."""
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    max_images: int | None = option(None, Integer(low=1, optional=True))
    """Images per corruption and severity (default: the evaluation's ``max_images``)."""
    set: str = option("generated", Choice("generated", "cifar10-c", "cifar100-c", "imagenet-c"))
    """``generated`` (on the fly), or the released ``cifar10-c`` / ``cifar100-c`` / ``imagenet-c``
    files under ``dir``."""
    dir: str | None = option(None, Text(optional=True))
    scale: str = option("auto", Choice("auto", "cifar", "imagenet"))
    """Severity parameters of generated corruptions: ``cifar`` (CIFAR-10-C's, where implemented),
    ``imagenet`` (ImageNet-C's), ``auto`` (``cifar`` for test images of at most 32 px)."""

    def validate(self, task: str) -> None:
        self.types = names_of(self.types, "corruption", CORRUPTION_NAMES)
        if self.set != "generated" and not self.dir:
            raise AdvfeatError(
                f"corruption_set={self.set} reads the released files: also give "
                "--set corruptions.dir=PATH"
            )
        levels: list[int] = []
        for s in self.severities:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 1 <= s <= 5:
                raise AdvfeatError(f"corruption severities are integers 1 to 5, got {s!r}")
            levels.append(int(s))
        if not levels:
            raise AdvfeatError("choose at least one corruption severity (1 to 5)")
        self.severities = tuple(sorted(set(levels)))


def _scale(ctx: EvalContext, height: int, width: int) -> str:
    asked = options_of(ctx.config, "corruptions").scale
    return ("cifar" if max(height, width) <= 32 else "imagenet") if asked == "auto" else asked


def corruption_table(ctx: EvalContext) -> dict[str, Any]:
    """Clean accuracy and accuracy per corruption and severity on the (sub)set of test images."""
    cfg = ctx.config
    opts: CorruptionOptions = options_of(cfg, "corruptions")
    released = opts.set != "generated"
    n = opts.max_images if opts.max_images is not None else cfg.max_images
    dataset = ctx.test_set(n)
    first = dataset[0][0]
    height, width = int(first.shape[-2]), int(first.shape[-1])
    scale = _scale(ctx, height, width)
    scales = {name: severity_scale(name, scale) for name in opts.types}
    if not released and "imagenet" in scales.values():
        require_imagecorruptions()

    def accuracy(data: Dataset) -> float:
        hits = [c for x, y in ctx.batches(data) for c in correct(ctx.model, x, y).tolist()]
        return sum(hits) / max(len(hits), 1)

    clean_acc = ctx.unit("corruptions/clean", lambda: accuracy(dataset))
    table: dict[str, dict[str, float]] = {}
    bar = ctx.bar(len(opts.types) * len(opts.severities), "corruptions")
    try:
        for name in opts.types:
            table[name] = {}
            for severity in opts.severities:
                key = f"corruptions/{name}/{severity}"

                def generated(name: str = name, severity: int = severity, key: str = key) -> float:
                    base = ctx.seed_for(key)
                    hits: list[bool] = []
                    position = 0
                    for x, y in ctx.batches(dataset):
                        seeds = [base + position + i for i in range(x.shape[0])]
                        position += x.shape[0]
                        with torch.no_grad():
                            xc = corrupt_batch(x, name, severity, seeds, scale=scale)
                        hits += correct(ctx.model, xc, y).tolist()
                    return sum(hits) / max(len(hits), 1)

                def read(name: str = name, severity: int = severity) -> float:
                    assert opts.dir is not None
                    files = released_corruption(opts.set, opts.dir, name, severity)
                    return accuracy(seeded_subset(files, n, cfg.seed))

                table[name][str(severity)] = ctx.unit(key, read if released else generated)
                bar.update(1)
    finally:
        bar.close()
    result: dict[str, Any] = {
        "clean_accuracy": clean_acc,
        "accuracy": table,
        "n": len(dataset),  # type: ignore[arg-type]
        "severities": list(opts.severities),
        "image_size": [height, width],
    }
    if released:
        result["corruption_set"] = f"released {opts.set} files ({opts.dir})"
    else:
        kinds = sorted(set(scales.values()))
        result["corruption_set"] = "generated on the fly, " + " and ".join(
            f"{'CIFAR-10-C' if k == 'cifar' else 'ImageNet-C'} severities" for k in kinds
        )
        result["severity_scale"] = scales
        fallbacks = {
            name: IMAGENET_ONLY.get(name, "ImageNet-C parameters: no CIFAR-10-C version here")
            for name, used in scales.items()
            if scale == "cifar" and used == "imagenet"
        }
        if fallbacks:
            result["severity_scale_notes"] = fallbacks
        result["corrupted_at"] = list(corrupted_size(height, width))
    return result


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


def needs_imagecorruptions(config: EvalConfig) -> bool:
    """Generated corruptions use the ``imagecorruptions`` package, except at CIFAR scale for the
    types whose CIFAR-10-C severities advfeat implements itself."""
    opts: CorruptionOptions = options_of(config, "corruptions")
    if opts.set != "generated":
        return False
    if opts.scale == "cifar":
        return not all(has_cifar_severities(c) for c in opts.types)
    return True  # ImageNet-C severities (or ``auto`` on images that may be larger than 32 px)


def ready(config: EvalConfig) -> list[str]:
    """Generated corruptions may need the optional package ``imagecorruptions``."""
    if needs_imagecorruptions(config) and importlib.util.find_spec("imagecorruptions") is None:
        return [MISSING_IMAGECORRUPTIONS]
    return []


@register_suite(
    "corruptions",
    "15 common corruptions × 5 severities (generated or released), mCE",
    order=20,
    title="Corruptions",
    report=lambda result, _task: _corruptions(result),
    plots={"corruptions": plot_corruptions},
    per_branch=True,
    ready=ready,
    options=CorruptionOptions,
    aliases={
        "corruptions": "types",
        "severities": "severities",
        "corruption_max_images": "max_images",
        "corruption_set": "set",
        "corruption_dir": "dir",
        "corruption_scale": "scale",
    },
)
def run(ctx: EvalContext) -> dict[str, Any]:
    result = corruption_table(ctx)
    table = result["accuracy"]
    per_type = {c: sum(row.values()) / len(row) for c, row in table.items()}
    result["mean_accuracy"] = per_type
    result["mean_corruption_accuracy"] = sum(per_type.values()) / len(per_type)
    result["mean_corruption_error"] = 1 - result["mean_corruption_accuracy"]
    baseline = _baseline(ctx)
    opts: CorruptionOptions = options_of(ctx.config, "corruptions")
    if baseline is None and opts.set == "imagenet-c" and set(opts.severities) == {1, 2, 3, 4, 5}:
        result.update(corruption_errors(table, ALEXNET_ERRORS))
        result["baseline"] = "AlexNet (Hendrycks & Dietterich 2019, their published errors)"
        return result
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
    where = (
        f"corrupted at {cor['corrupted_at'][0]}×{cor['corrupted_at'][1]} px"
        if "corrupted_at" in cor
        else "per corruption and severity"
    )
    lines = [
        f"Corruption set: {cor.get('corruption_set', 'generated on the fly')}.",
        "",
        f"{cor['n']} test images, {where}; clean accuracy on them {pct(cor['clean_accuracy'])}.",
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
