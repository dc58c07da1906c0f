"""Shared parts of the feature-space methods ALFA, L-ALFA (Qin et al., "ALFA: Adversarial
Feature Augmentation for Enhanced Image Recognition") and A-FAN (Chen et al. 2021,
"Adversarial Feature Augmentation and Normalization for Visual Recognition").

* :class:`FeatureAugmentation` — the base of the three methods and its contract: options that
  extend :class:`FeatureAugOptions` / :class:`SiteOptions` and one :meth:`~FeatureAugmentation.perturb`
  hook; the template ``forward`` runs one clean forward that captures the site features, the
  attack on a captured feature (only the tail after the site runs), and the adversarial tail
  passes through the task's clean pass, so the gradient flows into the part before the site
  through ``f + δ`` with ``δ`` a constant (ALFA Eq. 3, A-FAN Eq. 3).
* :func:`last_stage` / :func:`stage_blocks` — the default sites ("the last block", ALFA §4.3,
  A-FAN §7; L-ALFA's "by blocks", ALFA Table 9).
* :func:`feature_moments`, :func:`adversarial_feature_normalization` and
  :class:`AdversarialFeatureNormalization` (the same, clean statistics shared by the k
  strengths) — A-FAN Eq. 6, per channel of the site's layout (:mod:`advfeat.layouts`).
* :func:`random_feature_noise` — the random-noise ablations (ALFA Table 7, A-FAN Table 8).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from advfeat.attacks.feature import FeaturePGD, MultiSiteFeaturePGD
from advfeat.attacks.precision import (
    add_perturbation,
    float32_tail,
    perturbed_dtype,
    wide_dtype,
)
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.layouts import AUTO_LAYOUT, CHANNELS_FIRST, FeatureLayout, site_layout
from advfeat.methods.base import ATTACK_BN_MODE, Method, MethodOutput, unwrap
from advfeat.norm.stats import frozen_bn_statistics
from advfeat.options import Choice, Integer, Number, option
from advfeat.sites import (
    SiteSplit,
    check_disjoint_sites,
    last_stage,
    site_order,
    spread_blocks,
    stage_blocks,
    stages,
)
from advfeat.tasks.base import TaskPass

__all__ = [
    "AUTO_SITE",
    "AFNStats",
    "AdversarialFeature",
    "AdversarialFeatureNormalization",
    "FeatureAugOptions",
    "FeatureAugmentation",
    "SiteOptions",
    "TailFallback",
    "adversarial_feature_normalization",
    "combine_losses",
    "feature_moments",
    "last_stage",
    "multi_site_outputs",
    "perturbation_size",
    "random_feature_noise",
    "report_tail_fallback",
    "spread_blocks",
    "stage_blocks",
    "stages",
]

AUTO_SITE = "auto"
AFNStats = Literal["channel", "positional"]
NOISE_KINDS = ("gaussian", "uniform")
BN_STATS = ("update", "frozen")
LOSS_WEIGHTINGS = ("sum", "mean")
ADV_GRADS = ("full", "tail")
MULTI_SITE_MODES = ("separate", "joint")


# ---------------------------------------------------------------------- A-FAN normalization
def _wide(t: Tensor) -> Tensor:
    """``t`` in at least float32 (statistics of half-precision features under autocast)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _moment_dims(feature: Tensor, stats: str, layout: FeatureLayout) -> tuple[int, ...]:
    if feature.ndim < 2:
        raise AdvfeatError(
            f"feature statistics need a (N, C, ...) feature, got shape {tuple(feature.shape)}"
        )
    layout.check(feature)
    if stats == "channel":
        return layout.reduce_dims(feature.ndim)
    if stats == "positional":
        return layout.positional_dims(feature.ndim)
    raise unknown_name("AFN statistics", str(stats), ["channel", "positional"])


def _moment_part(stats: str, layout: FeatureLayout) -> Callable[[Tensor], Tensor]:
    """What the statistics are taken over: the patch tokens for per-channel statistics of a
    tokens feature with prefix tokens (:meth:`FeatureLayout.statistics_part`), else everything
    (the positional statistics of the released code are per token, prefix tokens included)."""
    return layout.statistics_part if stats == "channel" else (lambda t: t)


