"""Training objectives for detection and segmentation: standard, ALFA and A-FAN.

Each is a :class:`advfeat.methods.Method` bound to a :class:`~advfeat.tasks.base.DenseTask`:
``out = method(model, images, targets)`` gives ``MethodOutput(loss, None, logs)``.

Feature augmentation on unmodified torchvision detectors and segmenters. Their forward passes
cannot be cut at a site (Faster R-CNN's proposals and targets flow around the backbone), so every
attack step and every adversarial pass runs the whole model with the site's output replaced by a
forward hook (:func:`advfeat.sites.replace_features`):

* attack (ALFA Eq. 4 / A-FAN Eq. 2-3 on features): ``δ ← δ + α·sgn ∇_δ L(f + δ)`` with ``f``
  detached, so the gradient stops at the site; weights never get gradients and BN running
  statistics never move (:func:`advfeat.attacks.base.attack_guard`). ``eps=None``: unbounded,
  the papers' setting; else δ is clipped to ``[-eps, eps]``.
* A-FAN (Eq. 5-7): k strengths from ``[0, alpha]``; with PGD-1 one attack at the first strength,
  rescaled ``δ_i = (α_i/α_1)·δ_1`` (appendix S1.1); the adversarial pass feeds
  ``f_mix^(i) = σ_adv^(i)·(f − μ)/σ + μ_adv^(i)`` (Eq. 6, per-channel batch statistics) built from
  the site output of that pass, so ``L_adv`` trains the part before the site too (Eq. 7).
* Every pass after the clean one replays the clean pass's random stream
  (:class:`~advfeat.tasks.base.RngReplay`): a ROI-head perturbation refers to the clean pass's
  sampled proposals.
* ``adv_bn_stats``: the adversarial passes re-run the part before the site on the clean batch, so
  with ``"update"`` that batch would move the running statistics k more times; the default
  ``"frozen"`` keeps the running statistics those of the clean passes (for classification,
  where only the tail runs, advfeat's default is ``"update"``).

Sites default to :meth:`DenseTask.default_sites` (last backbone stage + ROI box head / decoder,
A-FAN Table 7 "both"); each site gets its own attacks and losses. ``loss_weighting`` combines
them (:func:`advfeat.methods.feature_aug.combine_losses`): ``"mean"`` (default), the convex
combination that the authors' released detection and segmentation code trains with, or
``"sum"``, ``L_clean + λ·Σ L_adv`` as Eq. 7 is written, which sums 1 + 2·5 task losses for
Faster R-CNN with two sites and k = 5 and diverged in our measurement (``docs/results.md``).
``adv_grad="tail"`` runs the adversarial passes without gradients up to the site and with them
from the site's (detached) output on, so L_adv trains only what runs after the site (for a
ROI-head site, not the backbone or the RPN, whose losses in that pass are then constants).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from advfeat.attacks.base import attack_guard
from advfeat.attacks.feature import sample_strengths
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.methods.base import Method, MethodOutput, unwrap
from advfeat.methods.feature_aug import (
    ADV_GRADS,
    LOSS_WEIGHTINGS,
    adversarial_feature_normalization,
    combine_losses,
    random_feature_noise,
)
from advfeat.norm.stats import frozen_bn_statistics
from advfeat.sites import resolve_site
from advfeat.tasks.base import DenseTask, RngReplay

__all__ = ["TASK_METHODS", "DenseAFAN", "DenseALFA", "DenseStandard", "build_task_method"]


def _device(images: Any) -> torch.device:
    first = images if isinstance(images, Tensor) else images[0]
    return first.device


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


class DenseMethod(Method):
    """A method bound to a dense task; ``forward(model, images, targets)``."""

    def __init__(self, task: DenseTask, **options: Any) -> None:
        if not isinstance(task, DenseTask):
            raise AdvfeatError(
                f"task must be a DetectionTask or SegmentationTask, got {type(task).__name__}"
            )
        self.task = task
        super().__init__(**options)

    def forward(self, model: nn.Module, images: Any, targets: Any) -> MethodOutput:  # type: ignore[override]
        raise NotImplementedError


class DenseStandard(DenseMethod):
    """Standard training: the task loss (Faster R-CNN's loss dict / pixel cross-entropy)."""

    name = "standard"
    paper = "standard training (A-FAN Tables 5-7 'Baseline')"

    def forward(self, model: nn.Module, images: Any, targets: Any) -> MethodOutput:  # type: ignore[override]
        self.task.check(images, targets)
        loss, parts = self.task.loss(model, images, targets)
        return MethodOutput(loss=loss, logits=None, logs=self.detach_logs(loss_clean=loss, **parts))


class DenseFeatureAugmentation(DenseMethod):
    """Shared machinery of :class:`DenseALFA` and :class:`DenseAFAN` (module docstring)."""

    multi_strength: ClassVar[bool] = False

    def validate_options(self) -> None:
        o = self.opts
        if o.sites is not None and (
            isinstance(o.sites, str)
            or not o.sites
            or not all(isinstance(s, str) and s for s in o.sites)
        ):
            raise AdvfeatError(
                f"sites must be a non-empty list of dotted module names, got {o.sites!r}"
            )
        if not _number(o.alpha) or o.alpha <= 0:
            raise AdvfeatError(f"alpha must be a number > 0, got {o.alpha!r}")
        if isinstance(o.steps, bool) or not isinstance(o.steps, int) or o.steps < 1:
            raise AdvfeatError(f"steps must be an integer >= 1, got {o.steps!r}")
        if o.eps is not None and (not _number(o.eps) or o.eps <= 0):
            raise AdvfeatError(f"eps must be a number > 0 or null (unbounded), got {o.eps!r}")
        if not _number(o.lam) or o.lam < 0:
            raise AdvfeatError(f"lam must be a number >= 0, got {o.lam!r}")
        for key, choices in (
            ("loss_weighting", LOSS_WEIGHTINGS),
            ("adv_grad", ADV_GRADS),
            ("attack_bn_mode", ("train", "eval")),
            ("adv_bn_stats", ("frozen", "update")),
        ):
            if getattr(o, key) not in choices:
                raise unknown_name(f"value of {key}", str(getattr(o, key)), choices)
        if o.random_noise is not None and o.random_noise not in ("gaussian", "uniform"):
            raise unknown_name("random noise", str(o.random_noise), ["gaussian", "uniform"])

    def sites(self, model: nn.Module) -> list[str]:
        inner = unwrap(model)
        names = (
            list(self.opts.sites) if self.opts.sites is not None else self.task.default_sites(inner)
        )
        for name in names:
            resolve_site(inner, name)
        return names

    def adversarial_bn(self, model: nn.Module) -> AbstractContextManager[Any]:
        return (
            frozen_bn_statistics(unwrap(model))
            if self.opts.adv_bn_stats == "frozen"
            else nullcontext()
        )

    def feature_attack(
        self, model: nn.Module, images: Any, targets: Any, site: str, alpha: float, rng: RngReplay
    ) -> Tensor:
        """δ after ``steps`` sign-gradient steps of size ``alpha`` at ``site`` (detached)."""
        inner = unwrap(model)
        delta: Tensor | None = None
        with (
            attack_guard(inner, bn_mode="train"),
            torch.enable_grad(),
            self.task.attack_mode(inner, self.opts.attack_bn_mode),
        ):
            for _ in range(self.opts.steps):
                leaf: list[Tensor] = []

                def perturb(
                    out: Any, start: Tensor | None = delta, leaf: list[Tensor] = leaf
                ) -> Tensor:
                    if not isinstance(out, Tensor):
                        raise AdvfeatError(
                            f"feature site {site!r} outputs {type(out).__name__}, not a tensor"
                        )
                    d = torch.zeros_like(out) if start is None else _same_shape(start, out, site)
                    leaf.append(d.detach().requires_grad_(True))
                    return out.detach() + leaf[-1]

                with rng.replay():
                    objective = self.task.attack_objective(inner, images, targets, {site: perturb})
                if len(leaf) != 1:
                    raise AdvfeatError(
                        f"feature site {site!r} ran {len(leaf)} times in one forward pass"
                    )
                (grad,) = torch.autograd.grad(objective, leaf, allow_unused=True)
                step = torch.zeros_like(leaf[0]) if grad is None else alpha * grad.sign()
                delta = leaf[0].detach() + step
                if self.opts.eps is not None:
                    delta = delta.clamp(-self.opts.eps, self.opts.eps)
        assert delta is not None  # steps >= 1
        return delta

    def perturbations(
        self, model: nn.Module, images: Any, targets: Any, site: str, rng: RngReplay
    ) -> list[Tensor | float]:
        """The perturbations (or noise stds) of one site; overridden by A-FAN."""
        if self.opts.random_noise is not None:
            return [self.opts.alpha if self.opts.noise_std is None else self.opts.noise_std]
        return [self.feature_attack(model, images, targets, site, self.opts.alpha, rng)]

    def mix(self, out: Tensor, adv: Tensor) -> Tensor:
        """The feature fed to the adversarial pass (ALFA: the perturbed feature itself)."""
        return adv

    def forward(self, model: nn.Module, images: Any, targets: Any) -> MethodOutput:  # type: ignore[override]
        self.task.check(images, targets)
        sites = self.sites(model)
        rng = RngReplay(_device(images))
        loss_clean, parts = self.task.loss(model, images, targets)
        losses: list[Tensor] = []
        sizes: list[float] = []
        tail_only = self.opts.adv_grad == "tail" and torch.is_grad_enabled()
        for site in sites:
            for pert in self.perturbations(model, images, targets, site, rng):

                def replace(out: Tensor, pert: Tensor | float = pert, site: str = site) -> Tensor:
                    if tail_only:  # what runs from here on trains; what ran before did not
                        torch.set_grad_enabled(True)
                        out = out.detach()
                    if isinstance(pert, Tensor):
                        delta = _same_shape(pert, out, site)
                    else:
                        delta = random_feature_noise(
                            out.detach(), str(self.opts.random_noise), pert
                        )
                    sizes.append(
                        float(delta.flatten(1).norm(dim=1).mean())
                        if delta.ndim > 1
                        else float(delta.norm())
                    )
                    return self.mix(out, out + delta)

                with (
                    rng.replay(),
                    self.adversarial_bn(model),
                    torch.set_grad_enabled(not tail_only and torch.is_grad_enabled()),
                ):
                    loss_adv_i, _ = self.task.loss(model, images, targets, {site: replace})
                losses.append(loss_adv_i)
        loss, loss_adv = combine_losses(loss_clean, losses, self.opts.lam, self.opts.loss_weighting)
        logs = self.detach_logs(
            loss_clean=loss_clean,
            loss_adv=loss_adv,
            delta_l2=sum(sizes) / max(len(sizes), 1),
            **parts,
        )
        return MethodOutput(loss=loss, logits=None, logs=logs)


def _same_shape(delta: Tensor, out: Tensor, site: str) -> Tensor:
    if delta.shape != out.shape:
        raise AdvfeatError(
            f"site {site!r} output {tuple(out.shape)} in this pass but {tuple(delta.shape)} when attacked; "
            f"a ROI-head site needs the same proposals in every pass (use attack_bn_mode='train', or "
            f"a backbone with frozen batch norm)"
        )
    return delta


class DenseALFA(DenseFeatureAugmentation):
    """ALFA (Qin et al., Eq. 3-4) on detectors and segmenters: ``L_clean + λ·Σ_sites L(f + δ)``.

    Defaults as ALFA Table 2 (PGD-5, α = 0.5/255, unbounded ε, λ = 1). ALFA reports no
    detection or segmentation setting; this applies its objective with the task loss.
    """

    name = "alfa"
    paper = "Qin et al., ALFA: Adversarial Feature Augmentation for Enhanced Image Recognition"

    @dataclass
    class Options:
        sites: list[str] | None = None  # None: task.default_sites
        alpha: float = 0.5 / 255
        steps: int = 5
        eps: float | None = None  # ALFA §3.2: unbounded
        lam: float = 1.0
        loss_weighting: str = "mean"  # docs/results.md: "sum" diverges on detection
        adv_grad: str = "full"  # Eq. 3
        random_noise: str | None = None  # Table 7 ablation
        noise_std: float | None = None
        attack_bn_mode: str = "train"
        adv_bn_stats: str = "frozen"


class DenseAFAN(DenseFeatureAugmentation):
    """A-FAN (Chen et al. 2021, Algorithm 1, Eq. 5-7) on Faster R-CNN and DeepLabV3/V3+.

    Defaults: A-FAN §5, Faster R-CNN on VOC2007 — PGD-1, k = 5 strengths from [0, α],
    α = 0.3/255, λ = 1, sites "the last layer of backbone and ROI networks". Segmentation (§6,
    DeepLabV3+) uses k = 3 and α = 1.0/255 (VOC2007), 0.4/255 (VOC2012), 0.3/255 (Cityscapes):
    see the ``afan-deeplab-*`` presets. ``afn=False`` is Table 7's "+ AFA" row; ``afn_stats``
    ``"positional"`` is the released code's statistics (not Eq. 6); ``strength_spacing`` ``"grid"``
    uses α·i/k instead of random draws. Rescaling (S1.1) is used when ``steps == 1``; with more
    steps each strength gets its own attack (Eq. 5 literally).
    """

    name = "afan"
    paper = "Chen et al. 2021, Adversarial Feature Augmentation and Normalization (A-FAN)"

    @dataclass
    class Options:
        sites: list[str] | None = None  # None: task.default_sites (Table 7 "both")
        alpha: float = 0.3 / 255  # §5, VOC2007
        k: int = 5  # §5: five strengths
        strength_spacing: str = "random"  # Algorithm 1, line 2
        steps: int = 1  # §5: PGD-1
        eps: float | None = None  # unbounded
        lam: float = 1.0  # Eq. 7
        loss_weighting: str = "mean"  # released code: convex combination; "sum" diverges
        adv_grad: str = "full"  # Eq. 7
        afn: bool = True  # Table 7: False = "+ AFA"
        afn_stats: str = "channel"  # Eq. 6
        afn_eps: float = 1e-5
        random_noise: str | None = None  # Table 8 ablation
        noise_std: float | None = None
        attack_bn_mode: str = "train"
        adv_bn_stats: str = "frozen"

    def validate_options(self) -> None:
        super().validate_options()
        o = self.opts
        if isinstance(o.k, bool) or not isinstance(o.k, int) or o.k < 1:
            raise AdvfeatError(f"k (number of strengths) must be an integer >= 1, got {o.k!r}")
        if o.strength_spacing not in ("random", "grid"):
            raise unknown_name("strength spacing", str(o.strength_spacing), ["random", "grid"])
        if o.afn_stats not in ("channel", "positional"):
            raise unknown_name("afn_stats", str(o.afn_stats), ["channel", "positional"])
        if not isinstance(o.afn, bool):
            raise AdvfeatError(f"afn must be true or false, got {o.afn!r}")

    def perturbations(
        self, model: nn.Module, images: Any, targets: Any, site: str, rng: RngReplay
    ) -> list[Tensor | float]:
        o = self.opts
        alphas = [float(a) for a in sample_strengths(o.k, o.alpha, spacing=o.strength_spacing)]
        if o.random_noise is not None:
            return [a if o.noise_std is None else o.noise_std for a in alphas]
        if o.steps == 1:  # S1.1: f_adv^(i) = f + (α_i/α_1)·δ_1, exact for one sign step
            delta1 = self.feature_attack(model, images, targets, site, alphas[0], rng)
            return [(a / alphas[0]) * delta1 for a in alphas]
        return [self.feature_attack(model, images, targets, site, a, rng) for a in alphas]

    def mix(self, out: Tensor, adv: Tensor) -> Tensor:
        if not self.opts.afn:
            return adv
        return adversarial_feature_normalization(out, adv, self.opts.afn_stats, self.opts.afn_eps)


TASK_METHODS: dict[str, type[DenseMethod]] = {
    "standard": DenseStandard,
    "alfa": DenseALFA,
    "afan": DenseAFAN,
}


def build_task_method(name: str, task: DenseTask, **options: Any) -> DenseMethod:
    """``standard``, ``alfa`` or ``afan`` for ``task`` with validated ``options``."""
    if name not in TASK_METHODS:
        raise unknown_name("detection/segmentation method", name, list(TASK_METHODS))
    return TASK_METHODS[name](task, **options)
