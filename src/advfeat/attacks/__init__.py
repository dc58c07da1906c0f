"""Attacks with one contract, in pixel space and in feature space.

``x_adv = advfeat.attacks.PGD(model, eps=8/255, alpha=2/255, steps=10)(x, y)``. Every attack
subclasses :class:`Attack`, which guarantees that the input is not mutated, the result lies in
the threat model's ball (and in [0, 1] for images), and that the model's flags, ``requires_grad``
flags, parameter gradients and BN running statistics are as they were.
"""

from advfeat.attacks.base import Attack, attack_guard, check_image_range
from advfeat.attacks.feature import (
    BNStatsAttack,
    FeatureAttack,
    FeaturePGD,
    MultiSiteFeaturePGD,
    advbn_feature,
    sample_strengths,
)
from advfeat.attacks.pixel import (
    CWL2,
    FGSM,
    GD,
    IFGSM,
    PGD,
    IterativeGradientAttack,
    advprop_pgd,
    advprop_pgd_steps,
    cw_margin_loss,
)
from advfeat.attacks.threat import L2, Linf, ThreatModel, Unbounded, threat_model

__all__ = [
    "CWL2",
    "FGSM",
    "GD",
    "IFGSM",
    "L2",
    "PGD",
    "Attack",
    "BNStatsAttack",
    "FeatureAttack",
    "FeaturePGD",
    "IterativeGradientAttack",
    "Linf",
    "MultiSiteFeaturePGD",
    "ThreatModel",
    "Unbounded",
    "advbn_feature",
    "advprop_pgd",
    "advprop_pgd_steps",
    "attack_guard",
    "check_image_range",
    "cw_margin_loss",
    "sample_strengths",
    "threat_model",
]
