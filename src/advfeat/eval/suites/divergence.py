"""``divergence``: AdvBN Eq. 4-5 feature divergence, per layer, between the clean test set and
every shifted domain (the dataset's own and ``--domain`` image folders)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.divergence import (
    default_layers,
    layer_moments,
    near_constant_channels,
    symmetric_kl_divergence,
)
from advfeat.eval.plots import plot_divergence
from advfeat.eval.report import md_table
from advfeat.eval.suites.registry import options_of, register_suite, skipped

__all__ = ["run"]

REL_MIN_STD = 1e-3


def report(dv: dict[str, Any], _task: str) -> list[str]:
    """The divergence of every pair of data sources, per layer."""
    pairs = list(dv["pairs"])
    rows = [
        [layer, *[f"{dv['pairs'][p]['per_layer'][layer]:.4g}" for p in pairs]]
        for layer in dv["layers"]
    ]
    return md_table(["layer", *[p.replace("|", " vs ") for p in pairs]], rows)


@dataclass
class DivergenceOptions:
    """Settings of the ``divergence`` suite."""

    layers: tuple[str, ...] | None = None
    """The sites whose feature statistics are compared (default: one per stage)."""

    def validate(self, task: str) -> None:
        if self.layers is not None:
            self.layers = tuple(str(n) for n in self.layers)


@register_suite(
    "divergence",
    "AdvBN Eq. 4-5 symmetric KL feature divergence per layer",
    order=50,
    title="Feature divergence (AdvBN Eq. 4-5)",
    report=report,
    plots={"divergence": plot_divergence},
    options=DivergenceOptions,
    aliases={"divergence_layers": "layers"},
)
def run(ctx: EvalContext) -> dict[str, Any]:
    if not ctx.data.shifted:
        return skipped("no second dataset: the dataset has no shifted domain (use --domain)")
    cfg = ctx.config
    test = ctx.test_set()
    probe, _ = next(ctx.batches(test, batch_size=2))
    chosen = options_of(cfg, "divergence").layers
    layers = list(chosen or default_layers(ctx.model, probe))

    def moments_of(dataset: Any) -> dict[str, Any]:
        images = (x for x, _ in ctx.batches(dataset))
        found = layer_moments(ctx.model, images, layers)
        out = {}
        for name, m in found.items():
            mean, std = m.mean_std()
            out[name] = {"mean": mean.tolist(), "std": std.tolist()}
        return out

    reference = ctx.unit("divergence/moments/test", lambda: moments_of(test))
    pairs: dict[str, Any] = {}
    bar = ctx.bar(len(ctx.data.shifted), "divergence")
    try:
        for domain, dataset in ctx.data.shifted.items():
            subset = seeded_subset(dataset, cfg.max_images, cfg.seed)
            other = ctx.unit(f"divergence/moments/{domain}", functools.partial(moments_of, subset))
            per_layer = {}
            dead = {}
            for name in layers:
                a = (torch.tensor(reference[name]["mean"]), torch.tensor(reference[name]["std"]))
                b = (torch.tensor(other[name]["mean"]), torch.tensor(other[name]["std"]))
                per_layer[name] = symmetric_kl_divergence(a, b, rel_min_std=REL_MIN_STD)
                dead[name] = int(near_constant_channels(a, b, REL_MIN_STD).sum())
            pairs[f"test|{domain}"] = {"per_layer": per_layer, "excluded_channels": dead}
            bar.update(1)
    finally:
        bar.close()
    return {"layers": layers, "pairs": pairs, "rel_min_std": REL_MIN_STD}
