"""PGD adversarial training (Madry et al. 2018): minimise the loss of the worst-case example."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.methods.adversarial import (
    EPS,
    INIT_STD,
    RANDOM_START,
    STEP,
    STEPS,
    PixelAdversarialTraining,
    pgd_at_loss,
)
from advfeat.methods.base import ATTACK_BN_MODE, MethodOutput, unwrap
from advfeat.methods.registry import register_method
from advfeat.norm.stats import frozen_bn_statistics
from advfeat.options import Flag, option

__all__ = ["PGDAT"]


@register_method
class PGDAT(PixelAdversarialTraining):
    """Madry et al. 2018, Eq. (2.1): min_θ E[max_{‖δ‖∞≤ε} CE(f_θ(x + δ), y)].

    The inner maximisation is L∞ PGD with a uniform random start, run with the model's BN layers
    in train mode (batch statistics), as in the released CIFAR-10 code, whose attack runs in the
    training graph; ``attack_bn_mode="eval"`` attacks with running statistics instead. The loss
    is the adversarial cross-entropy only (no clean term). With ``log_clean`` (default) one extra
    gradient-free clean forward, with BN statistics frozen, gives ``loss_clean`` and the clean
    logits for the training accuracy; ``log_clean=False`` saves it (``logits`` is then ``None``).
    """

    name = "pgd-at"
    paper = "Madry et al., ICLR 2018"
    paper_attack = "pgd-at"

    @dataclass
    class Options:
        # CIFAR-10 (Madry et al. 2018, §5 and the released cifar10_challenge config.json):
        # ε = 8/255, step 2/255, random start. The released config runs 10 steps; §5 of the
        # paper reports 7 steps for its CIFAR-10 training (set steps=7 for that reading).
        eps: float = option(8 / 255, EPS)
        alpha: float = option(2 / 255, STEP)
        steps: int = option(10, STEPS)
        random_start: str = option("uniform", RANDOM_START)
        init_std: float = option(0.001, INIT_STD)  # only used with random_start="normal"
        attack_bn_mode: str = option("train", ATTACK_BN_MODE)
        log_clean: bool = option(True, Flag())

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        net = unwrap(model)
        x_adv = self.adversarial_examples(net, x, y)
        logits_adv = model(x_adv)
        loss = pgd_at_loss(logits_adv, y)
        if not self.opts.log_clean:
            return MethodOutput(loss=loss, logits=None, logs=self.detach_logs(loss_adv=loss))
        with torch.no_grad(), frozen_bn_statistics(net):
            logits = model(x)
        logs = self.detach_logs(loss_clean=F.cross_entropy(logits, y), loss_adv=loss)
        return MethodOutput(loss=loss, logits=logits, logs=logs)
