"""Pixel-space attacks: PGD, FGSM, I-FGSM, GD and Carlini–Wagner L2.

All attacks take images in ``[0, 1]`` (normalization lives inside the model), return images in
``[0, 1]``, and inherit the guarantees of :class:`advfeat.attacks.base.Attack` (input never
mutated, model flags / ``requires_grad`` / ``.grad`` / BN statistics untouched, explicit
``bn_mode`` and ``branch``).

* :class:`PGD` — projected gradient ascent (Madry et al. 2018) under L∞ or L2, with a random start.
* :class:`FGSM` — one step of size ε (Goodfellow et al. 2015).
* :class:`IFGSM` — I-FGSM / BIM (Kurakin et al. 2017): PGD without the random start (AdvProp
  Table 7, second modification).
* :class:`GD` — PGD without the projection onto the ε-ball (AdvProp Table 7, first modification).
* :class:`CWL2` — Carlini & Wagner (2017) L2 attack in tanh space, optimised with Adam.
* :func:`advprop_pgd` — AdvProp §5.1's PGD-n rule (ε ∈ {1, …}, n = ε + 1 except n = 1 at ε = 1,
  step size 1, all in 0–255 pixel units).

Adversarial-training papers (AFA Tab. 3, MART, TRADES) often report "C&W" at an L∞ budget: that
is PGD run on the C&W margin, ``PGD(model, eps=8/255, loss_fn=cw_margin_loss)``; :class:`CWL2` is
the original L2 minimisation attack.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from advfeat.attacks.base import Attack, AttackOptions, BNMode
from advfeat.attacks.engine import IterativeAscent
from advfeat.attacks.threat import (
    Budget,
    Linf,
    ThreatModel,
    Unbounded,
    as_batch_eps,
    check_budget,
    check_steps,
    threat_model,
)
from advfeat.errors import AdvfeatError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "CWL2",
    "FGSM",
    "GD",
    "IFGSM",
    "PGD",
    "IterativeGradientAttack",
    "advprop_pgd",
    "advprop_pgd_steps",
    "cw_margin_loss",
]


# --------------------------------------------------------------------------- argument checks
def _per_sample(value: Budget, like: Tensor, name: str) -> Tensor:
    """``value`` broadcast to ``(B, 1, …, 1)``; a wrong per-sample shape names ``name``."""
    try:
        return as_batch_eps(value, like)
    except AdvfeatError:
        shape = tuple(value.shape) if isinstance(value, Tensor) else ()
        raise AdvfeatError(
            f"per-sample {name} must have shape ({like.shape[0]},) to match the batch, got {shape}"
        ) from None


def _input_gradient(objective: Tensor, wrt: Tensor) -> Tensor:
    """∂ objective / ∂ wrt, with a clear error when the output does not depend on the input."""
    grad = None
    if objective.requires_grad:
        (grad,) = torch.autograd.grad(objective, wrt, allow_unused=True)
    if grad is None:
        raise AdvfeatError(
            "the attack objective does not depend on the input: the model or loss_fn cut the "
            "graph (torch.no_grad / inference_mode inside forward, .detach(), or a loss_fn that "
            "ignores the output)"
        )
    return grad


def _call_options(kwargs: dict[str, Any], accepted: tuple[str, ...]) -> dict[str, Any]:
    """Reject keyword arguments of ``attack(x, y, **kwargs)`` that the attack does not take."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no keyword arguments"
        raise AdvfeatError(f"unexpected attack argument(s) {', '.join(unknown)}; accepted: {takes}")
    return kwargs


def _into_box(x: Tensor, delta: Tensor) -> Tensor:
    """Shrink ``delta`` so that ``x + delta`` stays in [0, 1] (never leaves an ε-ball)."""
    return (x + delta).clamp(0, 1) - x


# --------------------------------------------------------------------------- losses
def cw_margin_loss(output: Tensor, target: Tensor) -> Tensor:
    """Carlini–Wagner margin ``max_{i≠t} Z_i − Z_t`` per sample (C&W 2017, objective f₆, κ = 0).

    Positive once the sample is misclassified. As a ``loss_fn``, untargeted attacks maximise it
    and targeted attacks minimise it (pushing ``Z_t`` above every other logit).
    """
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise AdvfeatError(f"the C&W margin needs logits of shape (B, classes), got {shape}")
    target_logit = output.gather(1, target.view(-1, 1)).squeeze(1)
    others = output.scatter(1, target.view(-1, 1), float("-inf"))
    return others.amax(dim=1) - target_logit


