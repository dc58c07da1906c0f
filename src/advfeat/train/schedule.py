"""Learning-rate schedules as pure functions of training progress (nothing to checkpoint)."""

from __future__ import annotations

import bisect
import math

from advfeat.errors import AdvfeatError

__all__ = ["check_warmup", "describe_schedule", "lr_factor", "warmup_length"]


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


def warmup_length(warmup_epochs: float, warmup_steps: int, steps_per_epoch: int) -> float:
    """The warm-up in epochs: the longer of ``warmup_epochs`` and ``warmup_steps`` optimiser
    steps."""
    return max(warmup_epochs, warmup_steps / max(steps_per_epoch, 1))


def check_warmup(
    warmup: float, *, total_epochs: int, schedule: str, milestones: list[float] | None
) -> None:
    """Refuse a warm-up (in epochs) that does not end before the first step decay, or before
    the end of the run: the rate would jump from the ramp straight to a decayed value."""
    if warmup <= 0:
        return
    if warmup >= total_epochs:
        raise AdvfeatError(
            f"the warm-up ({warmup:.3g} epochs) is as long as the run ({total_epochs} epochs): "
            f"shorten warmup_epochs / warmup_steps or train longer"
        )
    first = min((m * total_epochs for m in milestones or []), default=math.inf)
    if schedule == "multistep" and warmup > first:
        raise AdvfeatError(
            f"the warm-up ({warmup:.3g} epochs) ends after the first step decay (epoch "
            f"{first:.3g} of {total_epochs}): shorten warmup_epochs / warmup_steps, move the "
            f"milestones or train longer"
        )


def describe_schedule(
    *,
    lr: float,
    total_epochs: int,
    schedule: str,
    warmup: float,
    warmup_steps: int,
    milestones: list[float] | None = None,
    gamma: float = 0.1,
    power: float = 0.9,
) -> str:
    """One line that says which schedule a run trains with, e.g. ``lr 0.1, multistep ×0.1 at
    epochs 2, 6 of 8, linear warm-up over 200 steps (4.3 epochs)``."""
    if schedule == "multistep":
        points = ", ".join(f"{m * total_epochs:g}" for m in sorted(milestones or []))
        shape = f"multistep ×{gamma:g} at epochs {points} of {total_epochs}"
    elif schedule == "poly":
        shape = f"poly (1 - t)^{power:g} over {total_epochs} epochs"
    else:
        shape = f"{schedule} over {total_epochs} epochs"
    text = f"lr {lr:g}, {shape}"
    if warmup > 0:
        over = (
            f"{warmup_steps} steps ({warmup:.3g} epochs)"
            if warmup_steps
            else f"{warmup:.3g} epochs"
        )
        text += f", linear warm-up over {over}"
    return text
