"""``landscape``: 1-D and 2-D loss surfaces around the trained weights along filter-normalised
random directions (A-FAN Fig. 3; Li et al. 2018), see :mod:`advfeat.eval.landscape`.

The loss is the mean cross-entropy over a fixed seeded subset of the un-augmented training set
(``landscape_data=test`` for the test set), in eval mode with the trained BN running statistics.
The directions are drawn from seeds fixed by ``seed`` alone, so two models of one architecture
are cut along the same random draws (each normalised to its own filters).

Side by side: ``landscape_reference=PATH`` adds another model's landscape to the results and the
plot — an eval JSON that holds a ``landscape`` suite (e.g. the standard model's), or a checkpoint,
evaluated here on the same images with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advfeat.errors import AdvfeatError
from advfeat.eval.analysis_plots import plot_landscape
from advfeat.eval.config import POSITIVE
from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.landscape import (
    filter_normalized_direction,
    landscape_1d,
    landscape_2d,
    landscape_parameters,
    summarize_1d,
)
from advfeat.eval.report import md_table, pct, skip_lines
from advfeat.eval.suites.registry import options_of, register_suite
from advfeat.options import Choice, Flag, Integer, Text, option

__all__ = ["grid", "landscape_of", "run"]


@dataclass
class LandscapeOptions:
    """Settings of the ``landscape`` suite (A-FAN Fig. 3; Li et al. 2018)."""

    data: str = option("train", Choice("train", "test"))
    """``train`` (the training loss, as Li et al. and A-FAN plot it) or ``test``."""
    batches: int = option(2, Integer(low=1))
    batch_size: int = option(128, Integer(low=1))
    range: float = option(1.0, POSITIVE)
    """α (and β) run over [−range, range] in units of the filter-normalised direction."""
    points: int = option(21, Integer(low=3))
    """Points of the 1-D curve (odd: α = 0 is one of them)."""
    points_2d: int = option(11, Integer(low=0))
    """Points per axis of the 2-D surface (0: no 2-D surface)."""
    ignore_biasbn: bool = option(True, Flag())
    """Keep biases and BN weights at their trained values (Li et al.'s ``ignore='biasbn'``)."""
    reference: str | None = option(None, Text(optional=True))
    """Another model's landscape, side by side: an eval JSON with a landscape suite or a
    checkpoint."""

    def validate(self, task: str) -> None:
        if self.points % 2 == 0 or (self.points_2d % 2 == 0 and self.points_2d):
            raise AdvfeatError(
                "landscape: points and points_2d must be odd (so that α = 0, the trained "
                f"weights, is on the grid), got {self.points} and {self.points_2d}"
            )
        if self.points_2d == 1:
            raise AdvfeatError("landscape: points_2d must be 0 (no 2-D surface) or at least 3")


def grid(radius: float, points: int) -> list[float]:
    """``points`` evenly spaced values on [−radius, radius] (0 exactly in the middle when odd)."""
    if points == 1:
        return [0.0]
    step = 2 * radius / (points - 1)
    values = [-radius + i * step for i in range(points)]
    if points % 2 == 1:
        values[points // 2] = 0.0
    return [round(v, 12) for v in values]


def landscape_of(ctx: EvalContext, model: nn.Module, batches: list[Any], prefix: str) -> dict:
    """The 1-D curve and (unless ``landscape_points_2d`` is 0) the 2-D surface of ``model``."""
    cfg = ctx.config
    opts: LandscapeOptions = options_of(cfg, "landscape")
    first = torch.Generator().manual_seed(ctx.seed_for("landscape/direction/1"))
    second = torch.Generator().manual_seed(ctx.seed_for("landscape/direction/2"))
    d1 = filter_normalized_direction(model, generator=first, ignore_biasbn=opts.ignore_biasbn)
    d2 = filter_normalized_direction(model, generator=second, ignore_biasbn=opts.ignore_biasbn)
    params = landscape_parameters(model)
    moved = sum(p.numel() for (_, p), d in zip(params, d1, strict=True) if bool(d.ne(0).any()))
    alphas = grid(opts.range, opts.points)

    def one() -> dict[str, Any]:
        curve = landscape_1d(model, batches, d1, alphas)
        return {**curve, **summarize_1d(curve)}

    out: dict[str, Any] = {
        "parameters": sum(p.numel() for _, p in params),
        "parameters_moved": moved,
    }
    bar = ctx.bar(2 if opts.points_2d else 1, "landscape")
    try:
        out["1d"] = ctx.unit(f"{prefix}/1d", one)
        bar.update(1)
        if opts.points_2d:
            axis = grid(opts.range, opts.points_2d)
            out["2d"] = ctx.unit(
                f"{prefix}/2d", lambda: landscape_2d(model, batches, (d1, d2), axis, axis)
            )
            bar.update(1)
    finally:
        bar.close()
    return out


def _reference(ctx: EvalContext, path_text: str, batches: list[Any]) -> dict[str, Any]:
    path = Path(path_text)
    if not path.is_file():
        raise AdvfeatError(
            f"landscape_reference {path_text!r} does not exist (an eval JSON with a landscape "
            "suite, or a checkpoint)"
        )
    if path.suffix == ".json":
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise AdvfeatError(f"landscape_reference {path_text!r} is not JSON ({err})") from None
        land = saved.get("suites", {}).get("landscape") if isinstance(saved, dict) else None
        if not isinstance(land, dict) or "1d" not in land:
            raise AdvfeatError(
                f"landscape_reference {path_text!r} holds no landscape results; evaluate that "
                "model with --suite landscape first, or pass its checkpoint"
            )
        keep = ("1d", "2d", "data", "n", "parameters", "parameters_moved")
        return {
            "source": path_text,
            "run": saved.get("run", {}),
            **{k: land[k] for k in keep if k in land},
        }
    from advfeat.eval.accuracy import eval_mode
    from advfeat.eval.loading import load_run

    other = load_run(path, device=ctx.device)
    with eval_mode(other.model):
        land = landscape_of(ctx, other.model, batches, "landscape/reference")
    return {"source": path_text, "run": other.info, **land}


@register_suite(
    "landscape",
    "1-D / 2-D loss landscape along filter-normalised directions",
    order=80,
    title="Loss landscape (A-FAN Fig. 3)",
    report=lambda result, _task: _landscape(result),
    plots={"loss_landscape": plot_landscape},
    options=LandscapeOptions,
    aliases={f"landscape_{f}": f for f in LandscapeOptions.__dataclass_fields__},
)
def run(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.config
    opts: LandscapeOptions = options_of(cfg, "landscape")
    use_train = opts.data == "train" and ctx.data.train is not None
    dataset = ctx.data.train if use_train else ctx.data.test
    assert dataset is not None
    n = opts.batches * opts.batch_size
    subset = seeded_subset(dataset, n, cfg.seed)
    batches = list(ctx.batches(subset, batch_size=opts.batch_size))
    meta = {
        "data": "train" if use_train else "test",
        "n": sum(int(y.shape[0]) for _, y in batches),
        "range": opts.range,
        "ignore_biasbn": opts.ignore_biasbn,
        "bn": "eval mode, trained running statistics",
    }
    results: dict[str, Any] = {**meta, **landscape_of(ctx, ctx.model, batches, "landscape")}
    if opts.reference:
        results["reference"] = _reference(ctx, opts.reference, batches)
    return results


def _landscape(land: dict[str, Any]) -> list[str]:
    if skip_lines(land):
        return skip_lines(land) or []
    models = [("this model", land)]
    ref = land.get("reference")
    if isinstance(ref, dict) and "1d" in ref:
        run = ref.get("run", {})
        models.append(
            (" / ".join(str(run[k]) for k in ("method", "model") if k in run) or "reference", ref)
        )
    lines = [
        f"Mean cross-entropy on {land['n']} {land['data']} images along filter-normalised random "
        f"directions (Li et al. 2018), α ∈ [−{land['range']:g}, {land['range']:g}]; "
        f"{'biases and BN parameters kept fixed' if land['ignore_biasbn'] else 'biases and BN parameters scaled by 1 + α'}; "
        "BN in eval mode with the trained running statistics.",
        "",
    ]
    rows = []
    for name, m in models:
        c = m["1d"]
        rows.append(
            [
                name,
                f"{c['loss_at_zero']:.4g}",
                pct(c.get("accuracy_at_zero")),
                f"{c['mean_loss_increase']:.4g}",
                f"{c['max_loss_increase']:.4g}",
                f"{c['width_loss_below_plus_1']:.3g}",
            ]
        )
    head = [
        "model",
        "loss at α=0",
        "acc. at α=0",
        "mean increase",
        "max increase",
        "width (+1 nat)",
    ]
    return lines + md_table(head, rows)