# --------------------------------------------------------------------------- PGD family
class IterativeGradientAttack(Attack):
    """Iterated steepest ascent with projection (:class:`~advfeat.attacks.engine.IterativeAscent`
    on the image): PGD, FGSM, I-FGSM and GD.

    δ₀ = random start in the ε-ball (or 0), then ``steps`` times
    δ ← Π_ε(δ + α·step(∇_δ L(f(x + δ), y))), clipped so that x + δ ∈ [0, 1]
    (Madry et al. 2018, Eq. 2.1; for L∞ the step is α·sign(∇)).
    Use the named subclasses; this class fixes no defaults.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threat: ThreatModel,
        eps: Budget,
        alpha: Budget,
        steps: int,
        random_start: bool,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(model, **options)
        self.threat = threat
        self.norm = threat.name
        self.eps = check_budget(eps, "eps") if threat.bounded else math.inf
        self.alpha = check_budget(alpha, "alpha")
        self.steps = check_steps(steps)
        self.random_start = bool(random_start)

    def initial_delta(self, x: Tensor, eps: Tensor, init: Tensor | None) -> Tensor:
        """δ₀: the given ``init``, a random start in the ball, or zero — always a feasible point."""
        if init is not None:
            if not isinstance(init, Tensor) or init.shape != x.shape:
                got = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
                raise AdvfeatError(
                    f"init must be a perturbation shaped like the images {tuple(x.shape)}, got {got}"
                )
            delta = init.detach().to(dtype=x.dtype, device=x.device)
        elif self.random_start:
            delta = self.threat.random_init(x, eps, self.generator(x.device))
        else:
            delta = torch.zeros_like(x)
        return _into_box(x, self.threat.project(delta, eps))

    def perturb(self, x: Tensor, y: Any, **kwargs: Any) -> Tensor:
        """Run the attack; the keyword ``init`` optionally gives the starting perturbation δ₀."""
        init = _call_options(kwargs, ("init",)).get("init")
        eps = _per_sample(self.eps, x, "eps")
        _per_sample(self.alpha, x, "alpha")  # a wrong per-sample shape names alpha
        engine = IterativeAscent(
            self.threat,
            alpha=self.alpha,
            eps=self.eps,
            steps=self.steps,
            constrain=lambda _name, delta: _into_box(x, delta),
            missing_gradient="error",
        )
        deltas = engine.run(
            lambda variable: self.objective(self.model(x + variable("x", x)), y),
            {"x": self.initial_delta(x, eps, init)},
        )
        return x + deltas["x"]

    def finalize(self, x: Tensor, result: Tensor) -> Tensor:
        """Project once more onto the ε-ball and into [0, 1] (the output invariant)."""
        delta = result - x
        if self.threat.bounded:
            delta = self.threat.project(delta, _per_sample(self.eps, x, "eps"))
        return (x + delta).clamp(0, 1)


class PGD(IterativeGradientAttack):
    """Projected gradient descent (Madry et al. 2018) under L∞ (``norm="linf"``) or L2.

    The random start is uniform in the L∞ ball (or uniform in radius along a random direction for
    L2) and drawn from the attack's own generator when ``seed`` is given: the generator is seeded
    once per attack object, so successive calls draw fresh starts and a new object with the same
    seed replays them (the global RNG is used when ``seed`` is None). ``eps`` and ``alpha``
    may be per-sample tensors of shape ``(B,)``. Call as ``x_adv = attack(x, y)``; with
    ``targeted=True``, ``y`` holds the target labels. ``attack(x, y, init=delta0)`` starts from a
    given perturbation instead of a random one.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: Budget = 8 / 255,
        alpha: Budget = 2 / 255,
        steps: int = 10,
        norm: str | ThreatModel = "linf",
        random_start: bool = True,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(
            model,
            threat=threat_model(norm),
            eps=eps,
            alpha=check_budget(alpha, "alpha", positive=True),
            steps=steps,
            random_start=random_start,
            **options,
        )


