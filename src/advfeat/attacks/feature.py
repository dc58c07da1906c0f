"""Feature-space attacks: perturb the output of a feature site instead of the image.

* :class:`FeaturePGD` — PGD on an intermediate feature (ALFA Eq. 4; A-FAN Eq. 3). With
  ``eps=None`` the ε-ball is dropped and PGD becomes plain sign-gradient ascent, the setting of
  every ALFA and A-FAN experiment ("we set ... ϵ to be unbounded", ALFA §3.2).
* :func:`sample_strengths` — A-FAN's k perturbation strengths (A-FAN Eq. 5, Algorithm 1); the
  rescaling of one PGD-1 step to the k strengths (appendix S1.1) is
  :meth:`advfeat.methods.afan.AFAN.perturbations`.
* :class:`MultiSiteFeaturePGD` — L-ALFA's perturbations at r sites scaled by strengths η
  (ALFA Eq. 5, Algorithm 1).
* :class:`BNStatsAttack` — AdvBN's PGD on per-channel multipliers of the feature's batch mean
  and standard deviation (AdvBN Eq. 1-2, Algorithm 1).

Every attack runs only the part of the network after the site (:class:`advfeat.sites.SiteSplit`,
or the ``tail=`` a task gives, e.g. a detector's box predictor and losses) and, when called with
``feature=`` (the site output captured in the clean pass), never recomputes the part before it.
The ascent is the shared engine (:class:`advfeat.attacks.engine.IterativeAscent`). All of them
keep the feature-attack contract of :class:`FeatureAttack` (a detached, finite result shaped like
the feature, in its ε-ball, one per site for multi-site attacks) and the guarantees of
:class:`advfeat.attacks.base.Attack` (train/eval flags, ``requires_grad`` flags, parameter
``.grad`` and BN running statistics untouched; ``bn_mode`` and ``branch`` say how the tail
runs). Build training features from the results with :func:`add_perturbation` (``f + δ``).

Precision: δ is float32 (or the feature's dtype when wider) and ``f + δ`` is added in float32,
also for a bf16 feature under autocast (:mod:`advfeat.attacks.precision`: at ALFA's α = 0.5/255
a bf16 δ or ``f + δ`` rounds back to ``f``).
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from advfeat.attacks.base import (
    Attack,
    AttackOptions,
    attack_guard,
    finite_checks_deferred,
)
from advfeat.attacks.engine import IterativeAscent, Variable
from advfeat.attacks.precision import add_perturbation, perturbed_dtype, wide_dtype
from advfeat.attacks.threat import (
    ThreatModel,
    Unbounded,
    as_batch_eps,
    check_budget,
    check_steps,
    threat_model,
)
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.layouts import FeatureLayout
from advfeat.sites import (
    SiteSplit,
    capture_features,
    check_disjoint_sites,
    resolve_site,
    site_order,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "BNStatsAttack",
    "FeatureAttack",
    "FeaturePGD",
    "MultiSiteFeaturePGD",
    "add_perturbation",
    "advbn_feature",
    "sample_strengths",
]

Strength = float | Tensor
"""A number, or one number per sample (shape ``(B,)``)."""


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _check_strength(name: str, value: Strength | None, *, positive: bool) -> None:
    """:func:`~advfeat.attacks.threat.check_budget`, with ``None`` (unbounded) accepted."""
    if value is not None:
        check_budget(value, name, positive=positive)


def _feature_threat(norm: str | ThreatModel, eps: Strength | None) -> ThreatModel:
    """``eps=None`` → :class:`Unbounded` (sign steps, no projection); else the norm's ball."""
    threat = threat_model(norm)
    if eps is None:
        if threat.name in ("linf", "unbounded"):
            return Unbounded()
        raise AdvfeatError(
            f"eps=None means unbounded sign-gradient steps (ALFA §3.2), which needs "
            f"norm='linf' or 'unbounded'; got norm={threat.name!r} — give eps for an l2 ball"
        )
    if not threat.bounded:
        raise AdvfeatError("norm='unbounded' has no ε-ball: leave eps=None")
    return threat


def _as_tensor_feature(feature: Any, site: str) -> Tensor:
    if not isinstance(feature, Tensor):
        raise AdvfeatError(
            f"feature attacks perturb a tensor; site {site!r} outputs {type(feature).__name__}"
        )
    return feature


