"""The one iterative-attack engine: threat model × objective × steps.

Every sign-ascent attack of advfeat (pixel PGD / FGSM / I-FGSM / GD, feature PGD at one or
several sites, AdvBN's statistics attack, image PGD on detectors and segmenters) is
:class:`IterativeAscent`: perturbation variables δ (one per name: an image batch, a site, a
statistic), each updated ``steps`` times by

    δ ← constrain(Π_ε(δ + step_α(∇_δ objective)))

where ``step`` and ``Π`` come from the threat model (:mod:`advfeat.attacks.threat`: L∞ sign
steps and clamping, L2 normalised steps and radial projection, unbounded sign steps) and
``constrain`` is an optional extra feasibility map (pixel attacks keep ``x + δ`` in [0, 1]).
The attack supplies only the objective: a function that builds the attacked computation from the
current variables (Madry et al. 2018, Eq. 2.1; ALFA Eq. 4-5; A-FAN Eq. 3; AdvBN Alg. 1).

Precision (:mod:`advfeat.attacks.precision`): variables are created and stepped in float32 (or
wider) whatever the dtype of the tensor they are shaped like, so a bf16 feature under autocast
gets a float32 δ; under float16 autocast the objective is scaled before its backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from advfeat.attacks.precision import attack_loss_scale, wide_dtype
from advfeat.attacks.threat import ThreatModel, as_batch_eps
from advfeat.errors import AdvfeatError

__all__ = ["IterativeAscent", "Variable"]

Budget = float | Tensor
Variable = Callable[[str, Tensor], Tensor]
"""``variable(name, like)``: the current δ of ``name`` as a leaf requiring gradients (created
from the start rule, shaped like ``like``, the first time ``name`` is seen)."""

_NO_GRADIENT = (
    "the attack objective does not depend on the input: the model or loss_fn cut the "
    "graph (torch.no_grad / inference_mode inside forward, .detach(), or a loss_fn that "
    "ignores the output)"
)


class IterativeAscent:
    """Projected steepest ascent on named perturbation variables (see the module docstring).

    Args:
        threat: the threat model (step, projection, random start).
        alpha: step size, a number or a per-sample ``(B,)`` tensor (dimension 0 of a variable).
        eps: radius of the ball (ignored by unbounded threat models).
        steps: number of ascent steps.
        random_start: new variables start at a random point of the ball (else at 0).
        generator: random generator of the start (``None``: the global RNG).
        constrain: ``constrain(name, delta) -> delta`` applied after each projection (and to the
            start), e.g. to keep ``x + δ`` a valid image.
        missing_gradient: ``"zero"`` — a variable the objective does not reach gets a zero step
            (a site whose strength is 0); ``"error"`` — raise (a pixel attack whose model cuts
            the graph).
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        alpha: Budget,
        eps: Budget | None,
        steps: int,
        random_start: bool = False,
        generator: torch.Generator | None = None,
        constrain: Callable[[str, Tensor], Tensor] | None = None,
        missing_gradient: Literal["zero", "error"] = "zero",
    ) -> None:
        self.threat = threat
        self.alpha = alpha
        self.eps: Budget = math.inf if eps is None or not threat.bounded else eps
        self.steps = steps
        self.random_start = random_start
        self.generator = generator
        self.constrain = constrain
        self.missing_gradient = missing_gradient

    def budget(self, value: Budget, like: Tensor) -> Tensor:
        """``value`` broadcast against ``like`` (a number, or one value per row of dimension 0)."""
        return as_batch_eps(value, like)

    def feasible(self, name: str, delta: Tensor, eps: Tensor | None = None) -> Tensor:
        """Π_ε(δ), then ``constrain``: the closest allowed perturbation (``eps``: the radius
        already broadcast against ``delta``, else :meth:`budget` of ``self.eps``)."""
        radius = self.budget(self.eps, delta) if eps is None else eps
        delta = self.threat.project(delta, radius)
        return self.constrain(name, delta) if self.constrain is not None else delta

    def start(self, name: str, like: Tensor) -> Tensor:
        """δ₀ of a new variable: a random point of the ball or zero, made feasible; in float32
        (or ``like``'s dtype when wider), so that small steps are not rounded away."""
        wide = wide_dtype(like.dtype)
        if like.dtype != wide:
            like = like.detach().to(wide)
        if self.random_start and self.threat.bounded:
            delta = self.threat.random_init(like, self.budget(self.eps, like), self.generator)
        else:
            delta = torch.zeros_like(like)
        return self.feasible(name, delta)

    def run(
        self,
        objective: Callable[[Variable], Tensor],
        init: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Ascend ``objective`` for ``steps`` steps; return the final δ of every variable.

        ``objective(variable)`` runs the attacked computation, calling ``variable(name, like)``
        wherever δ of ``name`` enters, and returns the scalar to ascend. ``init`` gives starting
        perturbations (used as given: make them feasible first); the others start by the rule.
        """
        deltas = {k: v.detach() for k, v in (init or {}).items()}
        budgets: dict[str, tuple[Tensor, Tensor]] = {}  # (α, ε) of each variable, built once
        for _ in range(self.steps):
            leaves: dict[str, Tensor] = {}

            def variable(name: str, like: Tensor, leaves: dict[str, Tensor] = leaves) -> Tensor:
                if name not in deltas:
                    deltas[name] = self.start(name, like.detach())
                if name not in leaves:
                    leaves[name] = deltas[name].detach().requires_grad_(True)
                return leaves[name]

            value = objective(variable)
            if not leaves:
                raise AdvfeatError("the attack objective used none of its perturbation variables")
            grads: tuple[Tensor | None, ...] = (None,) * len(leaves)
            if value.requires_grad:
                grads = _gradients(value, list(leaves.values()))
            for (name, leaf), grad in zip(leaves.items(), grads, strict=True):
                if grad is None:
                    if self.missing_gradient == "error":
                        raise AdvfeatError(_NO_GRADIENT)
                    grad = torch.zeros_like(leaf)
                if name not in budgets:
                    budgets[name] = (self.budget(self.alpha, leaf), self.budget(self.eps, leaf))
                alpha, eps = budgets[name]
                deltas[name] = self.feasible(
                    name, leaf.detach() + self.threat.step(grad, alpha), eps
                )
        return deltas


def _gradients(value: Tensor, leaves: list[Tensor]) -> tuple[Tensor | None, ...]:
    """∇ of ``value`` with respect to ``leaves``; under float16 autocast of ``value * scale``
    (:func:`advfeat.attacks.precision.attack_loss_scale`), the scale divided by 2¹⁰ and the
    backward run again while a gradient overflows. Only the direction of the result is used."""
    scale = attack_loss_scale(value.device.type)
    if scale == 1.0:
        return torch.autograd.grad(value, leaves, allow_unused=True)
    while True:
        grads = torch.autograd.grad(value * scale, leaves, allow_unused=True, retain_graph=True)
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        if finite or scale <= 1.0:
            return grads
        scale = max(scale / 2.0**10, 1.0)