class FGSM(IterativeGradientAttack):
    """Fast gradient sign method (Goodfellow et al. 2015): x + ε·sign(∇ₓL), no random start.

    With ``norm="l2"`` it is the fast gradient method x + ε·∇ₓL/‖∇ₓL‖₂.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: Budget = 8 / 255,
        norm: str | ThreatModel = "linf",
        **options: Unpack[AttackOptions],
    ) -> None:
        eps = check_budget(eps, "eps")
        super().__init__(
            model,
            threat=threat_model(norm),
            eps=eps,
            alpha=eps,
            steps=1,
            random_start=False,
            **options,
        )


class IFGSM(IterativeGradientAttack):
    """I-FGSM / BIM (Kurakin et al. 2017): PGD started at δ = 0 (AdvProp Table 7)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: Budget = 8 / 255,
        alpha: Budget = 2 / 255,
        steps: int = 10,
        norm: str | ThreatModel = "linf",
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(
            model,
            threat=threat_model(norm),
            eps=eps,
            alpha=check_budget(alpha, "alpha", positive=True),
            steps=steps,
            random_start=False,
            **options,
        )


class GD(IterativeGradientAttack):
    """AdvProp's "GD" attacker (Table 7): PGD with the projection onto the ε-ball removed.

    ``steps`` sign-gradient steps of size ``alpha``; the result is only clipped to [0, 1].
    The paper keeps "the other hyper-parameters" but calls ε inapplicable, which we read as: no
    random start either (δ₀ = 0, the default). The other reading — PGD's uniform random start in
    an L∞ ball of radius ε before the unprojected steps — is ``init_eps=ε``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: Budget = 1 / 255,
        steps: int = 5,
        init_eps: Budget | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(
            model,
            threat=Unbounded(),
            eps=math.inf,
            alpha=check_budget(alpha, "alpha", positive=True),
            steps=steps,
            random_start=init_eps is not None,
            **options,
        )
        self.init_eps = None if init_eps is None else check_budget(init_eps, "init_eps")

    def initial_delta(self, x: Tensor, eps: Tensor, init: Tensor | None) -> Tensor:
        if init is None and self.init_eps is not None:
            radius = _per_sample(self.init_eps, x, "init_eps")
            init = Linf().random_init(x, radius, self.generator(x.device))
        return super().initial_delta(x, eps, init)


# --------------------------------------------------------------------------- AdvProp rule
def advprop_pgd_steps(eps_255: int) -> int:
    """AdvProp §5.1: n = ε + 1 attack iterations, except n = 1 for ε = 1 (ε in 0–255 units)."""
    if isinstance(eps_255, bool) or not isinstance(eps_255, int | float):
        raise AdvfeatError(f"eps_255 must be a whole number of pixel levels >= 1, got {eps_255!r}")
    if eps_255 != int(eps_255) or eps_255 < 1:
        raise AdvfeatError(f"eps_255 must be a whole number of pixel levels >= 1, got {eps_255!r}")
    level = int(eps_255)
    return 1 if level == 1 else level + 1


def advprop_pgd(model: nn.Module, eps_255: int, **kwargs: Any) -> PGD:
    """AdvProp's attacker (§5.1): L∞ PGD with ε = eps_255/255, step 1/255, n = ε + 1 steps.

    ε = 1 uses a single step (PGD1); ε = 4 gives PGD5 (footnote 1, Table 2), ε = 6 gives PGD7.
    The random start of PGD is kept (AdvProp Table 7 turns PGD into I-FGSM by removing it).
    ``kwargs`` are passed to :class:`PGD` (``loss_fn``, ``targeted``, ``bn_mode``, ``branch`` —
    AdvProp attacks through its auxiliary BN, ``branch="adv"`` — and ``seed``).
    """
    fixed = sorted({"eps", "alpha", "steps", "norm"} & kwargs.keys())
    if fixed:
        raise AdvfeatError(
            f"advprop_pgd fixes {', '.join(fixed)} by AdvProp's rule; use PGD(...) to choose them"
        )
    steps = advprop_pgd_steps(eps_255)
    return PGD(model, eps=int(eps_255) / 255, alpha=1 / 255, steps=steps, norm="linf", **kwargs)


# --------------------------------------------------------------------------- Carlini–Wagner
class CWL2(Attack):
    """Carlini & Wagner (2017) L2 attack: minimise ‖x′ − x‖₂² + c·f(x′) over w, x′ = (tanh w + 1)/2.

    f(x′) = max(Z_y − max_{i≠y} Z_i, −κ) untargeted, max(max_{i≠t} Z_i − Z_t, −κ) targeted
    (objective f₆), optimised with Adam (learning rate ``lr``) for ``steps`` iterations. A sample
    succeeds when its margin passes −κ; the result is, per sample, the successful iterate with the
    smallest L2 distance, or the last iterate if none succeeded. With ``search_steps > 1`` the
    constant ``c`` is tuned per sample by the paper's binary search (×10 until the first success,
    then bisection), restarting the optimisation each round. The model must return logits.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        c: float = 1.0,
        kappa: float = 0.0,
        steps: int = 100,
        lr: float = 0.01,
        search_steps: int = 1,
        targeted: bool = False,
        bn_mode: BNMode = "eval",
        branch: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, targeted=targeted, bn_mode=bn_mode, branch=branch, seed=seed)
        self.c = float(check_budget(c, "c", positive=True))
        self.kappa = float(check_budget(kappa, "kappa"))
        self.steps = check_steps(steps)
        self.lr = float(check_budget(lr, "lr", positive=True))
        self.search_steps = check_steps(search_steps, "search_steps")
        if self.search_steps < 1:
            raise AdvfeatError(f"search_steps must be >= 1, got {search_steps!r}")

    def _attack_margin(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample g with success ⇔ g < −κ (g = −margin untargeted, margin targeted)."""
        margin = cw_margin_loss(logits, y)
        return margin if self.targeted else -margin

    def perturb(self, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        _call_options(kwargs, ())
        if not isinstance(y, Tensor) or y.shape != x.shape[:1]:
            raise AdvfeatError("CWL2 needs one class label per image, a tensor of shape (B,)")
        batch = x.shape[0]
        w0 = torch.atanh((2 * x - 1) * (1 - 1e-6))
        const = torch.full((batch,), self.c, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, math.inf)
        best_l2 = torch.full_like(const, math.inf)
        best = x.clone()
        for _ in range(self.search_steps):
            last, succeeded = self._optimise(x, y, w0, const, best, best_l2)
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
        found = torch.isfinite(best_l2).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(found, best, last)

    def _optimise(
        self, x: Tensor, y: Tensor, w0: Tensor, const: Tensor, best: Tensor, best_l2: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One Adam run at constants ``const``; updates ``best``/``best_l2`` in place."""
        w = w0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=self.lr)
        succeeded = torch.zeros_like(const, dtype=torch.bool)
        x_adv = x
        for step in range(self.steps + 1):
            x_adv = (torch.tanh(w) + 1) / 2
            logits = self.model(x_adv)
            g = self._attack_margin(logits, y)
            l2_sq = (x_adv - x).flatten(1).pow(2).sum(dim=1)
            with torch.no_grad():
                success = g < -self.kappa
                l2 = l2_sq.sqrt()
                improved = success & (l2 < best_l2)
                best_l2.copy_(torch.where(improved, l2, best_l2))
                mask = improved.view(-1, *([1] * (x.ndim - 1)))
                best.copy_(torch.where(mask, x_adv, best))
                succeeded |= success
            if step == self.steps:
                break
            loss = (l2_sq + const * g.clamp_min(-self.kappa)).sum()
            w.grad = _input_gradient(loss, w)
            optimizer.step()
        return x_adv.detach(), succeeded

    def __repr__(self) -> str:
        return (
            f"CWL2(c={self.c!r}, kappa={self.kappa!r}, steps={self.steps!r}, lr={self.lr!r}, "
            f"search_steps={self.search_steps!r}, targeted={self.targeted!r}, "
            f"bn_mode={self.bn_mode!r}, branch={self.branch!r})"
        )
