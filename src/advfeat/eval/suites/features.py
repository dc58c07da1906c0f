"""``features``: clean / perturbed / re-normalized feature maps of a few test images
(A-FAN Fig. S6), stored in the results for the feature-map plot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from advfeat.eval.config import POSITIVE
from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.feature_maps import feature_grid
from advfeat.eval.plots import plot_feature_maps
from advfeat.eval.suites.registry import options_of, register_suite, skipped
from advfeat.options import Integer, Text, option
from advfeat.sites import first_stage

__all__ = ["default_site", "run"]


def default_site(model: nn.Module) -> str | None:
    """The first residual stage (``layer1``), as in the paper's figure, or a ViT's first block
    (:func:`advfeat.sites.first_stage`); else the first child with parameters.

    A wrapper holding the network as its child ``model`` (AFA, BN-branch views) is looked into.
    """
    names = [n for n, _ in model.named_children()]
    if "model" in names and "layer1" not in names:
        inner = default_site(model.get_submodule("model"))
        return None if inner is None else f"model.{inner}"
    first = first_stage(model)
    if first is not None:
        return first
    for name, child in model.named_children():
        if name != "normalize" and any(True for _ in child.parameters()):
            return name
    return None


def report(f: dict[str, Any], _task: str) -> list[str]:
    """The site and feature attack of the saved feature maps."""
    return [
        f"Site `{f['site']}`, feature attack α = {f['alpha']:g} × {f['steps']} step(s), shown ×{f['magnify']:g}.",
        "",
    ]


@dataclass
class FeatureOptions:
    """Settings of the ``features`` suite (A-FAN Fig. S6)."""

    site: str | None = option(None, Text(optional=True))
    """The site whose maps are shown (default: the end of the first stage)."""
    alpha: float = option(0.01, POSITIVE)
    steps: int = option(1, Integer(low=1))
    images: int = option(4, Integer(low=1))
    magnify: float = option(20.0, POSITIVE)
    """How much the perturbation is magnified in the picture."""


@register_suite(
    "features",
    "clean / perturbed / re-normalized feature maps (A-FAN Fig. S6)",
    order=70,
    title="Feature maps (A-FAN Fig. S6)",
    report=report,
    report_skipped=False,
    plots={"feature_maps": plot_feature_maps},
    options=FeatureOptions,
    aliases={f"feature_{key}": key for key in ("site", "alpha", "steps", "images", "magnify")},
)
def run(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.config
    opts: FeatureOptions = options_of(cfg, "features")
    site = opts.site or default_site(ctx.model)
    if site is None:
        return skipped("no feature site found; set feature_site (e.g. layer1)")
    subset = seeded_subset(ctx.data.test, opts.images, cfg.seed)
    x, y = next(ctx.batches(subset, batch_size=opts.images))

    def compute() -> dict[str, Any]:
        return feature_grid(
            ctx.model,
            x,
            y,
            site,
            alpha=opts.alpha,
            steps=opts.steps,
            magnify=opts.magnify,
        )

    return ctx.unit("features", compute)
