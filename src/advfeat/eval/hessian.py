"""Curvature of the training loss w.r.t. the weights (A-FAN Tab. 1: spectral norm and trace).

The loss is the mean cross-entropy over a fixed set of batches (model in eval mode, so BN uses
its running statistics and the loss is a deterministic function of the weights). Hessian-vector
products use double back-propagation (Pearlmutter's trick), never the full Hessian:

* top eigenvalue — power iteration v ← Hv/‖Hv‖ with the Rayleigh quotient λ = vᵀHv, stopped when
  λ changes by less than ``tol``·|λ|. Power iteration finds the eigenvalue of largest magnitude,
  which is the spectral norm ‖H‖₂ that A-FAN reports (its sign is kept in ``eigenvalue``);
* trace — Hutchinson's estimator E[vᵀHv] with Rademacher v (mean and standard error over
  ``samples`` draws).

Parameter ``.grad`` fields and ``requires_grad`` flags are left as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["hessian_trace", "hessian_vector_product", "top_eigenvalue", "weights_of"]

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def weights_of(model: nn.Module) -> list[nn.Parameter]:
    """Every floating-point parameter of ``model`` (the weights the Hessian is taken w.r.t.)."""
    return [p for p in model.parameters() if p.is_floating_point()]


@contextmanager
def _differentiable(params: Sequence[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _sum_loss(output: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(output, y, reduction="sum")


def hessian_vector_product(
    model: nn.Module,
    batches: Sequence[Batch],
    params: Sequence[nn.Parameter],
    vector: Sequence[Tensor],
    *,
    loss_fn: LossFn = _sum_loss,
) -> list[Tensor]:
    """H·v for the mean loss over all samples of ``batches`` (``loss_fn`` returns a sum)."""
    total = sum(int(y.shape[0]) for _, y in batches)
    out = [torch.zeros_like(p) for p in params]
    with _differentiable(params), torch.enable_grad():
        for x, y in batches:
            loss = loss_fn(model(x), y) / total
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
            hv = torch.autograd.grad(dot, params, allow_unused=True)  # type: ignore[arg-type]
            for acc, h in zip(out, hv, strict=True):
                if h is not None:
                    acc.add_(h.detach())
    return out


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def top_eigenvalue(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    loss_fn: LossFn = _sum_loss,
) -> dict[str, float | int | bool]:
    """Largest-magnitude Hessian eigenvalue by power iteration (``eigenvalue``, ``iterations``)."""
    params = weights_of(model)
    v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    norm = math.sqrt(_dot(v, v))
    v = [t / norm for t in v]
    eigen, converged, step = 0.0, False, 0
    for step in range(1, iters + 1):
        hv = hessian_vector_product(model, batches, params, v, loss_fn=loss_fn)
        new = _dot(v, hv)
        size = math.sqrt(_dot(hv, hv))
        if size == 0:
            eigen, converged = 0.0, True
            break
        v = [t / size for t in hv]
        if step > 1 and abs(new - eigen) <= tol * abs(new) + 1e-12:
            eigen, converged = new, True
            break
        eigen = new
    return {
        "eigenvalue": eigen,
        "spectral_norm": abs(eigen),
        "iterations": step,
        "converged": converged,
    }


def hessian_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    samples: int = 20,
    generator: torch.Generator | None = None,
    loss_fn: LossFn = _sum_loss,
) -> dict[str, float | int]:
    """Hutchinson's trace estimate tr(H) ≈ mean vᵀHv over Rademacher ``v``."""
    params = weights_of(model)
    values = []
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
        values.append(_dot(v, hessian_vector_product(model, batches, params, v, loss_fn=loss_fn)))
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / max(len(values) - 1, 1)
    return {"trace": mean, "stderr": math.sqrt(var / len(values)), "samples": len(values)}
