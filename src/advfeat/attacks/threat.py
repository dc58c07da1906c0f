"""Threat models: how a perturbation steps, starts and is projected.

A threat model is a small strategy object shared by pixel attacks (PGD, FGSM, ...) and feature
attacks (feature PGD). ``eps`` may be a float or a per-sample tensor of shape ``(B,)``; both give
the same result for the same values.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from advfeat.attacks.base import finite_checks_deferred
from advfeat.errors import AdvfeatError, unknown_name

__all__ = [
    "L2",
    "Budget",
    "Linf",
    "ThreatModel",
    "Unbounded",
    "as_batch_eps",
    "check_budget",
    "check_steps",
    "threat_model",
]

Budget = float | Tensor
"""A scalar ε / α, or one value per sample (shape ``(B,)``)."""


def check_budget(value: Budget, name: str, *, positive: bool = False) -> Budget:
    """Validate ε, α or another attack strength: a finite number ≥ 0 (> 0 when ``positive``),
    scalar or per-sample of shape ``(B,)``; returns it as a float or a float tensor."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, Tensor):
        if value.ndim > 1 or value.numel() == 0:
            raise AdvfeatError(
                f"{name} must be a number or a per-sample tensor of shape (B,), got shape "
                f"{tuple(value.shape)}"
            )
        v = value.detach()
        if not v.is_floating_point():
            v = v.float()
        if finite_checks_deferred():  # the caller watches what it flows into (no device read)
            return v
        finite = torch.isfinite(v)
        out_of_range = v <= 0 if positive else v < 0
        if bool((~finite | out_of_range).any()):  # one read from the device when valid
            if not bool(finite.all()):
                raise AdvfeatError(f"{name} must be finite, got {value}")
            raise AdvfeatError(f"{name} must be {bound}, got {value}")
        return v
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AdvfeatError(f"{name} must be a number or a per-sample tensor, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise AdvfeatError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def check_steps(steps: int, name: str = "steps", *, minimum: int = 0) -> int:
    """An iteration count: an integer (not a bool) ``>= minimum``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise AdvfeatError(f"{name} must be an integer >= {minimum}, got {steps!r}")
    return steps


def as_batch_eps(eps: float | Tensor, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample ``eps`` to shape ``(B, 1, ..., 1)`` matching ``like``.

    A number is filled in on ``like``'s device (no copy from the host, which would wait for the
    device); a tensor is moved there.
    """
    if not isinstance(eps, Tensor):
        e = torch.full((like.shape[0],), float(eps), dtype=like.dtype, device=like.device)
        return e.view(-1, *([1] * (like.ndim - 1)))
    e = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if e.ndim == 0:
        e = e.expand(like.shape[0])
    if e.shape != (like.shape[0],):
        raise AdvfeatError(
            f"per-sample eps must have shape ({like.shape[0]},) to match the batch, got {tuple(e.shape)}"
        )
    return e.view(-1, *([1] * (like.ndim - 1)))


def _per_sample_norm(t: Tensor, p: float) -> Tensor:
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


class ThreatModel(ABC):
    """Strategy for one norm: ``step`` (steepest ascent direction), ``project``, ``random_init``."""

    name: str = ""
    bounded: bool = True

    @abstractmethod
    def step(self, grad: Tensor, alpha: Tensor) -> Tensor:
        """The ascent step of size ``alpha`` along ``grad`` (steepest ascent for this norm)."""

    @abstractmethod
    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        """The closest point of the ε-ball to ``delta``."""

    @abstractmethod
    def random_init(self, like: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random start inside the ε-ball."""

    def norm(self, delta: Tensor) -> Tensor:
        """Per-sample size of ``delta`` in this norm, shape ``(B,)``."""
        return delta.flatten(1).abs().amax(dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Linf(ThreatModel):
    """‖δ‖∞ ≤ ε: sign-gradient steps, clamping projection (Madry et al., Eq. 2 of ALFA)."""

    name = "linf"

    def step(self, grad: Tensor, alpha: Tensor) -> Tensor:
        return alpha * grad.sign()

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(delta, eps), -eps)

    def random_init(self, like: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (2 * u - 1) * eps


class L2(ThreatModel):
    """‖δ‖₂ ≤ ε: normalised-gradient steps, radial projection."""

    name = "l2"

    def step(self, grad: Tensor, alpha: Tensor) -> Tensor:
        return alpha * grad / _per_sample_norm(grad, 2).clamp_min(1e-12)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        n = _per_sample_norm(delta, 2)
        return delta * torch.minimum(torch.ones_like(n), eps / n.clamp_min(1e-12))

    def random_init(self, like: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
        g = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        direction = g / _per_sample_norm(g, 2).clamp_min(1e-12)
        r = torch.rand((like.shape[0],), generator=generator, device=like.device, dtype=like.dtype)
        return direction * r.view_as(eps) * eps

    def norm(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).norm(dim=1)


class Unbounded(ThreatModel):
    """No ε-ball: sign-gradient steps of size α and no projection.

    This is ALFA's and A-FAN's feature attack (ε = ∞ turns PGD into plain sign-gradient ascent,
    ALFA §3.1) and AdvProp's "GD" attack (Table 7). ``eps`` is ignored.
    """

    name = "unbounded"
    bounded = False

    def step(self, grad: Tensor, alpha: Tensor) -> Tensor:
        return alpha * grad.sign()

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        return delta

    def random_init(self, like: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.zeros_like(like)


_THREATS: dict[str, type[ThreatModel]] = {"linf": Linf, "l2": L2, "unbounded": Unbounded}


def threat_model(norm: str | ThreatModel) -> ThreatModel:
    """``"linf"``, ``"l2"`` or ``"unbounded"`` (or a :class:`ThreatModel`) → a threat model."""
    if isinstance(norm, ThreatModel):
        return norm
    key = norm.lower() if isinstance(norm, str) else str(norm)
    if key in ("inf", "linfty"):
        key = "linf"
    if key not in _THREATS:
        raise unknown_name("norm", str(norm), _THREATS)
    return _THREATS[key]()
