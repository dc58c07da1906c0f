"""ALFA: adversarial feature augmentation (Qin et al., "ALFA: Adversarial Feature Augmentation
for Enhanced Image Recognition", §3.2).

Objective (Eq. 3)::

    min_Θ  L_std(x, y) + λ · Σ_i max_{δ_i} L_at(tail_i(f_i(x) + δ_i), y)

δ_i is found by PGD on the feature f_i of site i (Eq. 4) with ε unbounded, i.e. ``steps`` plain
sign-gradient steps of size α ("the projected gradient descent will be replaced by gradient
descent", §3.2), the gradient back-propagated only down to the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from advfeat.methods.base import ATTACK_BN_MODE, MethodOutput
from advfeat.methods.feature_aug import (
    ADV_BN_STATS,
    ADV_GRAD,
    ALPHA,
    AUTO_SITE,
    EPS,
    LAM,
    LOSS_WEIGHTING,
    NOISE_STD,
    RANDOM_NOISE,
    STEPS,
    FeatureAugmentation,
)
from advfeat.methods.registry import register_method
from advfeat.options import Choice, option

__all__ = ["ALFA"]


@register_method
class ALFA(FeatureAugmentation):
    """ALFA (Eq. 3-4): clean loss plus λ times the loss of adversarially perturbed features.

    Options (defaults: Table 2, ResNet-20s on CIFAR-10):

    * ``site``: dotted module name; ``"auto"`` is the last stage (:func:`last_stage`:
      ``layer3`` of the CIFAR ResNets), "the last residual block" of Table 2 (its output is the
      last block's output). Footnote 2 says perturbations "usually are applied to the normalized
      feature from batch normalization": name a BN layer (e.g. ``layer3.2.bn2``) for that reading;
      a site inside a residual block runs the slower fallback of
      :class:`advfeat.sites.SiteSplit` (the skip connection crosses the cut).
    * ``sites``: several sites at once (Fig. 2-3 combine blocks), instead of ``site``.
    * ``alpha``, ``steps``: step size and number of sign steps (PGD-5, α = 0.5/255).
    * ``lam``: λ of Eq. 3. The paper tunes it by grid search without reporting a value; 1 is
      the value its companion paper A-FAN reports for the same objective (A-FAN Eq. 7).
    * ``multi_site`` (several sites): ``"separate"`` reads Eq. 3 term by term (the sum is
      outside the max: each site is attacked and evaluated with the others clean, one loss per
      site); ``"joint"`` perturbs all sites in one pass (one loss), as Fig. 1 can be read.
    * ``loss_weighting``: ``"sum"`` (default: Eq. 3 as written, ``L_clean + λ·Σ L_adv``) or
      ``"mean"`` (the convex combination of the authors' released code, ``(L_clean + L_adv)/2``
      for one site); see :func:`advfeat.methods.feature_aug.combine_losses`. The mean is the
      sum at a (1 + λn)× smaller learning rate, so the two were compared at the papers' rate per
      batch size (``docs/results.md`` §10, 3 fresh seeds): the released code's mean with the
      tail-only path −11.60 [−25.40, +2.20] and the mean with the full path −0.00 [−4.33, +4.33]
      clean against Eq. 3; neither is ahead, so Eq. 3 is the default.
    * ``adv_grad``: ``"full"`` (Eq. 3: L_adv reaches the layers before the site through ``f``)
      or ``"tail"`` (the released code detaches ``f``: L_adv trains only the layers after it).
      Chosen by measurement (``docs/results.md`` §3, A-FAN on ``shapes``, 3 seeds): ``tail``
      was behind ``full`` on every seed, under both loss scales.
    * ``random_noise``: ``"gaussian"`` or ``"uniform"`` replaces the attack by random noise of
      standard deviation ``noise_std`` (default α), the "Random Noise" row of Table 7
      (``N(0, (1/255)²)`` next to α = 1/255).
    * ``eps``: ``None`` (§3.2: unbounded) or the L∞ radius δ is clipped to.
    * ``attack_bn_mode``, ``adv_bn_stats``: see :class:`FeatureAugmentation`.

    Tasks: the same class trains detectors and segmenters (``task=DetectionTask(...)``): the
    losses are the task's (:class:`advfeat.tasks.Task`), the default sites the task's (A-FAN
    §5-6: the last backbone stage and the ROI box head / decoder), and ``adv_bn_stats``
    defaults to ``"frozen"`` and ``loss_weighting`` to ``"mean"`` there (:attr:`task_defaults`).
    ``multi_site="joint"`` is classification only.
    """

    name = "alfa"
    paper = "Qin et al., ALFA: Adversarial Feature Augmentation for Enhanced Image Recognition"
    tasks = ("classification", "detection", "segmentation")
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        # ALFA reports no dense setting; clean-only running statistics (the adversarial passes
        # re-run the clean batch before the site when a model cannot be cut there); the convex
        # combination, as dense A-FAN (its sum diverged on detection, docs/results.md §3)
        task: {"adv_bn_stats": "frozen", "loss_weighting": "mean"}
        for task in ("detection", "segmentation")
    }

    @dataclass
    class Options:
        site: str = AUTO_SITE  # Table 2: the last residual block (dense: the task's sites)
        sites: list[str] | None = None
        alpha: float = option(0.5 / 255, ALPHA)  # Table 2, ResNet-20s
        steps: int = option(5, STEPS)  # Table 2: PGD-5, ε unbounded
        eps: float | None = option(None, EPS)  # §3.2: unbounded; a number clips δ to [-eps, eps]
        lam: float = option(1.0, LAM)  # not reported (grid search); A-FAN Eq. 7 uses λ = 1
        multi_site: str = option("separate", Choice("separate", "joint"))
        # measured (docs/results.md §5) and the released code; "sum": Eq. 3 as written
        loss_weighting: str = option("sum", LOSS_WEIGHTING)  # Eq. 3; docs/results.md §10
        # Eq. 3: L_adv trains every weight; "tail": only after the site
        adv_grad: str = option("full", ADV_GRAD)
        # Table 7 ablation: "gaussian" / "uniform"
        random_noise: str | None = option(None, RANDOM_NOISE)
        noise_std: float | None = option(None, NOISE_STD)  # None: alpha
        attack_bn_mode: str = option("train", ATTACK_BN_MODE)
        adv_bn_stats: str = option("update", ADV_BN_STATS)

    def validate_options(self) -> None:
        self.check_joint_sites()
        self.requested_sites()

    def capture_refusal(self) -> str | None:
        """Capturable: fixed sites, fixed strengths, random starts drawn on the device."""
        return None if self.task.capturable else f"{self.task.name} batches are not captured"

    def forward(self, model: nn.Module, x: Any, y: Any) -> MethodOutput:  # type: ignore[override]
        self.task.check(x, y)
        sites = self.resolve_sites(model)
        clean = self.clean_pass(model, x, y, sites)
        if len(sites) == 1 or self.opts.multi_site == "separate":
            losses, delta_l2 = self.separate_site_losses(model, clean, y, sites)
        else:
            losses, delta_l2 = self.site_losses(
                model, x, y, clean.features, sites, eps=self.opts.eps
            )
        loss, loss_adv = self.combine(clean.loss, losses)
        logs = self.detach_logs(
            loss_clean=clean.loss,
            loss_adv=loss_adv,
            delta_l2=delta_l2,
            **self.task.log_parts(clean.parts),
        )
        return MethodOutput(loss=loss, logits=clean.logits, logs=logs)