Tail = Callable[[Tensor], Any]
"""``tail(feature) -> output``: what follows a site when it outputs ``feature``."""
JointTail = Callable[[str, Tensor, Mapping[str, Callable[[Tensor], Tensor]]], Any]
"""``tail(site, feature, later) -> output``: what follows ``site`` when it outputs ``feature``,
the later sites replaced by ``later`` (a task's clean pass, :meth:`advfeat.tasks.TaskPass.joint_tail`)."""


class FeatureAttack(Attack):
    """Base of attacks on the output of feature sites, and the feature-attack contract.

    Call as ``attack(x, y, feature=None)``. ``x`` is the model input (only used to compute the
    feature when ``feature`` is not given, or by the full-model fallback of a model that cannot
    be split); ``feature`` is the site's output from the clean pass. Multi-site attacks are
    called with ``features={site: f}`` and return one result per site.

    The contract, enforced here once for every feature attack (:meth:`enforce`), besides the
    guarantees of :class:`~advfeat.attacks.base.Attack` (flags, ``requires_grad``, ``.grad``
    and BN statistics restored; explicit ``bn_mode`` and ``branch``):

    * the result is detached, a tensor of the feature's shape and device; a perturbation in
      float32 (or the feature's dtype when wider), an adversarial feature in the dtype of
      ``f + δ`` (:func:`~advfeat.attacks.precision.perturbed_dtype`: float32 under autocast);
    * it is finite whenever the clean feature is (left to the caller inside
      :func:`~advfeat.attacks.base.deferred_finite_checks`: the trainer watches the loss);
    * a perturbation (``returns == "delta"``) lies in the threat model's ε-ball (``eps=None``:
      unbounded); an adversarial feature (``returns == "feature"``, AdvBN) is what the
      attack's own constraint allows (:class:`BNStatsAttack`: multipliers in [1 − ε, 1 + ε]);
    * the clean feature and the input are never written to.

    ``tail``: what follows the site (default: :meth:`advfeat.sites.SiteSplit.tail` of the
    model); a task passes its own continuation (e.g. a detector's box head and losses), whose
    output goes to ``loss_fn``.
    """

    returns: str = "delta"

    def __init__(
        self,
        model: nn.Module,
        site: str,
        *,
        tail: Tail | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(model, **options)
        resolve_site(model, site)
        self.site = site
        self.sites = [site]
        self.split = SiteSplit(model, site)
        self.custom_tail = tail
        self.eps: Strength | None = None
        self.threat: ThreatModel = Unbounded()

    def __call__(self, x: Any, y: Any, feature: Tensor | None = None, **kwargs: Any) -> Tensor:
        if kwargs:
            raise AdvfeatError(
                f"{type(self).__name__} takes (x, y, feature=None); unexpected "
                f"{', '.join(sorted(kwargs))}"
            )
        given = {} if feature is None else {self.site: feature}
        return self.attack_sites(x, y, given)[self.site]

    def attack_sites(
        self, x: Any, y: Any, features: Mapping[str, Tensor], **options: Any
    ) -> dict[str, Tensor]:
        """Run the attack in the guard and enforce the contract; ``{site: result}``."""
        self.validate(x)
        clean = {s: _as_tensor_feature(f, s).detach() for s, f in features.items()}
        with (
            attack_guard(self.model, bn_mode=self.bn_mode, branch=self.branch),
            torch.enable_grad(),
        ):
            results = self.perturb(_detach(x), _detach(y), features=clean, **options)
        return {s: self.enforce(s, results[s], clean.get(s)) for s in self.sites}

    def enforce(self, site: str, result: Tensor, feature: Tensor | None) -> Tensor:
        """The contract on one site's result (class docstring); returns it detached."""
        result = result.detach()
        if feature is not None:
            dtype = (
                wide_dtype(feature.dtype) if self.returns == "delta" else perturbed_dtype(feature)
            )
            if result.shape != feature.shape or result.dtype != dtype:
                raise AdvfeatError(
                    f"{type(self).__name__} returned {result.dtype} {tuple(result.shape)} for "
                    f"site {site!r}, whose feature is {feature.dtype} {tuple(feature.shape)} "
                    f"(expected {dtype})"
                )
        if not finite_checks_deferred() and self._non_finite_from_finite(result, feature):
            raise AdvfeatError(
                f"{type(self).__name__} produced non-finite values at site {site!r} from a "
                f"finite feature (the loss gradient through the tail is NaN or infinite)"
            )
        if self.returns == "delta" and self.eps is not None and self.threat.bounded:
            result = self.threat.project(result, as_batch_eps(self.eps, result))
        return result

    @staticmethod
    def _non_finite_from_finite(result: Tensor, feature: Tensor | None) -> bool:
        """Whether ``result`` holds NaN / inf although ``feature`` (when given) does not (one
        copy to the host; the feature is read only when the result is not finite)."""
        if bool(torch.isfinite(result).all()):
            return False
        return feature is None or bool(torch.isfinite(feature).all())

    def validate(self, x: Any) -> None:
        """The model input is passed through untouched; nothing to check here."""

    def run_tail(self, feature: Tensor, x: Any) -> Any:
        """The output of what follows the site when it outputs ``feature``."""
        if self.custom_tail is not None:
            return self.custom_tail(feature)
        return self.split.tail(feature, x=x)

    def site_feature(self, x: Any, feature: Tensor | None) -> Tensor:
        """The clean feature: ``feature`` when given, else the head run on ``x`` (no grad)."""
        if feature is not None:
            return feature
        if x is None:
            raise AdvfeatError(f"{type(self).__name__} needs the input x or feature=...")
        with torch.no_grad():
            return _as_tensor_feature(self.split.head(x), self.site).detach()

    def configure_ascent(
        self,
        *,
        alpha: Strength,
        steps: int,
        eps: Strength | None,
        norm: str | ThreatModel,
        random_start: bool,
    ) -> None:
        """Check and keep the settings of sign-step PGD on features (:class:`FeaturePGD`,
        :class:`MultiSiteFeaturePGD`): step ``alpha``, ``steps`` steps (at least one), radius
        ``eps`` under ``norm`` (``None``: unbounded sign steps) and the random start."""
        _check_strength("alpha", alpha, positive=True)
        _check_strength("eps", eps, positive=False)
        check_steps(steps, minimum=1)
        self.alpha = alpha
        self.steps = steps
        self.eps = eps
        self.threat = _feature_threat(norm, eps)
        self.norm = self.threat.name
        self.random_start = random_start

    def ascent(self, alpha: Strength, steps: int, random_start: bool) -> IterativeAscent:
        """The engine under this attack's threat model (unbounded sign steps for ε = None)."""
        return IterativeAscent(
            self.threat,
            alpha=alpha,
            eps=self.eps,
            steps=steps,
            random_start=random_start,
            generator=None,
        )

    @abstractmethod
    def perturb(  # type: ignore[override]
        self, x: Any, y: Any, features: Mapping[str, Tensor], **options: Any
    ) -> dict[str, Tensor]:
        """``{site: result}`` (called inside the guard; ``features`` are detached)."""


def _scaled(variable: Variable, site: str, feature: Tensor, scale: Strength | float) -> Tensor:
    """``f + η·δ``: the perturbed feature of ALFA Eq. 4 (η = 1) and Eq. 5, added in float32."""
    return add_perturbation(feature, variable(site, feature), scale)


class FeaturePGD(FeatureAttack):
    """PGD on the output of ``site`` (ALFA Eq. 4, A-FAN Eq. 2-3 applied to a feature).

    ``δ_{t+1} = Π_ε[δ_t + α·sgn(∇_δ L(tail(f + δ_t), y))]``, the gradient taken only through the
    part of the network after the site. ``eps=None`` (default) drops the projection: ALFA and
    A-FAN use unbounded ε, i.e. ``steps`` plain sign-gradient steps of size α. With ``eps`` the
    perturbation stays in the ``norm`` ball (``"linf"`` or ``"l2"``); ``eps`` and ``alpha`` may
    be per-sample ``(B,)`` tensors.

    Returns the perturbation δ (same shape as the feature); the adversarial feature is ``f + δ``.
    Pass ``feature=`` (captured in the clean pass) so that only the tail runs.
    """

    def __init__(
        self,
        model: nn.Module,
        site: str,
        *,
        alpha: Strength,
        steps: int = 1,
        eps: Strength | None = None,
        norm: str | ThreatModel = "linf",
        random_start: bool = False,
        tail: Tail | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(model, site, tail=tail, **options)
        self.configure_ascent(
            alpha=alpha, steps=steps, eps=eps, norm=norm, random_start=random_start
        )

    def perturb(  # type: ignore[override]
        self, x: Any, y: Any, features: Mapping[str, Tensor], **options: Any
    ) -> dict[str, Tensor]:
        f = self.site_feature(x, features.get(self.site))
        engine = self.ascent(self.alpha, self.steps, self.random_start)
        engine.generator = self.generator(f.device)
        return engine.run(
            lambda var: self.objective(self.run_tail(_scaled(var, self.site, f, 1.0), x), y)
        )


# ------------------------------------------------------------------------------ A-FAN


def sample_strengths(
    k: int,
    alpha_max: float,
    generator: torch.Generator | None = None,
    *,
    spacing: Literal["random", "grid"] = "random",
    device: torch.device | str | None = None,
) -> Tensor:
    """A-FAN's k perturbation strengths in ``(0, alpha_max]`` (A-FAN Eq. 5, Algorithm 1 line 2).

    Reading of the paper: Eq. 5 approximates the integral of Eq. 4 over ε ∈ [0, E] by k strengths
    "uniformly sampled" from the interval; with PGD-1 and unbounded ε the strength *is* the step
    size (appendix S1.1, "step size α is the only indicator for perturbation strength"), so
    ``alpha_max`` is the paper's α (e.g. 0.5/255, "three different strengths uniformly sampled
    from [0, α]", §4). ``spacing="random"`` (default) draws k i.i.d. uniform values, redrawn at
    every call; ``spacing="grid"`` is the other reading, the fixed grid ``alpha_max·i/k``,
    i = 1..k. Zero is excluded (a zero strength is no augmentation and cannot serve as the
    reference strength of A-FAN's S1.1 rescaling). Returns a tensor of shape ``(k,)`` on
    ``device`` (default the CPU; drawn there, so that a captured training step draws new ones).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AdvfeatError(f"k (number of strengths) must be an integer >= 1, got {k!r}")
    _check_strength("alpha_max", alpha_max, positive=True)
    if spacing == "grid":
        grid = alpha_max * torch.arange(1, k + 1, dtype=torch.float64).float() / k
        return grid.to(device or "cpu")
    if spacing != "random":
        raise unknown_name("strength spacing", str(spacing), ["random", "grid"])
    u = torch.rand(k, generator=generator, dtype=torch.float64, device=device)
    return (alpha_max * (1.0 - u)).float()


# ------------------------------------------------------------------------------ L-ALFA


class MultiSiteFeaturePGD(FeatureAttack):
    """L-ALFA's feature perturbations at r sites with strengths η (ALFA Eq. 5, Algorithm 1).

    Site i receives ``f_i + η_i·δ^(i)``; δ^(i) is ascended with ``α·sgn(∇_{δ^(i)} L)`` (so its
    gradient carries the factor η_i: a site with η_i = 0 is not perturbed) and projected onto the
    ε-ball (``eps=None``: unbounded, the paper's setting). ``strengths`` (η, one per site, in the
    order of ``sites``) may be given here or per call (L-ALFA learns η; pass its current value).

    Two readings of Eq. 5, chosen by ``mode``:

    * ``"joint"`` (default; Figure 1: one adversarial pass with several perturbed features):
      all sites are perturbed in the same forward pass, which starts at the earliest site and
      runs only the tail after it, the later sites being replaced inside that tail. One
      adversarial loss ``L(f_1 + η_1δ_1, ..., f_r + η_rδ_r)``.
    * ``"separate"`` (Eq. 5 taken literally, one max per term of the sum): each site is attacked
      alone, the others clean, through the tail after that site; r adversarial losses.

    ``__call__(x, y, features=None, strengths=None, tail=None)`` returns ``{site: δ}`` (names as
    given); ``tail`` runs what follows a site (a task's clean pass; default the model's
    :meth:`~advfeat.sites.SiteSplit.tail`). The training pass(es) on the perturbed features are
    the method's (:func:`advfeat.methods.feature_aug.multi_site_outputs`).
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[str],
        *,
        alpha: Strength,
        steps: int = 1,
        eps: Strength | None = None,
        norm: str | ThreatModel = "linf",
        strengths: Sequence[float] | Tensor | None = None,
        mode: Literal["joint", "separate"] = "joint",
        random_start: bool = False,
        **options: Unpack[AttackOptions],
    ) -> None:
        if isinstance(sites, str) or not sites:
            raise AdvfeatError(f"sites must be a non-empty list of site names, got {sites!r}")
        super().__init__(model, sites[0], **options)
        self.sites = list(sites)
        check_disjoint_sites(model, self.sites)
        if mode not in ("joint", "separate"):
            raise unknown_name("multi-site mode", str(mode), ["joint", "separate"])
        self.configure_ascent(
            alpha=alpha, steps=steps, eps=eps, norm=norm, random_start=random_start
        )
        self.mode = mode
        self.strengths = None if strengths is None else self._strength_map(strengths)
        self._order: list[str] | None = None

    def _strength_map(self, strengths: Sequence[float] | Tensor) -> dict[str, Tensor | float]:
        values = (
            list(strengths.reshape(-1).unbind(0))
            if isinstance(strengths, Tensor)
            else list(strengths)
        )
        if len(values) != len(self.sites):
            raise AdvfeatError(
                f"strengths must hold one value per site ({len(self.sites)}), got {len(values)}"
            )
        return {s: values[i] for i, s in enumerate(self.sites)}

    def ordered_sites(self, x: Any = None) -> list[str]:
        """The sites in the order they run (read once from a trace, or a forward pass on x)."""
        if self._order is None:
            self._order = site_order(self.model, self.sites, x)
        return self._order

    def __call__(  # type: ignore[override]
        self,
        x: Any,
        y: Any,
        features: Mapping[str, Tensor] | None = None,
        strengths: Sequence[float] | Tensor | None = None,
        tail: JointTail | None = None,
    ) -> dict[str, Tensor]:
        scales = self.scales(strengths, detach=True)
        return self.attack_sites(x, y, features or {}, scales=scales, tail=tail)

    def scales(
        self, strengths: Sequence[float] | Tensor | None, *, detach: bool
    ) -> dict[str, Tensor | float]:
        """η per site: ``strengths`` (or the attack's own, or 1), detached when asked."""
        chosen = self._strength_map(strengths) if strengths is not None else self.strengths
        if chosen is None:
            return dict.fromkeys(self.sites, 1.0)
        return {s: _detach(v) if detach else v for s, v in chosen.items()}

    def _clean_features(
        self, x: Any, features: Mapping[str, Tensor], needed: list[str]
    ) -> dict[str, Tensor]:
        missing = [s for s in needed if s not in features]
        if not missing:
            return {s: features[s] for s in needed}
        if x is None:
            raise AdvfeatError(f"features for sites {missing} were not given and x is None")
        # copies: the rest of the forward may write into a site's output (`out += identity`)
        with (
            torch.no_grad(),
            capture_features(self.model, missing, detach=True, clone=True) as got,
        ):
            self.model(*(x if isinstance(x, tuple) else (x,)))
        out = dict(features)
        for s in missing:
            out[s] = _as_tensor_feature(got[s], s)
        return {s: out[s] for s in needed}

    def perturb(  # type: ignore[override]
        self,
        x: Any,
        y: Any,
        features: Mapping[str, Tensor],
        scales: Mapping[str, Tensor | float] | None = None,
        tail: JointTail | None = None,
        **options: Any,
    ) -> dict[str, Tensor]:
        scales = scales or dict.fromkeys(self.sites, 1.0)
        engine = self.ascent(self.alpha, self.steps, self.random_start)
        if self.mode == "joint":
            first, *rest = self.ordered_sites(x)
            f = self._clean_features(x, features, [first])[first]
            engine.generator = self.generator(f.device)
            split = SiteSplit(self.model, first)

            def joint(var: Variable) -> Tensor:
                later = {s: functools.partial(_scaled, var, s, scale=scales[s]) for s in rest}
                start = _scaled(var, first, f, scales[first])
                out = tail(first, start, later) if tail else split.tail(start, later, x=x)
                return self.objective(out, y)

            return engine.run(joint)
        clean = self._clean_features(x, features, self.sites)
        deltas: dict[str, Tensor] = {}
        for s in self.sites:
            engine.generator = self.generator(clean[s].device)
            split_s = SiteSplit(self.model, s)

            def alone(var: Variable, s: str = s, split_s: SiteSplit = split_s) -> Tensor:
                start = _scaled(var, s, clean[s], scales[s])
                out = tail(s, start, {}) if tail else split_s.tail(start, x=x)
                return self.objective(out, y)

            deltas.update(engine.run(alone))
        return deltas


# ------------------------------------------------------------------------------ AdvBN


def _advbn_layout(feature: Tensor, layout: FeatureLayout | None, channel_dim: int) -> FeatureLayout:
    """``layout``, or the layout whose channels are at ``channel_dim`` (1: (N, C, ...); the last
    dimension: (N, ..., C))."""
    if layout is not None:
        return layout
    dim = channel_dim % feature.ndim
    if dim == 1:
        return FeatureLayout("channels_first")
    if dim == feature.ndim - 1:
        return FeatureLayout("channels_last" if feature.ndim > 3 else "tokens")
    raise AdvfeatError(
        f"channel_dim must be 1 or the last dimension, got {channel_dim} for a feature of shape "
        f"{tuple(feature.shape)}; give layout= instead"
    )


def _channel_mean(feature: Tensor, stats: str, layout: FeatureLayout) -> Tensor:
    layout.check(feature)
    if stats not in ("batch", "instance"):
        raise unknown_name("AdvBN statistics", str(stats), ["batch", "instance"])
    dims = layout.reduce_dims(feature.ndim, per_sample=stats == "instance")
    if not dims:
        raise AdvfeatError(
            f"stats='instance' needs features with spatial dimensions beyond batch and "
            f"channel, got shape {tuple(feature.shape)}"
        )
    return layout.statistics_part(feature).mean(dim=dims, keepdim=True)


def advbn_feature(
    feature: Tensor,
    delta_mu: Tensor,
    delta_sigma: Tensor,
    *,
    stats: Literal["batch", "instance"] = "batch",
    channel_dim: int = 1,
    layout: FeatureLayout | None = None,
) -> Tensor:
    """AdvBN's re-normalized feature ``δ_σ·(f − μ(f)) + δ_μ·μ(f)`` (AdvBN Eq. 1-2).

    ``μ(f)`` is the per-channel batch mean, as in batch norm (``stats="batch"``, the paper: "one
    scalar entry per channel, similarly to Batch Normalization", "acts on a per-batch basis");
    ``stats="instance"`` uses per-sample channel means instead (AdaIN-style, the other reading).
    σ(f) cancels in Eq. 1, so it never needs computing. ``delta_mu`` and ``delta_sigma`` hold one
    multiplier per channel. Differentiable in all three arguments. The channels are where
    ``layout`` (:class:`advfeat.layouts.FeatureLayout`) says, or at ``channel_dim`` when it is
    not given; the mean of a tokens feature leaves its prefix (class) tokens out, the
    multipliers apply to every token.
    """
    layout = _advbn_layout(feature, layout, channel_dim)
    channels = layout.channels(feature)
    for name, m in (("delta_mu", delta_mu), ("delta_sigma", delta_sigma)):
        if m.numel() != channels:
            raise AdvfeatError(
                f"{name} must hold one multiplier per channel ({channels}), got shape "
                f"{tuple(m.shape)}"
            )
    mu = _channel_mean(feature, stats, layout)
    d_mu = layout.broadcast(delta_mu, feature)
    d_sigma = layout.broadcast(delta_sigma, feature)
    return d_sigma * (feature - mu) + d_mu * mu


class BNStatsAttack(FeatureAttack):
    """AdvBN: PGD on per-channel multipliers of the feature statistics (AdvBN Eq. 2, Alg. 1).

    ``(δ_μ, δ_σ) = argmax L(tail(δ_σ·(f − μ(f)) + δ_μ·μ(f)), y)`` subject to
    ``‖δ_μ − 1‖∞ ≤ ε`` and ``‖δ_σ − 1‖∞ ≤ ε``, solved by ``steps`` (m) sign steps of size
    ``alpha`` (τ), each followed by ``clip(δ, 1 − ε, 1 + ε)``. Algorithm 1 leaves the
    initialization open; here δ starts at 1 (the clean feature), or uniformly in [1 − ε, 1 + ε]
    with ``random_start=True``. Defaults are the paper's ImageNet setting (§5.1: τ = 0.2, m = 6,
    ε = m·τ − 0.1 = 1.1). The multipliers are shared by the whole batch. ``layout``
    (:class:`advfeat.layouts.FeatureLayout`) says where the channels are; without it,
    ``channel_dim`` (1: (N, C, H, W)).

    Returns the adversarial feature (``returns == "feature"``, not a difference), computed with
    the final multipliers;
    these are kept in :attr:`last_multipliers` as ``(δ_μ, δ_σ)``, each of shape ``(C,)``.
    """

    def __init__(
        self,
        model: nn.Module,
        site: str,
        *,
        eps: float = 1.1,
        alpha: float = 0.2,
        steps: int = 6,
        random_start: bool = False,
        stats: Literal["batch", "instance"] = "batch",
        channel_dim: int = 1,
        layout: FeatureLayout | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(model, site, **options)
        for name, value in (("eps", eps), ("alpha", alpha)):
            if isinstance(value, Tensor) or not isinstance(value, (int, float)):
                raise AdvfeatError(f"{name} must be a number (multipliers are per batch)")
        _check_strength("eps", eps, positive=False)
        _check_strength("alpha", alpha, positive=True)
        check_steps(steps, minimum=0)
        if stats not in ("batch", "instance"):
            raise unknown_name("AdvBN statistics", str(stats), ["batch", "instance"])
        self.radius = float(eps)
        self.eps = self.radius
        self.alpha = float(alpha)
        self.steps = steps
        self.random_start = random_start
        self.stats = stats
        self.channel_dim = channel_dim
        self.layout = layout
        self.last_multipliers: tuple[Tensor, Tensor] | None = None

    returns = "feature"

    def _start(self, channels: int, like: Tensor) -> Tensor:
        dtype = wide_dtype(like.dtype)  # multipliers in float32, as every δ
        ones = torch.ones(channels, dtype=dtype, device=like.device)
        if not self.random_start:
            return ones
        gen = self.generator(like.device)
        u = torch.rand(channels, generator=gen, dtype=dtype, device=like.device)
        return ones + (2 * u - 1) * self.radius

    def perturb(  # type: ignore[override]
        self, x: Any, y: Any, features: Mapping[str, Tensor], **options: Any
    ) -> dict[str, Tensor]:
        f = self.site_feature(x, features.get(self.site))
        channels = _advbn_layout(f, self.layout, self.channel_dim).channels(f)
        start = {"mu": self._start(channels, f), "sigma": self._start(channels, f)}
        low, high = 1.0 - self.radius, 1.0 + self.radius
        engine = IterativeAscent(
            Unbounded(),  # sign steps of size τ; the box [1 − ε, 1 + ε] is the constraint
            alpha=self.alpha,
            eps=None,
            steps=self.steps,
            constrain=lambda _name, d: d.clamp(low, high),
            missing_gradient="error",
        )

        def objective(var: Variable) -> Tensor:
            f_adv = self.renormalize(f, var("mu", f), var("sigma", f))
            return self.objective(self.run_tail(f_adv, x), y)

        d = engine.run(objective, start)
        self.last_multipliers = (d["mu"].detach(), d["sigma"].detach())
        return {self.site: self.renormalize(f, d["mu"], d["sigma"])}

    def renormalize(self, feature: Tensor, d_mu: Tensor, d_sigma: Tensor) -> Tensor:
        """:func:`advbn_feature` with this attack's statistics, computed in float32 (or wider)
        and returned in :func:`~advfeat.attacks.precision.perturbed_dtype`."""
        wide = feature.to(wide_dtype(feature.dtype))
        out = advbn_feature(
            wide, d_mu, d_sigma, stats=self.stats, channel_dim=self.channel_dim, layout=self.layout
        )
        return out.to(perturbed_dtype(feature))
