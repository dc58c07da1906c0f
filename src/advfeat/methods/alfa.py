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

from torch import Tensor, nn

from advfeat.attacks.precision import add_perturbation
from advfeat.methods.feature_aug import (
    MULTI_SITE,
    AdversarialFeature,
    FeatureAugmentation,
    SiteOptions,
    perturbation_size,
)
from advfeat.methods.registry import register_method
from advfeat.options import option
from advfeat.tasks.base import TaskPass

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
      batch size: neither the released code's mean nor the mean with the full path is ahead of
      Eq. 3, which is the default (``docs/results.md`` §10, confirmed on fresh seeds in §13).
    * ``adv_grad``: ``"full"`` (Eq. 3: L_adv reaches the layers before the site through ``f``)
      or ``"tail"`` (the released code detaches ``f``: L_adv trains only the layers after it).
      ``full`` is the default; ``docs/results.md`` §3 measures the two.
    * ``random_noise``: ``"gaussian"`` or ``"uniform"`` replaces the attack by random noise of
      standard deviation ``noise_std`` (default α), the "Random Noise" row of Table 7
      (``N(0, (1/255)²)`` next to α = 1/255).
    * ``eps``: ``None`` (§3.2: unbounded) or the L∞ radius δ is clipped to.
    * ``attack_bn_mode``, ``adv_bn_stats``: see :class:`FeatureAugmentation`.

    Tasks: the same class trains detectors and segmenters (``task=DetectionTask(...)``): the
    losses are the task's (:class:`advfeat.tasks.Task`), the default sites the task's (A-FAN
    §5-6: the last backbone stage and the ROI box head / decoder), and ``adv_bn_stats``
    defaults to ``"frozen"`` there (:attr:`task_defaults`); the loss is Eq. 3's sum there too
    (``docs/results.md`` §16: at the paper's detection rate the sum trains).
    ``multi_site="joint"`` is classification only.
    """

    name = "alfa"
    paper = "Qin et al., ALFA: Adversarial Feature Augmentation for Enhanced Image Recognition"
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        # ALFA reports no dense setting; clean-only running statistics (the adversarial passes
        # re-run the clean batch before the site when a model cannot be cut there); Eq. 3's
        # sum, as dense A-FAN (docs/results.md §16)
        task: {"adv_bn_stats": "frozen"}
        for task in ("detection", "segmentation")
    }

    @dataclass
    class Options(SiteOptions):
        # the shared fields' defaults are ALFA's: Table 2 (ResNet-20s), PGD-5, α = 0.5/255,
        # ε unbounded (§3.2), λ = 1, Eq. 3's sum and gradient path (docs/results.md §10)
        multi_site: str = option("separate", MULTI_SITE)

    def perturb(
        self, model: nn.Module, clean: TaskPass, site: str, feature: Tensor, y: Any
    ) -> list[AdversarialFeature]:
        """``f + δ`` with δ of PGD-``steps`` at step α (Eq. 4; ``eps``: §3.2's unbounded ε by
        default), or random noise (Table 7)."""
        if self.opts.random_noise is not None:
            delta = self.noise(feature)
        else:
            delta = self.feature_attack(
                model, clean, site, feature, y, self.opts.alpha, self.opts.eps
            )
        return [AdversarialFeature(add_perturbation(feature, delta), perturbation_size(delta))]