def feature_moments(
    feature: Tensor,
    stats: AFNStats = "channel",
    eps: float = 1e-5,
    layout: FeatureLayout | None = None,
) -> tuple[Tensor, Tensor]:
    """First and second moments ``(μ, σ)`` of a feature, shaped to broadcast against it.

    ``"channel"`` (A-FAN Eq. 6, "calculated in the routine of batch normalization"): per channel,
    over the batch and every spatial position, ``σ = sqrt(Var + eps)`` with the biased variance,
    as batch norm computes them in training. ``"positional"``: over the channels at each sample
    and position, as the authors' released code does (not the paper's equation).
    ``layout`` (:class:`advfeat.layouts.FeatureLayout`, default (N, C, H, W)) says which
    dimension holds the channels: over ``(0, 1)`` of the patch tokens of an (N, L, C) feature.
    Computed in at least float32 (autocast), returned in the input dtype.
    """
    layout = layout or CHANNELS_FIRST
    dims = _moment_dims(feature, stats, layout)
    part = _moment_part(stats, layout)(feature)
    var, mean = torch.var_mean(_wide(part), dim=dims, keepdim=True, correction=0)
    return mean.to(feature.dtype), (var + eps).sqrt().to(feature.dtype)


def adversarial_feature_normalization(
    clean: Tensor,
    adversarial: Tensor,
    stats: AFNStats = "channel",
    eps: float = 1e-5,
    layout: FeatureLayout | None = None,
) -> Tensor:
    """A-FAN Eq. 6: ``f_mix = σ_adv · (f_clean − μ_clean) / σ_clean + μ_adv``.

    The clean feature normalised with its own statistics and re-scaled with the adversarial
    feature's, so ``f_mix`` carries the adversarial per-channel mean and standard deviation
    (up to ``eps``) while keeping the clean feature's content. Differentiable in both inputs,
    as batch normalization is. The literal formula; training uses the equivalent, cheaper
    :class:`AdversarialFeatureNormalization`. ``layout``: as :func:`feature_moments` (the
    per-channel map applies to every token; prefix tokens only stay out of the statistics).
    """
    if clean.shape != adversarial.shape:
        raise AdvfeatError(
            f"clean and adversarial features must have the same shape, got "
            f"{tuple(clean.shape)} and {tuple(adversarial.shape)}"
        )
    mu_c, sigma_c = feature_moments(clean, stats, eps, layout)
    mu_a, sigma_a = feature_moments(adversarial, stats, eps, layout)
    return sigma_a * (clean - mu_c) / sigma_c + mu_a


