"""TRADES (Zhang et al. 2019): clean cross-entropy plus β · KL between clean and adversarial."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.methods.adversarial import (
    PixelAdversarialTraining,
    ReferenceAttackOptions,
    clean_reference_logits,
    trades_kl,
    trades_loss,
)
from advfeat.methods.base import MethodOutput, unwrap
from advfeat.methods.registry import register_method
from advfeat.options import Number, option

__all__ = ["TRADES"]


@register_method
class TRADES(PixelAdversarialTraining):
    """Zhang et al. 2019, TRADES objective (§4, Alg. 1):

    min_θ CE(f(x), y) + β · max_{‖x′−x‖∞≤ε} KL(f(x) ‖ f(x′)),   β = 1/λ.

    The attack maximises Σ_i KL(f(x_i) ‖ f(x′_i)) towards the clean probabilities, starting at
    x + 0.001·N(0, I), with BN in eval mode as the reference code does (``model.eval()`` before
    the attack); its target f(x) is computed in the same BN mode, so the KL is zero at δ = 0.
    With ``attack_bn_mode="train"`` the training forward's clean logits are reused as target.
    Gradients of the loss flow through both f(x) and f(x′), as in the paper.
    """

    name = "trades"
    paper = "Zhang et al., ICML 2019"
    paper_attack = "trades"

    @dataclass
    class Options(ReferenceAttackOptions):
        # CIFAR-10 (Zhang et al. 2019, §5.2; the reference train_trades_cifar10.py):
        # ε = 0.031 (≈ 8/255), step η₁ = 0.007, K = 10 iterations, 1/λ = β = 6.
        beta: float = option(6.0, Number(low=0, hint="= 1/λ"))

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        net = unwrap(model)
        bn_mode = self.opts.attack_bn_mode
        if bn_mode == "train":  # target = the training forward's clean logits (same values)
            logits_clean = model(x)
            target = clean_reference_logits(net, x, bn_mode=bn_mode, train_logits=logits_clean)
            x_adv = self.adversarial_examples(net, x, y, clean_logits=target)
        else:  # the reference order: attack first, then the training forwards
            target = clean_reference_logits(net, x, bn_mode=bn_mode)
            x_adv = self.adversarial_examples(net, x, y, clean_logits=target)
            logits_clean = model(x)
        logits_adv = model(x_adv)
        loss = trades_loss(logits_clean, logits_adv, y, self.opts.beta)
        kl = trades_kl(logits_clean.detach(), logits_adv.detach()).mean()
        logs = self.detach_logs(
            loss_clean=F.cross_entropy(logits_clean.detach(), y),
            loss_adv=self.opts.beta * kl,
            kl=kl,
        )
        return MethodOutput(loss=loss, logits=logits_clean, logs=logs)
