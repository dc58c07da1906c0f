"""MART (Wang et al. 2020): boosted CE on adversarial examples plus a misclassification-weighted KL."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.methods.adversarial import (
    PixelAdversarialTraining,
    ReferenceAttackOptions,
    boosted_cross_entropy,
    mart_loss,
)
from advfeat.methods.base import MethodOutput, unwrap
from advfeat.methods.registry import register_method
from advfeat.options import Number, option

__all__ = ["MART"]


@register_method
class MART(PixelAdversarialTraining):
    """Wang et al. 2020, the MART objective L^MART (§3.3):

    (1/n) Σ_i [BCE(p(x′_i), y_i) + λ · KL(p(x_i) ‖ p(x′_i)) · (1 − p_{y_i}(x_i))],
    BCE(p(x′), y) = −log p_y(x′) − log(1 − max_{k≠y} p_k(x′)).

    x′ is L∞ PGD on the cross-entropy from x + 0.001·N(0, I), with BN in eval mode (the reference
    code calls ``model.eval()`` before its attack). Nothing is detached: the weight
    (1 − p_y(x)) and both distributions of the KL carry gradients, as in the paper's objective.
    """

    name = "mart"
    paper = "Wang et al., ICLR 2020"
    paper_attack = "mart"

    @dataclass
    class Options(ReferenceAttackOptions):
        # CIFAR-10 (Wang et al. 2020, §4; the reference train_wideresnet.py): the attack of
        # TRADES' code (ε = 0.031 ≈ 8/255, step 0.007, 10 steps) and λ = 6 for WideResNet-34-10
        # (the reference uses λ = 5 for ResNet-18).
        lam: float = option(6.0, Number(low=0, hint="the KL weight λ"))

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        x_adv = self.adversarial_examples(unwrap(model), x, y)
        logits_clean = model(x)
        logits_adv = model(x_adv)
        loss = mart_loss(logits_clean, logits_adv, y, self.opts.lam)
        logs = self.detach_logs(
            loss_clean=F.cross_entropy(logits_clean.detach(), y),
            loss_adv=boosted_cross_entropy(logits_adv.detach(), y).mean(),
        )
        return MethodOutput(loss=loss, logits=logits_clean, logs=logs)
