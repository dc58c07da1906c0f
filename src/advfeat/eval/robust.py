"""Robust accuracy, computed so that it can never exceed clean accuracy.

A test point counts as robust when the model classifies it correctly **both** clean and after
the attack. The clean point lies in every ε-ball, so an attack that "loses" a point the model
got wrong, or that returns a worse starting point, cannot make robust accuracy exceed clean
accuracy: robust ≤ clean holds by construction, not by luck.

The accuracy-vs-ε curve is made non-increasing the same way: the L∞ balls are nested, so an
adversarial example found at a smaller ε is also one at every larger ε; the curve reports, per
sample, the worst case over all ε' ≤ ε (:func:`worst_case_curve`). The raw per-ε PGD values are
reported next to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from advfeat.eval.context import EvalContext

__all__ = ["Outcome", "attack_outcome", "correct", "summarize", "worst_case_curve"]

AttackFn = Callable[[Tensor, Tensor], Tensor]
"""``attack(x, y) -> x_adv`` (an :class:`advfeat.attacks.base.Attack` or any callable)."""


@torch.no_grad()
def correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample top-1 correctness (bool) of ``model`` on ``x``."""
    return model(x).argmax(dim=1) == y


@dataclass
class Outcome:
    """Per-sample results of one attack: correct when clean, correct when attacked, L2 size."""

    clean: list[bool]
    adv: list[bool]
    l2: list[float]
    linf: list[float]

    def robust(self) -> list[bool]:
        return [c and a for c, a in zip(self.clean, self.adv, strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": [int(v) for v in self.clean],
            "adv": [int(v) for v in self.adv],
            "l2": [round(v, 6) for v in self.l2],
            "linf": [round(v, 6) for v in self.linf],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Outcome:
        return cls(
            [bool(v) for v in d["clean"]],
            [bool(v) for v in d["adv"]],
            [float(v) for v in d["l2"]],
            [float(v) for v in d["linf"]],
        )


def attack_outcome(
    ctx: EvalContext,
    attack: AttackFn,
    dataset: Dataset,
    desc: str,
    *,
    judge: nn.Module | None = None,
    observe: Callable[[Tensor, Tensor], None] | None = None,
) -> Outcome:
    """Attack every batch of ``dataset`` and judge clean and adversarial images.

    ``judge`` is the model whose accuracy is measured (default ``ctx.model``); it differs from
    the attacked model for transfer attacks. ``observe(x_adv, y)`` sees every adversarial batch
    (e.g. to record AFA's fusion weight).
    """
    judge = ctx.model if judge is None else judge
    clean: list[bool] = []
    adv: list[bool] = []
    l2: list[float] = []
    linf: list[float] = []
    bar = ctx.bar(ctx.num_batches(dataset), desc)
    try:
        for x, y in ctx.batches(dataset):
            x_adv = attack(x, y).detach()
            delta = (x_adv - x).flatten(1)
            clean += correct(judge, x, y).tolist()
            adv += correct(judge, x_adv, y).tolist()
            l2 += delta.norm(dim=1).tolist()
            linf += delta.abs().amax(dim=1).tolist()
            if observe is not None:
                observe(x_adv, y)
            bar.update(1)
    finally:
        bar.close()
    return Outcome(clean, adv, l2, linf)


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(outcome: Outcome) -> dict[str, Any]:
    """``accuracy`` = fraction correct clean AND attacked (≤ ``clean_accuracy`` always);
    ``attacked_accuracy`` = fraction correct on the attacked images alone (for reference)."""
    robust = outcome.robust()
    fooled = [c and not a for c, a in zip(outcome.clean, outcome.adv, strict=True)]
    l2_fooled = sorted(d for d, f in zip(outcome.l2, fooled, strict=True) if f)
    summary: dict[str, Any] = {
        "accuracy": _mean(robust),
        "clean_accuracy": _mean(outcome.clean),
        "attacked_accuracy": _mean(outcome.adv),
        "n": len(robust),
        "max_linf": max(outcome.linf, default=0.0),
    }
    if l2_fooled:
        summary["median_l2_fooled"] = l2_fooled[len(l2_fooled) // 2]
    return summary


def accuracy_within_l2(outcome: Outcome, budgets: list[float]) -> list[float]:
    """Accuracy at each L2 budget r of a minimum-norm attack (C&W): a sample counts as robust at
    r when it is correct clean and the attack did not fool it with a perturbation of L2 ≤ r
    (an upper bound on the true robust accuracy at r, as for any attack)."""
    return [
        _mean(
            [
                c and not (not a and d <= r)
                for c, a, d in zip(outcome.clean, outcome.adv, outcome.l2, strict=True)
            ]
        )
        for r in budgets
    ]


def worst_case_curve(eps: list[float], outcomes: list[Outcome]) -> dict[str, Any]:
    """Accuracy vs ε, non-increasing: a sample is robust at ε only if it survived every ε' ≤ ε.

    ``eps`` is increasing; ``outcomes[k]`` holds the attack at ``eps[k]`` on the same samples.
    """
    alive = list(outcomes[0].clean) if outcomes else []
    worst: list[float] = []
    pointwise: list[float] = []
    for outcome in outcomes:
        alive = [a and b for a, b in zip(alive, outcome.adv, strict=True)]
        worst.append(_mean(alive))
        pointwise.append(_mean(outcome.robust()))
    return {"eps": list(eps), "accuracy": worst, "pointwise_accuracy": pointwise}
