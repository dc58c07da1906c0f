"""A-FAN: adversarial feature augmentation and normalization (Chen et al. 2021, "Adversarial
Feature Augmentation and Normalization for Visual Recognition", Algorithm 1).

1. Augmentation (Eq. 3-5): k strengths α^(1..k) sampled uniformly from [0, α] (Algorithm 1,
   line 2); adversarial features ``f_adv^(i) = f + δ_i`` with δ_i from PGD at strength α^(i)
   on the site feature. With PGD-1, one attack suffices: ``f_adv^(i) = f + (α^(i)/α^(1))·δ_1``
   (appendix S1.1, :meth:`AFAN.perturbations`; exact when :attr:`AFAN.uses_rescaling`).
2. Normalization (Eq. 6): ``f_mix^(i) = σ_adv^(i)·(f − μ_clean)/σ_clean + μ_adv^(i)`` with the
   per-channel batch statistics of batch normalization
   (:func:`advfeat.methods.feature_aug.adversarial_feature_normalization`), over every
   dimension but the channels of the site's layout (:mod:`advfeat.layouts`: (N, C, H, W),
   (N, H, W, C) or ViT tokens (N, L, C)).
3. Objective (Eq. 7): ``L_clean + λ·Σ_{i=1..k} L_adv^(i)`` — a sum over the k features, λ = 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from advfeat.attacks.feature import sample_strengths
from advfeat.attacks.precision import add_perturbation
from advfeat.errors import AdvfeatError
from advfeat.layouts import AUTO_LAYOUT, LayoutSpec
from advfeat.methods.feature_aug import (
    ALPHA,
    EPS,
    STEPS,
    AdversarialFeature,
    AdversarialFeatureNormalization,
    FeatureAugmentation,
    SiteOptions,
    perturbation_size,
)
from advfeat.methods.registry import register_method
from advfeat.options import Choice, Flag, Integer, Number, option
from advfeat.tasks.base import TaskPass

__all__ = ["AFAN"]


@register_method
class AFAN(FeatureAugmentation):
    """A-FAN (Algorithm 1, Eq. 5-7) on classifiers.

    Options (defaults: one setting the paper ran on CIFAR-10 — appendix S2 / Fig. S5, ResNet-18:
    PGD-1 with step α = 1.0/255 and k = 3 strengths from [0, α], "superior performance" —, with
    S1.1's exact rescaling of one attack to the k strengths, and λ = 1 of Eq. 7. §4's Table 2
    setting (PGD-5, α = 0.5/255, k separate attacks, as S1.1 says the rescaling is not exact for
    multi-step PGD) is the ``afan-resnet{20,56}-cifar{10,100}`` presets. The loss is Eq. 7's sum
    ``L_clean + λ·Σ L_adv`` and the gradient path Eq. 7's (``adv_grad="full"``), for every task:
    the released code's convex combination is offered, and was not ahead of the sum at the papers'
    learning rates (``docs/results.md`` §10, §13 and, for detection, §16)):

    * ``site`` / ``sites``: as ALFA ("the last block", §4 and §7); each site gets its own k
      augmented features, all losses are summed.
    * ``alpha``: upper end α of the strength interval; ``k``: number of strengths;
      ``strength_spacing``: ``"random"`` (k uniform draws per step, Algorithm 1 line 2) or
      ``"grid"`` (α·i/k, the other reading).
    * ``steps``: PGD steps; ``eps``: the L∞ ball of the PGD (S1.1: "we by default use
      ε = 8/255", never reached by small steps; ``None``: unbounded).
    * ``rescale``: ``None`` (default) uses S1.1's rescaling when it is exact (``steps == 1`` and
      α ≤ ε) and k separate attacks otherwise (Eq. 5 literally); ``True`` always rescales (an
      approximation for multi-step PGD, which S1.1 says it is "not available" for); ``False``
      always runs k attacks.
    * ``loss_weighting``, ``adv_grad``: as ALFA (``"sum"`` / ``"mean"``: Eq. 7 as written or
      the convex combination of the released code; ``"full"`` / ``"tail"``: whether L_adv
      reaches the layers before the site). Default: Eq. 7's sum for every task (the mean is
      the sum at a (1 + λk)× smaller learning rate; ``docs/results.md`` §10 and §16 compare
      them at the papers' rates). A dense run should use its paper's rate (the
      ``afan-fasterrcnn-*`` and ``afan-deeplab-*`` presets): at 6× it the sum diverged (§3).
    * ``afn``: ``False`` is the "AFA" row of Table S10 (augmentation only, no normalization).
    * ``afn_stats``: ``"channel"`` (Eq. 6: per-channel batch statistics, "calculated in the
      routine of batch normalization") or ``"positional"`` (statistics over the channels at each
      position, what the authors' released code computes); ``afn_eps``: BN's ε.
    * ``layout``: where each site's channels are (:mod:`advfeat.layouts`): ``"auto"`` (the
      model's ``feature_layouts``, else inferred and reported), ``"channels_first"``,
      ``"channels_last"``, ``"tokens"`` or ``"tokens:N"`` (N class tokens left out of the
      statistics). On a ViT block "per channel" is over the batch and the patch tokens.
    * ``random_noise``: ``"gaussian"`` (Table 8, "Random Noise + AFN": each of the k
      perturbations replaced by noise from N(0, α²)) or ``"uniform"`` (same std);
      ``noise_std`` overrides the std (default α).
    * Tasks: the same class trains Faster R-CNN and DeepLabV3/V3+ (``task=``, A-FAN §5-6) on
      the task's losses, with the task's default sites ("the last layer of backbone and ROI
      networks" / "... and the decoder") and :attr:`task_defaults` (§5's α = 0.3/255, k = 5,
      unbounded ε, clean-only running statistics).
    * ``attack_bn_mode``, ``adv_bn_stats``: see :class:`FeatureAugmentation`. The k adversarial
      tail passes are separate forward passes: batching them into one pass of k·B samples would
      change the batch statistics of every BN layer in the tail (one joint batch instead of k),
      so it is not the same computation.
    """

    name = "afan"
    paper = "Chen et al. 2021, Adversarial Feature Augmentation and Normalization (A-FAN)"
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        # §5, Faster R-CNN on VOC2007: PGD-1, k = 5 strengths from [0, α], α = 0.3/255,
        # unbounded; Eq. 7's sum (docs/results.md §16); clean-only running statistics.
        # Segmentation (§6) uses k = 3 and other α: see the afan-deeplab-* presets.
        task: {"alpha": 0.3 / 255, "k": 5, "eps": None, "adv_bn_stats": "frozen"}
        for task in ("detection", "segmentation")
    }

    @dataclass
    class Options(SiteOptions):
        alpha: float = option(1.0 / 255, ALPHA)  # S2 / Fig. S5: PGD-1 with α = 1.0/255 (CIFAR-10)
        steps: int = option(1, STEPS)  # S1.1 / Fig. S5: PGD-1
        eps: float | None = option(8 / 255, EPS)  # S1.1: ε = 8/255
        # §4: three strengths
        k: int = option(3, Integer(low=1, hint="number of perturbation strengths"))
        strength_spacing: str = option("random", Choice("random", "grid"))  # Algorithm 1, line 2
        rescale: bool | None = None  # S1.1 when exact
        afn: bool = option(True, Flag())  # Table S10: False = AFA only
        # Eq. 6; "positional" = released code
        afn_stats: str = option("channel", Choice("channel", "positional"))
        afn_eps: float = option(1e-5, Number(low=0))  # batch norm's ε
        layout: str = option(AUTO_LAYOUT, LayoutSpec())  # where the channels are

    def validate_options(self) -> None:
        opts = self.opts
        if opts.rescale is not None and not isinstance(opts.rescale, bool):
            raise AdvfeatError(f"rescale must be true, false or null, got {opts.rescale!r}")
        super().validate_options()

    @property
    def uses_rescaling(self) -> bool:
        """Whether one attack is rescaled to the k strengths (S1.1) instead of k attacks.

        Exact (the default rule) for one sign step whose strengths all stay inside the ball:
        ``steps == 1`` and ε unbounded or α ≤ ε (every sampled α_i ≤ α). Past ε the clipped
        step is not linear in α, and rescaling would leave the ball.
        """
        opts = self.opts
        if opts.rescale is not None:
            return bool(opts.rescale)
        return opts.steps == 1 and (opts.eps is None or opts.alpha <= opts.eps)

    def perturbations(
        self, model: nn.Module, clean: TaskPass, site: str, feature: Tensor, y: Any, alphas: Tensor
    ) -> list[tuple[Tensor, Tensor | float]]:
        """``(δ, s)`` pairs with ``f_adv^(i) = f + s·δ`` for each strength (Eq. 5).

        Rescaling (S1.1, ``f_adv^(i) = f_adv^(1) + (α_i/α_1 − 1)·δ_1``, the same thing): the
        sign step is linear in its strength while it stays inside the ball
        (:attr:`uses_rescaling`), so one δ at the largest strength α (``opts.alpha``) and
        ``s_i = α_i/α`` give ``f + α_i·sign(∇)`` for each sampled α_i, as δ_1 at α_1 (Algorithm
        1 lines 3-4) with ``s_i = α_i/α_1`` does; the attack's strength is then a fixed number
        and the s_i stay on the device. Otherwise one attack (or one draw of noise, std
        ``noise_std`` or α: Table 8's N(0, α²)) per strength, its step size the strength as a
        device tensor, and ``s_i = 1``. δ is detached; ``f`` keeps its graph.
        """
        if self.opts.random_noise is not None:
            return [(self.noise(feature), 1.0) for _ in range(alphas.numel())]
        eps = self.opts.eps
        if self.uses_rescaling:
            reference = self.opts.alpha
            delta = self.feature_attack(model, clean, site, feature, y, reference, eps)
            return [(delta, s) for s in (alphas / reference).unbind()]
        return [
            (self.feature_attack(model, clean, site, feature, y, a, eps), 1.0)
            for a in alphas.unbind()
        ]

    def perturb(
        self, model: nn.Module, clean: TaskPass, site: str, feature: Tensor, y: Any
    ) -> Iterator[AdversarialFeature]:
        """The k adversarial features of Eq. 5 (:meth:`perturbations`), normalized with the clean
        feature's statistics (Eq. 6, :class:`AdversarialFeatureNormalization`) unless ``afn``
        is off; each one is trained on before the next is built."""
        opts = self.opts
        alphas = sample_strengths(
            opts.k, opts.alpha, spacing=opts.strength_spacing, device=feature.device
        )
        pairs = self.perturbations(model, clean, site, feature, y, alphas)
        afn = (
            AdversarialFeatureNormalization(
                feature, opts.afn_stats, opts.afn_eps, self.site_layout(model, site, feature)
            )
            if opts.afn
            else None
        )
        norms: dict[int, Tensor] = {}
        for delta, scale in pairs:
            if id(delta) not in norms:
                norms[id(delta)] = perturbation_size(delta)
            size = scale.abs() if isinstance(scale, Tensor) else abs(scale)
            f_in = afn(delta, scale) if afn is not None else add_perturbation(feature, delta, scale)
            yield AdversarialFeature(f_in, size * norms[id(delta)])