class AdversarialFeatureNormalization:
    """A-FAN Eq. 6 for several adversarial versions ``f + s·δ`` of one clean feature ``f``.

    ``afn = AdversarialFeatureNormalization(f); f_mix = afn(delta, scale)`` equals
    ``adversarial_feature_normalization(f, f + scale * delta)`` (same statistics, same
    gradients with respect to ``f``), but the clean statistics and the normalised clean feature
    ``(f − μ_clean)/σ_clean`` are computed once, and the adversarial moments follow from
    ``μ_adv = μ_f + s·μ_δ`` and ``Var_adv = Var_f + 2s·Cov(f, δ) + s²·Var_δ``: with A-FAN's
    rescaled strengths (one δ, k scales; appendix S1.1) the k adversarial features are never
    materialised. Moments are taken in at least float32; results have the dtype of ``f + δ``
    (:func:`advfeat.attacks.precision.perturbed_dtype`: float32 under autocast, so that the small
    change of statistics is not rounded away in bf16; else the clean feature's dtype).
    ``layout``: where the channels are (:func:`feature_moments`; default (N, C, H, W)).
    """

    def __init__(
        self,
        clean: Tensor,
        stats: AFNStats = "channel",
        eps: float = 1e-5,
        layout: FeatureLayout | None = None,
    ) -> None:
        self.layout = layout or CHANNELS_FIRST
        self.dims = _moment_dims(clean, stats, self.layout)
        self.part = _moment_part(stats, self.layout)
        self.eps = eps
        self.dtype = perturbed_dtype(clean)
        f = _wide(clean)
        self.mean = self.part(f).mean(dim=self.dims, keepdim=True)
        self.centered = f - self.mean
        self.var = self.part(self.centered).square().mean(dim=self.dims, keepdim=True)
        self.normalized = self.centered / (self.var + eps).sqrt()
        self._cache: tuple[Tensor, tuple[Tensor, Tensor, Tensor]] | None = None

    def _moments_of(self, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(μ_δ, Var_δ, Cov(f, δ))``, cached for the last δ (rescaled strengths share it)."""
        if self._cache is None or self._cache[0] is not delta:
            if delta.shape != self.centered.shape:
                raise AdvfeatError(
                    f"the perturbation has shape {tuple(delta.shape)}, the clean feature "
                    f"{tuple(self.centered.shape)}; they must match"
                )
            d = delta.detach().to(self.centered.dtype)  # float32 or wider: δ is not rounded
            d = self.part(d)
            mu = d.mean(dim=self.dims, keepdim=True)
            d = d - mu
            var = d.square().mean(dim=self.dims, keepdim=True)
            cov = (self.part(self.centered) * d).mean(dim=self.dims, keepdim=True)
            self._cache = (delta, (mu, var, cov))
        return self._cache[1]

    def adversarial_moments(
        self, delta: Tensor, scale: float | Tensor = 1.0
    ) -> tuple[Tensor, Tensor]:
        """``(μ_adv, σ_adv)`` of ``f + scale·δ`` (σ includes ``eps``, as batch norm's)."""
        mu_d, var_d, cov = self._moments_of(delta)
        mean = self.mean + scale * mu_d
        var = (self.var + (2 * scale) * cov + (scale * scale) * var_d).clamp_min(0)
        return mean, (var + self.eps).sqrt()

    def __call__(self, delta: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """``f_mix`` for the adversarial feature ``f + scale·δ`` (δ is a constant)."""
        mean, sigma = self.adversarial_moments(delta, scale)
        return (sigma * self.normalized + mean).to(self.dtype)


# -------------------------------------------------------------------------- random features
def random_feature_noise(
    like: Tensor, kind: str, std: float | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Random perturbation of standard deviation ``std`` (ALFA Table 7, A-FAN Table 8).

    ``"gaussian"``: ``N(0, std²)``, the papers' ablation; ``"uniform"``: ``U[−√3·std, √3·std]``,
    the uniform law of the same standard deviation. ``std`` may be a scalar or per-sample ``(B,)``.
    """
    s = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    if s.ndim == 1:
        s = s.view(-1, *([1] * (like.ndim - 1)))
    if kind == "gaussian":
        noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    elif kind == "uniform":
        u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        noise = (2 * u - 1) * math.sqrt(3.0)
    else:
        raise unknown_name("random noise", str(kind), NOISE_KINDS)
    return noise * s


# ---------------------------------------------------------------------------- the objective
def combine_losses(
    loss_clean: Tensor, adv_losses: Sequence[Tensor], lam: float, weighting: str = "sum"
) -> tuple[Tensor, Tensor]:
    """The training loss of ALFA / L-ALFA / A-FAN and ``Σ L_adv``, in one of two readings.

    * ``"sum"``: ``L_clean + λ·Σ_j L_adv^(j)`` — the papers' objective as written (ALFA Eq. 3,
      A-FAN Eq. 7). With n adversarial terms the gradient is up to (1 + λn) times standard
      training's, so the learning rate that suits standard training is effectively larger.
    * ``"mean"``: ``(L_clean + λ·Σ_j L_adv^(j)) / (1 + λ·n)`` — the convex combination the
      authors' released code trains with (ALFA classification: (L_clean + L_adv)/2); at λ = 1,
      ``(L_clean + Σ L_adv) / (1 + n)``. Same minimisers as ``"sum"`` for a fixed n, the
      gradient scale of standard training.
    """
    LOSS_WEIGHTING("", "loss_weighting", weighting)
    loss_adv = torch.stack(list(adv_losses)).sum() if adv_losses else loss_clean.new_zeros(())
    total = loss_clean + lam * loss_adv
    if weighting == "mean":
        total = total / (1 + lam * len(adv_losses))
    return total, loss_adv


def multi_site_outputs(
    attack: MultiSiteFeaturePGD,
    clean: TaskPass,
    deltas: Mapping[str, Tensor],
    features: Mapping[str, Tensor] | None = None,
    strengths: Sequence[float] | Tensor | None = None,
    *,
    prefix_grad: bool = True,
) -> list[Any]:
    """The task outputs on the features perturbed by ``attack`` (ALFA Eq. 5), for training.

    What follows the sites runs through the clean pass (:class:`advfeat.tasks.TaskPass`), which
    never recomputes what it computed before a site. ``"joint"``: one output, all sites perturbed
    (``f_i + η_i·δ_i``) in one pass from the earliest site (:meth:`TaskPass.joint_tail`).
    ``"separate"``: one output per site (in the order of ``attack.sites``). The features
    (``features``, else the clean pass's) and η keep their autograd graph (η is learned by
    L-ALFA). ``prefix_grad`` (ALFA Eq. 3/5: L_adv is a loss of every weight) lets the values
    that jump over a site — the shortcut of a residual block the site lies in — carry gradients
    too, as in the full model; ``False`` is ``adv_grad="tail"``, with detached features.
    """
    scales = attack.scales(strengths, detach=False)
    given = {**clean.features, **(features or {})}

    def perturbed(site: str) -> Callable[[Tensor], Tensor]:
        return lambda t: add_perturbation(t, deltas[site], scales[site])

    if attack.mode == "joint":
        first, *rest = attack.ordered_sites()
        later = {s: perturbed(s) for s in rest}
        f = perturbed(first)(given[first])
        return [clean.joint_tail(first, f, later, prefix_grad=prefix_grad)]
    return [clean.tail(s, perturbed(s)(given[s]), prefix_grad=prefix_grad) for s in attack.sites]


# -------------------------------------------------------------------------- tail fallback
class TailFallback(UserWarning):
    """A feature site's tail cannot run on its own: attack steps run the whole model."""


_REPORTED_FALLBACKS: WeakKeyDictionary[nn.Module, set[str]] = WeakKeyDictionary()


def report_tail_fallback(model: nn.Module, site: str) -> bool:
    """Warn once per model and site, in one line, when attack steps at ``site`` cannot run only
    what follows it (:attr:`advfeat.sites.SiteSplit.is_fast`); returns whether they can."""
    split = SiteSplit(model, site)
    if split.is_fast:
        return True
    reported = _REPORTED_FALLBACKS.setdefault(model, set())
    if site not in reported:
        reported.add(site)
        warnings.warn(
            f"site {site!r} of {type(model).__name__}: the part after it cannot run on its own "
            f"({split.fallback_reason}); every attack step runs the whole model (correct, slower)",
            TailFallback,
            stacklevel=2,
        )
    return False


# ---------------------------------------------------------------------------- option checks
# Declared with advfeat.options.option(default, check) in FeatureAugOptions and the methods' own.
ALPHA = Number(low=0, low_open=True, hint="the attack step size")
STEPS = Integer(low=1, hint="PGD steps")
LAM = Number(low=0, hint="the weight of the adversarial loss")
EPS = Number(low=0, low_open=True, optional=True, hint="null: unbounded")
RANDOM_NOISE = Choice(*NOISE_KINDS, optional=True)
NOISE_STD = Number(low=0, optional=True, hint="null: alpha")
LOSS_WEIGHTING = Choice(*LOSS_WEIGHTINGS)
ADV_GRAD = Choice(*ADV_GRADS)
ADV_BN_STATS = Choice(*BN_STATS)
MULTI_SITE = Choice(*MULTI_SITE_MODES)


def check_sites_option(site: Any, sites: Any) -> list[str] | None:
    """Validate ``site`` / ``sites``; return the requested names, or ``None`` for the default."""
    if not isinstance(site, str) or not site:
        raise AdvfeatError(f"site must be a dotted module name or 'auto', got {site!r}")
    if sites is None:
        return None if site == AUTO_SITE else [site]
    if site != AUTO_SITE:
        raise AdvfeatError(f"give either site ({site!r}) or sites ({sites!r}), not both")
    if isinstance(sites, str) or not isinstance(sites, list | tuple) or not sites:
        raise AdvfeatError(f"sites must be a non-empty list of dotted module names, got {sites!r}")
    if not all(isinstance(s, str) and s for s in sites):
        raise AdvfeatError(f"sites must hold dotted module names (strings), got {sites!r}")
    if len(set(sites)) != len(sites):
        raise AdvfeatError(f"sites names a site twice: {sites!r}")
    return list(sites)


# ------------------------------------------------------------------------ the shared options
@dataclass
class FeatureAugOptions:
    """The options of every feature-space augmentation method, declared once with their checks.

    A method's ``Options`` extends this class (or :class:`SiteOptions`), adds its own fields,
    and re-declares a shared field only to change its default. The defaults are ALFA's
    (Table 2, ResNet-20s on CIFAR-10):

    * ``sites``: the perturbed sites; ``None``: :meth:`FeatureAugmentation.default_sites`.
    * ``alpha``, ``steps``: the step size and number of sign steps of the feature attack.
    * ``lam``: λ, the weight of the adversarial losses; ``loss_weighting``: ``"sum"`` (the
      papers' equations) or ``"mean"`` (the released code's convex combination),
      :func:`combine_losses`.
    * ``adv_grad``: ``"full"`` (L_adv trains every weight, ALFA Eq. 3 / A-FAN Eq. 7) or
      ``"tail"`` (only what follows the site).
    * ``random_noise``, ``noise_std``: random noise of std ``noise_std`` (``None``: ``alpha``)
      instead of the attack (ALFA Table 7, A-FAN Table 8).
    * ``attack_bn_mode``, ``adv_bn_stats``: see :class:`FeatureAugmentation`.
    """

    sites: list[str] | None = None
    alpha: float = option(0.5 / 255, ALPHA)  # ALFA Table 2, ResNet-20s
    steps: int = option(5, STEPS)  # ALFA Table 2: PGD-5, ε unbounded
    lam: float = option(1.0, LAM)  # A-FAN Eq. 7 (ALFA tunes λ without reporting it)
    loss_weighting: str = option("sum", LOSS_WEIGHTING)  # the equations; docs/results.md §10
    adv_grad: str = option("full", ADV_GRAD)  # the equations: L_adv trains every weight
    random_noise: str | None = option(None, RANDOM_NOISE)  # "gaussian" / "uniform"
    noise_std: float | None = option(None, NOISE_STD)  # None: alpha
    attack_bn_mode: str = option("train", ATTACK_BN_MODE)
    adv_bn_stats: str = option("update", ADV_BN_STATS)


@dataclass
class SiteOptions(FeatureAugOptions):
    """The shared options, with ``site`` (one dotted module name; ``"auto"``: the task's
    default sites) besides ``sites``, and ``eps``, the L∞ radius of δ (``None``: unbounded,
    ALFA §3.2)."""

    site: str = AUTO_SITE
    eps: float | None = option(None, EPS)


class AdversarialFeature(NamedTuple):
    """One adversarial feature a method trains on at a site, and the size of its perturbation
    (the mean ‖δ‖₂ per sample, averaged into the ``delta_l2`` log)."""

    feature: Tensor
    size: Tensor


def perturbation_size(delta: Tensor) -> Tensor:
    """The mean ‖δ‖₂ per sample."""
    return delta.flatten(1).norm(dim=1).mean()


# ------------------------------------------------------------------------------ the base class
class FeatureAugmentation(Method):
    """Base of ALFA, L-ALFA and A-FAN: clean pass with capture, feature attack, tail passes.

    The contract. A subclass declares ``Options`` extending :class:`FeatureAugOptions` (or
    :class:`SiteOptions`) and implements one hook, :meth:`perturb`: the adversarial features
    of one site (built with :meth:`feature_attack`, :meth:`noise` and
    :func:`advfeat.attacks.precision.add_perturbation`). The template :meth:`forward` does the
    rest, on every task:

    1. the sites (:meth:`training_sites`: the options' sites or :meth:`default_sites`, checked);
    2. the task's clean pass, which captures the site features (:meth:`clean_pass`);
    3. for each site, :meth:`perturb`, and one training pass of what follows the site per
       adversarial feature (:meth:`adversarial_loss`, through :meth:`TaskPass.tail`);
    4. the loss ``L_clean + λ·Σ L_adv`` (:meth:`combine`), plus the :meth:`penalties`.

    Optional hooks: :meth:`training_sites` (L-ALFA: the sites its strengths are learned for),
    :meth:`adversarial_losses` (L-ALFA: one pass through several perturbed sites,
    :meth:`site_losses`), :meth:`penalties` (L-ALFA: γ‖η‖₁), :meth:`default_sites`.

    Tasks. Losses, default sites and the clean pass are the task's (``method.task``,
    :class:`advfeat.tasks.Task`; classification by default): the same class trains classifiers,
    detectors and segmenters.

    Cost. The part of the network before a site runs once per step, in the clean pass
    (:meth:`advfeat.tasks.Task.clean_pass`); the attack and the adversarial passes run only what
    follows the site (:meth:`advfeat.tasks.TaskPass.tail`: the tail of
    :class:`advfeat.sites.SiteSplit` when the model splits there; for Faster R-CNN the box
    predictor alone after a ROI-head site, the FPN, RPN and ROI heads after a backbone site),
    starting from the captured feature.

    Gradients. The perturbation δ is a constant of the outer minimisation (it is the maximiser
    of the inner problem, ALFA Eq. 3 / A-FAN Eq. 3, so by Danskin's theorem the gradient of the
    max is the gradient at δ*). With ``adv_grad="full"`` (the papers' objective: L_adv is a
    loss of every weight) the adversarial loss reaches the part before the site through the
    captured feature in ``f + δ``; with ``adv_grad="tail"`` (the authors' released ALFA
    classification code, which detaches the feature) it trains only the layers after the site,
    and the part before the site gets exactly zero gradient from it.

    Loss. ``loss_weighting`` chooses between ``L_clean + λ·Σ L_adv`` (``"sum"``, the papers'
    equations) and its convex combination (``"mean"``, the released code); see
    :func:`combine_losses`.

    BN modes. The attack runs the tail with ``attack_bn_mode`` (default ``"train"``: the batch
    statistics that the adversarial loss is computed with; an attack never moves running
    statistics). The adversarial tail passes run in the model's mode: with
    ``adv_bn_stats="update"`` (default) they update the tail's running statistics like any
    train-mode forward — the papers train one set of BN layers on clean and adversarial
    features with ordinary forward passes and mention no exception; with ``"frozen"`` only the
    clean pass moves running statistics, so they describe clean features alone.
    """

    tasks: ClassVar[tuple[str, ...]] = ("classification", "detection", "segmentation")
    capturable_step: ClassVar[bool] = True
    """Whether a training step may be captured as a CUDA graph on a capturable task (fixed
    sites, strengths drawn on the device, random starts drawn on the device)."""
    training_recipe: ClassVar[dict[str, Any]] = {
        # ALFA §4.1 / A-FAN S2.1 (CIFAR): lr 0.1 decayed ×0.1 at epochs 50 and 150 of 200,
        # linear warm-up over the first 200 iterations
        "schedule": "multistep",
        "milestones": [0.25, 0.75],
        "gamma": 0.1,
        "warmup_steps": 200,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._site_cache: WeakKeyDictionary[nn.Module, list[str]] = WeakKeyDictionary()
        self._multi_attack: MultiSiteFeaturePGD | None = None

    def validate_options(self) -> None:
        """The site options and ``multi_site`` (subclasses extend)."""
        self.check_joint_sites()
        self.requested_sites()

    # --------------------------------------------------------------------------- template
    def forward(self, model: nn.Module, x: Any, y: Any) -> MethodOutput:  # type: ignore[override]
        """One training step: clean pass, :meth:`adversarial_losses`, combined loss, logs."""
        self.task.check(x, y)
        sites = self.training_sites(model)
        clean = self.clean_pass(model, x, y, sites)
        losses, delta_l2 = self.adversarial_losses(model, clean, x, y, sites)
        loss, loss_adv = self.combine(clean.loss, losses)
        penalties = self.penalties()
        for weight, term in penalties.values():
            loss = loss + weight * term
        logs = self.detach_logs(
            loss_clean=clean.loss,
            loss_adv=loss_adv,
            **{name: term for name, (_, term) in penalties.items()},
            delta_l2=delta_l2,
            **self.task.log_parts(clean.parts),
        )
        return MethodOutput(loss=loss, logits=clean.logits, logs=logs)

    def perturb(
        self, model: nn.Module, clean: TaskPass, site: str, feature: Tensor, y: Any
    ) -> Iterable[AdversarialFeature]:
        """The adversarial features to train on at ``site`` (the hook every method implements).

        ``feature`` is the clean feature as the adversarial passes use it (:meth:`adv_feature`:
        with its graph for ``adv_grad="full"``); ``clean`` runs what follows the site for an
        attack (:meth:`feature_attack`). A list is built for every site before the first
        adversarial pass; a generator's features interleave with the passes (A-FAN's k).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement perturb()")

    def training_sites(self, model: nn.Module) -> list[str]:
        """The sites of this step (:meth:`resolve_sites`)."""
        return self.resolve_sites(model)

    def adversarial_losses(
        self, model: nn.Module, clean: TaskPass, x: Any, y: Any, sites: list[str]
    ) -> tuple[list[Tensor], Tensor]:
        """``(L_adv terms, mean ‖δ‖₂)``: one task loss per adversarial feature of :meth:`perturb`,
        site by site; ``multi_site="joint"`` perturbs several sites in one pass
        (:meth:`site_losses`)."""
        if len(sites) > 1 and getattr(self.opts, "multi_site", "separate") == "joint":
            return self.site_losses(model, clean, x, y, sites, eps=getattr(self.opts, "eps", None))
        pending = [
            (site, self.perturb(model, clean, site, self.adv_feature(clean.features[site]), y))
            for site in sites
        ]
        losses: list[Tensor] = []
        sizes: list[Tensor] = []
        for site, adversarial in pending:
            for item in adversarial:
                losses.append(self.adversarial_loss(model, clean, site, item.feature, y))
                sizes.append(item.size)
        return losses, torch.stack(sizes).mean()

    def penalties(self) -> dict[str, tuple[float, Tensor]]:
        """Terms added to the loss, ``{log name: (weight, term)}`` (none by default)."""
        return {}

    # ------------------------------------------------------------------------------ sites
    def check_joint_sites(self) -> None:
        """``multi_site="joint"`` runs one tail from the earliest site: classification only."""
        if (
            getattr(self.opts, "multi_site", "separate") == "joint"
            and self.task.name != "classification"
        ):
            raise AdvfeatError(
                f"multi_site='joint' perturbs several sites in one tail pass, which needs a "
                f"model that maps images to outputs; {self.task.name} trains with "
                f"multi_site='separate'"
            )

    def requested_sites(self) -> list[str] | None:
        """The sites named in the options, or ``None`` for :meth:`default_sites`."""
        return check_sites_option(getattr(self.opts, "site", AUTO_SITE), self.opts.sites)

    def default_sites(self, model: nn.Module) -> list[str]:
        """The task's default sites (classification: the last stage, :func:`last_stage`;
        detection / segmentation: the last backbone stage and the task head, A-FAN §5-6)."""
        return self.task.default_sites(model)

    def resolve_sites(self, model: nn.Module) -> list[str]:
        """The sites perturbed in ``model``: validated, in execution order (cached per model)."""
        inner = unwrap(model)
        cached = self._site_cache.get(inner)
        if cached is not None:
            return cached
        names = self.requested_sites()
        if names is None:
            names = self.default_sites(inner)
        check_disjoint_sites(inner, names)  # unknown names list close matches
        ordered = site_order(inner, names)
        if self.task.name == "classification":
            for site in ordered:
                report_tail_fallback(inner, site)
        self._site_cache[inner] = ordered
        return ordered

    # ----------------------------------------------------------------------------- passes
    def clean_pass(self, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> TaskPass:
        """The task's training forward pass, capturing the site features with their graph."""
        return self.task.clean_pass(model, x, y, list(sites))

    def site_layout(self, model: nn.Module, site: str, feature: Tensor) -> FeatureLayout:
        """The layout of ``feature`` at ``site`` (:func:`advfeat.layouts.site_layout`): the
        ``layout`` option when a method has one and it is not ``"auto"``, else the model's
        ``feature_layouts``, else inferred (and reported once)."""
        spec = getattr(self.opts, "layout", AUTO_LAYOUT)
        return site_layout(unwrap(model), site, feature, spec)

    def adversarial_bn(self, model: nn.Module) -> AbstractContextManager[Any]:
        """The context of the adversarial training passes (``adv_bn_stats``)."""
        if self.opts.adv_bn_stats == "frozen":
            return frozen_bn_statistics(unwrap(model))
        return nullcontext()

    @property
    def adv_reaches_prefix(self) -> bool:
        """Whether L_adv trains the layers before the site (``adv_grad="full"``)."""
        return bool(self.opts.adv_grad == "full")

    def adv_feature(self, feature: Tensor) -> Tensor:
        """The clean feature as the adversarial passes use it: with its graph for
        ``adv_grad="full"``, detached for ``"tail"``."""
        return feature if self.adv_reaches_prefix else feature.detach()

    def combine(self, loss_clean: Tensor, adv_losses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(loss, Σ L_adv)`` under ``lam`` and ``loss_weighting`` (:func:`combine_losses`)."""
        return combine_losses(loss_clean, adv_losses, self.opts.lam, self.opts.loss_weighting)

    def adversarial_output(
        self, model: nn.Module, clean: TaskPass, site: str, feature: Tensor
    ) -> Any:
        """The task output with ``feature`` at ``site``: a training pass of what follows the site
        (:meth:`TaskPass.tail`), under ``adv_bn_stats``. With ``adv_grad="full"`` values that
        jump over the site (skip connections, a detector's RPN losses) keep their gradient.
        A float32 feature under autocast (a perturbed one) runs the tail in float32
        (:func:`advfeat.attacks.precision.float32_tail`: bf16 logits round A-FAN's effect away)."""
        with self.adversarial_bn(model), float32_tail(feature):
            return clean.tail(site, feature, prefix_grad=self.adv_reaches_prefix)

    def adversarial_loss(
        self, model: nn.Module, clean: TaskPass, site: str, feature: Tensor, y: Any
    ) -> Tensor:
        """The task's training loss with ``feature`` at ``site``."""
        loss, _ = self.task.output_loss(self.adversarial_output(model, clean, site, feature), y)
        return loss

    def feature_attack(
        self,
        model: nn.Module,
        clean: TaskPass,
        site: str,
        feature: Tensor,
        y: Any,
        alpha: float | Tensor,
        eps: float | None = None,
    ) -> Tensor:
        """δ of PGD-``steps`` with step ``alpha`` (a number or a 0-d tensor) at ``site`` on the
        task's attack loss; only what follows the site runs (:meth:`TaskPass.tail`)."""
        inner = unwrap(model)
        attack = FeaturePGD(
            inner,
            site,
            alpha=alpha,
            steps=self.opts.steps,
            eps=eps,
            norm="linf",
            bn_mode=self.task.attack_bn_mode(self.opts.attack_bn_mode),  # type: ignore[arg-type]
            loss_fn=self.task.attack_loss,
            tail=clean.tail_fn(site),
        )
        with self.task.attack_mode(inner, self.opts.attack_bn_mode):
            return attack(None, y, feature=feature.detach())

    def noise(self, feature: Tensor) -> Tensor:
        """The random-noise ablation's perturbation (``noise_std``, default ``alpha``)."""
        std = self.opts.alpha if self.opts.noise_std is None else self.opts.noise_std
        like = feature.detach().to(wide_dtype(feature.dtype))  # float32, as an attack's δ
        return random_feature_noise(like, self.opts.random_noise, std)

    def multi_site_attack(
        self, model: nn.Module, sites: list[str], eps: float | None = None
    ) -> MultiSiteFeaturePGD:
        """The (cached) PGD at ``sites`` on the task's attack loss (ALFA Eq. 4-5): sign steps,
        δ clipped to the L∞ ball of radius ``eps`` (``None``: unbounded, §3.2)."""
        inner = unwrap(model)
        atk = self._multi_attack
        if atk is None or atk.model is not inner or atk.sites != sites or atk.eps != eps:
            atk = MultiSiteFeaturePGD(
                inner,
                sites,
                alpha=self.opts.alpha,
                steps=self.opts.steps,
                eps=eps,
                mode=self.opts.multi_site,
                bn_mode=self.task.attack_bn_mode(self.opts.attack_bn_mode),  # type: ignore[arg-type]
                loss_fn=self.task.attack_loss,
            )
            self._multi_attack = atk
        return atk

    def site_losses(
        self,
        model: nn.Module,
        clean: TaskPass,
        x: Any,
        y: Any,
        sites: list[str],
        strengths: Tensor | None = None,
        eps: float | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """ALFA / L-ALFA adversarial losses: ``L(tail(f_i + η_i·δ_i))`` and the mean ‖δ‖₂.

        ``strengths=None`` means η = 1 (ALFA Eq. 3); otherwise L-ALFA's η (Eq. 5), kept in the
        graph of the losses. With ``multi_site="separate"`` one loss per site (each site
        perturbed alone, Eq. 3/5 term by term), with ``"joint"`` one loss with all sites
        perturbed in one pass (:func:`multi_site_outputs`, through the clean pass).

        Sites with η_i = 0 exactly are skipped, with the same losses and gradients as not
        skipping them: their δ_i is 0 (the attack's gradient carries the factor η_i, and
        ``sgn 0 = 0``), so ``f_i + η_i·δ_i = f_i``. In ``"joint"`` mode the pass starts at the
        earliest live site (with ``adv_grad="tail"`` at the earliest site, where the part that
        L_adv trains begins: dead sites before the first live one are kept, with δ = 0); in
        ``"separate"`` mode the dead site's loss is the clean loss (when L_adv reaches the
        prefix) or one tail pass from ``f_i``, with no attack. The only difference: a skipped
        pass does not repeat the update of the tail's BN running statistics with the clean batch.

        ``eps``: the L∞ radius of the multi-site attack's δ (``None``: unbounded, ALFA §3.2).
        """
        feats = {s: self.adv_feature(clean.features[s]) for s in sites}
        live = list(sites)
        if strengths is not None:
            values = strengths.detach().tolist()
            live = [s for s, v in zip(sites, values, strict=True) if v != 0.0]
            if live and self.opts.multi_site == "joint" and not self.adv_reaches_prefix:
                # L_adv trains what follows the earliest site: the pass must start there
                live = sites[: sites.index(live[0])] + live
        dead = [s for s in sites if s not in live]
        losses: list[Tensor] = []
        sizes: list[Tensor] = []
        if live:
            live_eta = None
            if strengths is not None:
                keep = torch.tensor([s in live for s in sites], device=strengths.device)
                live_eta = strengths[keep]
            atk = self.multi_site_attack(model, live, eps)
            if self.opts.random_noise is not None:
                deltas = {s: self.noise(feats[s]) for s in live}
            else:
                detached = {s: feats[s].detach() for s in live}
                eta = None if live_eta is None else live_eta.detach()
                deltas = atk(x, y, features=detached, strengths=eta, tail=clean.attack_tail)
            atk.ordered_sites(x)  # the order of the sites in a pass, read once
            with self.adversarial_bn(model):
                outputs = multi_site_outputs(
                    atk,
                    clean,
                    deltas,
                    features={s: feats[s] for s in live},
                    strengths=live_eta,
                    prefix_grad=self.adv_reaches_prefix,
                )
            losses += [self.task.output_loss(out, y)[0] for out in outputs]
            sizes += [perturbation_size(d) for d in deltas.values()]
        # the clean-feature losses of the skipped passes: one per dead site ("separate"), or
        # the single joint loss when every site is dead
        unperturbed = dead if self.opts.multi_site == "separate" else dead[:1] if not live else []
        for s in unperturbed:
            if self.adv_reaches_prefix:
                losses.append(self.task.output_loss(clean.output, y)[0])
            else:
                losses.append(self.adversarial_loss(model, clean, s, feats[s], y))
        sizes += [feats[s].new_zeros(()) for s in dead]
        size = torch.stack(sizes).mean()
        return losses, size
