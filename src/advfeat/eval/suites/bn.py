"""``bn``: the chosen suites again under every BN branch of a multi-branch model.

For models converted with :func:`advfeat.norm.convert_multibn` (AdvProp, AdvBN, AFA stage I) the
whole batch is routed through one branch at a time (:func:`advfeat.norm.use_branch`), e.g.
AdvProp's main BN vs its auxiliary BN, or AdvBN's "choose main or aux BN at inference".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from advfeat.eval.analysis_plots import plot_branches
from advfeat.eval.config import EvalConfig, names_of
from advfeat.eval.context import EvalContext
from advfeat.eval.report import md_table, pct, shift_mean
from advfeat.eval.suites.registry import (
    SUITES,
    options_of,
    ordered_suites,
    register_suite,
    skipped,
)
from advfeat.norm import BranchModel, branch_names, has_branches

__all__ = ["BranchModel", "run"]


@dataclass
class BnOptions:
    """Settings of the ``bn`` suite."""

    suites: tuple[str, ...] = ("clean", "attacks", "shift")
    """The suites run again under every BN branch (those registered with ``per_branch``)."""

    def validate(self, task: str) -> None:
        branchable = tuple(s.name for s in ordered_suites() if s.per_branch)
        self.suites = names_of(self.suites, "suite under each BN branch", branchable)


def ready(config: EvalConfig) -> list[str]:
    """The suites run under each branch must be ready themselves."""
    missing: list[str] = []
    for name in options_of(config, "bn").suites:
        check = SUITES.get(name).ready
        missing += check(config) if check is not None else []
    return missing


@register_suite(
    "bn",
    "the chosen suites under each BN branch of a multi-branch model",
    order=40,
    title="BN branches",
    report=lambda result, _task: _bn(result),
    plots={"bn_branches": plot_branches},
    ready=ready,
    options=BnOptions,
    aliases={"bn_suites": "suites"},
)
def run(ctx: EvalContext) -> dict[str, Any]:
    model = ctx.raw_model
    if not has_branches(model):
        return skipped(
            "the model has a single norm branch (not converted with convert_branches / "
            "convert_multibn)"
        )
    chosen = options_of(ctx.config, "bn").suites
    results: dict[str, Any] = {}
    for branch in branch_names(model):
        sub = ctx.child(BranchModel(model, branch).eval(), f"bn/{branch}")
        results[branch] = {name: SUITES.get(name).run(sub) for name in chosen}
    return {"branches": results, "suites": list(chosen)}


def _bn(bn: dict[str, Any]) -> list[str]:
    rows = []
    for name, res in bn["branches"].items():
        clean = res.get("clean", {}).get("top1")
        pgd = res.get("attacks", {}).get("pgd", {}).get("accuracy")
        _, shift = shift_mean(res.get("shift", {}))
        rows.append([name, pct(clean), pct(pgd), pct(shift)])
    return md_table(["BN branch", "clean top-1", "PGD", "mean shifted"], rows)
