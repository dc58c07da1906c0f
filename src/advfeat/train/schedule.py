"""Learning-rate schedules as pure functions of training progress (nothing to checkpoint)."""

from __future__ import annotations

import bisect
import math

__all__ = ["lr_factor"]


def lr_factor(
    progress: float,
    *,
    total_epochs: int,
    schedule: str,
    warmup_epochs: float = 0.0,
    milestones: list[float] | None = None,
    gamma: float = 0.1,
    power: float = 0.9,
) -> float:
    """Multiplier of the base learning rate at ``progress`` epochs (a float: epoch + step/steps).

    * linear warm-up from ~0 to 1 over ``warmup_epochs`` (Goyal et al., the ImageNet recipes);
    * ``"multistep"``: ×``gamma`` at each milestone, milestones given as fractions of the run
      (the CIFAR recipes: 0.5 and 0.75 of 200 epochs = epochs 100 and 150);
    * ``"cosine"``: half-cosine from 1 to 0 over the epochs after warm-up;
    * ``"poly"``: ``(1 - t)^power`` with ``t`` the fraction of the epochs after warm-up done
      (DeepLab's polynomial decay, power 0.9: A-FAN Table S9's segmentation recipes);
    * ``"constant"``: 1.
    """
    if warmup_epochs > 0 and progress < warmup_epochs:
        return (progress + 1e-3) / warmup_epochs
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        points = sorted(m * total_epochs for m in (milestones or []))
        return gamma ** bisect.bisect_right(points, progress)
    span = max(total_epochs - warmup_epochs, 1e-8)
    t = min(max((progress - warmup_epochs) / span, 0.0), 1.0)
    if schedule == "poly":
        return float((1.0 - t) ** power)
    return 0.5 * (1.0 + math.cos(math.pi * t))
