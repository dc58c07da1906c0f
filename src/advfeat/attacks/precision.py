"""Precision of attacks under mixed precision (autocast).

Feature perturbations are small: ALFA's and A-FAN's step α = 0.5/255 ≈ 0.002 on features of
size 0.5-2, i.e. about one bfloat16 step (2⁻⁸ relative). Computed in bf16, δ or ``f + δ`` round
back to ``f`` and the augmentation disappears. So:

* δ is kept in float32 (or wider: :func:`wide_dtype`), whatever the feature's dtype, and every
  ascent step is taken in float32 (:class:`advfeat.attacks.engine.IterativeAscent`);
* the perturbed feature ``f + s·δ`` is added in float32 (:func:`add_perturbation`) and stays
  float32 while autocast is on; without autocast it is returned in the feature's dtype (a model
  converted to half precision needs its own dtype);
* the training pass of ALFA's and A-FAN's adversarial loss runs the tail after the site with
  autocast off when its feature is float32 (:func:`float32_tail`): a bf16 tail rounds the logits
  to bf16 (a step of 0.03 at a logit of 4), and A-FAN's normalized feature, which moves only the
  per-channel statistics, changes them by less than that, so that L_adv came out equal to
  L_clean bit for bit (measured on an H200: ResNet-20, PGD-5, α = 0.5/255). At the papers' site,
  the last block, that tail is the pooling and the classifier, whose cost is negligible. The
  attacks' own tails stay under autocast: they use only the sign of the gradient.

Float16 autocast: the gradient of the attack's objective can underflow in fp16 (below ≈ 6e-8
it flushes to zero, and a sign step of a zero gradient does not move δ). The attack objective is
then multiplied by :data:`FP16_ATTACK_LOSS_SCALE` before its backward, and divided again by
``2¹⁰`` per retry when the gradient overflows (:func:`attack_loss_scale`). Sign steps and
normalised (L2) steps do not depend on the scale, so the attack is unchanged except that
gradients that would have flushed to zero keep their sign. (The other choice, running attacks in
float32, would double the cost of every pixel attack.) Bfloat16 has float32's exponent range and
needs no scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "FP16_ATTACK_LOSS_SCALE",
    "add_perturbation",
    "attack_loss_scale",
    "autocast_dtype",
    "float32_tail",
    "perturbed_dtype",
    "wide_dtype",
]

FP16_ATTACK_LOSS_SCALE = 2.0**10
"""Initial multiplier of an attack objective under float16 autocast (see the module doc)."""


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a perturbation of a ``dtype`` tensor is kept in: at least float32."""
    if not dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type``, or ``None`` when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


def perturbed_dtype(feature: Tensor) -> torch.dtype:
    """The dtype of ``f + δ``: float32 (or wider) under autocast, else the feature's own."""
    if autocast_dtype(feature.device.type) is not None:
        return wide_dtype(feature.dtype)
    return feature.dtype


def add_perturbation(feature: Tensor, delta: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """``f + scale·δ`` computed in float32 (see the module doc), in :func:`perturbed_dtype`.

    Differentiable in ``feature``, ``delta`` and a tensor ``scale`` (L-ALFA's η).
    """
    wide = wide_dtype(feature.dtype)
    out = feature.to(wide) + scale * delta.to(wide)
    return out.to(perturbed_dtype(feature))


def attack_loss_scale(device_type: str) -> float:
    """Multiplier of an attack objective before its backward: :data:`FP16_ATTACK_LOSS_SCALE`
    under float16 autocast, else 1."""
    return FP16_ATTACK_LOSS_SCALE if autocast_dtype(device_type) == torch.float16 else 1.0


@contextmanager
def float32_tail(feature: Tensor) -> Iterator[None]:
    """Autocast off on ``feature``'s device inside the block when ``feature`` is float32 (or
    wider) while autocast computes in a lower precision: the tail after a site then runs in the
    feature's precision (see the module doc). Otherwise nothing changes."""
    device_type = feature.device.type
    low = autocast_dtype(device_type)
    wide = feature.is_floating_point() and feature.dtype == wide_dtype(feature.dtype)
    if low is None or not wide or torch.finfo(low).bits >= torch.finfo(feature.dtype).bits:
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield
