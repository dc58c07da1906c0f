"""Loss landscapes around the trained weights (A-FAN Fig. 3), after Li et al. (NeurIPS 2018).

The loss is evaluated at θ + α·d₁ (1-D) and θ + α·d₁ + β·d₂ (2-D), where θ are the trained
weights and d₁, d₂ random *filter-normalised* directions (Li et al. 2018, §4):

* every direction is drawn from N(0, 1) per parameter tensor, with a seeded generator;
* for a weight of two or more dimensions (conv kernels, linear layers) each *filter* — each
  slice along the output dimension 0 — is rescaled to the norm of the same filter of θ:
  d_i ← d_i · ‖θ_i‖ / ‖d_i‖, so the landscape does not depend on the scale invariance that
  batch norm gives the weights before it;
* one-dimensional parameters (biases, BN weights and biases, also those of auxiliary BN
  branches) get a **zero** direction: they are kept at their trained values. This is the
  ``ignore='biasbn'`` convention of the authors' code, and the default here
  (``ignore_biasbn=True``); with ``ignore_biasbn=False`` their direction equals the parameter
  itself (the authors' code's other choice), so they are scaled by (1 + α).

The loss is the mean cross-entropy over fixed batches with the model in **eval mode**: batch
norm uses the trained running statistics, which are *not* re-estimated at each perturbed point
(so the surface is a deterministic function of the weights; Li et al. plot the same quantity for
the evaluation network). Accuracy at each point is recorded too. The weights are restored
bit-for-bit afterwards, and every module's train / eval flag, ``requires_grad`` and ``.grad``
are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.eval.accuracy import eval_mode

__all__ = [
    "filter_normalized_direction",
    "landscape_1d",
    "landscape_2d",
    "landscape_parameters",
    "loss_at",
    "summarize_1d",
]

Batch = tuple[Tensor, Tensor]


def landscape_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The floating-point parameters the landscape moves (shared ones listed once)."""
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]


def filter_normalized_direction(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    ignore_biasbn: bool = True,
) -> list[Tensor]:
    """A random direction in weight space, filter-normalised (Li et al. 2018, §4).

    One tensor per entry of :func:`landscape_parameters`, same shape and dtype. Weights with
    ≥ 2 dimensions: per output filter ``d[i] ← d[i]·‖w[i]‖/‖d[i]‖``. One-dimensional
    parameters: zero (``ignore_biasbn=True``) or a copy of the parameter.
    """
    out: list[Tensor] = []
    for _, p in landscape_parameters(model):
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        if w.dim() <= 1:
            d = torch.zeros_like(w) if ignore_biasbn else w.clone()
            out.append(d)
            continue
        wf = w.double().cpu().reshape(w.shape[0], -1)
        df = d.reshape(w.shape[0], -1)
        scale = wf.norm(dim=1) / (df.norm(dim=1) + 1e-10)
        out.append((df * scale[:, None]).reshape(w.shape).to(w))
    return out


@contextmanager
def _moved(model: nn.Module, directions: Sequence[Sequence[Tensor]]) -> Iterator[Any]:
    """Yield ``set_point(coefs)``: the weights become θ + Σ_k coefs[k]·directions[k]; θ is
    restored exactly on exit."""
    params = [p for _, p in landscape_parameters(model)]
    for d in directions:
        if len(d) != len(params):
            raise ValueError(
                f"a direction has {len(d)} tensors but the model has {len(params)} parameters"
            )
    base = [p.detach().clone() for p in params]

    def set_point(coefs: Sequence[float]) -> None:
        with torch.no_grad():
            for i, (p, w) in enumerate(zip(params, base, strict=True)):
                value = w.clone()
                for c, d in zip(coefs, directions, strict=True):
                    if c != 0:
                        value.add_(d[i], alpha=float(c))
                p.copy_(value)

    try:
        yield set_point
    finally:
        with torch.no_grad():
            for p, w in zip(params, base, strict=True):
                p.copy_(w)


@torch.no_grad()
def loss_at(model: nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` over all samples of ``batches``
    (eval mode; flags restored)."""
    total, loss, hits = 0, 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            logits = model(x)
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            hits += int((logits.argmax(1) == y).sum())
            total += int(y.shape[0])
    return loss / max(total, 1), hits / max(total, 1)


def landscape_1d(
    model: nn.Module,
    batches: Sequence[Batch],
    direction: Sequence[Tensor],
    alphas: Sequence[float],
) -> dict[str, list[float]]:
    """Loss and accuracy at θ + α·d for each α (``{"alpha", "loss", "accuracy"}``)."""
    losses, accs = [], []
    with _moved(model, [direction]) as set_point:
        for a in alphas:
            set_point([a])
            loss, acc = loss_at(model, batches)
            losses.append(loss)
            accs.append(acc)
    return {"alpha": [float(a) for a in alphas], "loss": losses, "accuracy": accs}


def landscape_2d(
    model: nn.Module,
    batches: Sequence[Batch],
    directions: tuple[Sequence[Tensor], Sequence[Tensor]],
    alphas: Sequence[float],
    betas: Sequence[float],
) -> dict[str, Any]:
    """Loss and accuracy at θ + α·d₁ + β·d₂ on the grid; ``loss[j][i]`` is at
    (α = alphas[i], β = betas[j]) (rows: β, as an image)."""
    losses: list[list[float]] = []
    accs: list[list[float]] = []
    with _moved(model, list(directions)) as set_point:
        for b in betas:
            row_l, row_a = [], []
            for a in alphas:
                set_point([a, b])
                loss, acc = loss_at(model, batches)
                row_l.append(loss)
                row_a.append(acc)
            losses.append(row_l)
            accs.append(row_a)
    return {
        "alpha": [float(a) for a in alphas],
        "beta": [float(b) for b in betas],
        "loss": losses,
        "accuracy": accs,
    }


def summarize_1d(curve: dict[str, list[float]]) -> dict[str, float | None]:
    """Flatness numbers of a 1-D curve: the loss at α = 0, the mean and largest increase over
    it, and the width of the α-interval around 0 where the loss stays below loss(0) + 1 (nats)."""
    alphas, losses = curve["alpha"], curve["loss"]
    if 0.0 not in alphas:
        return {"loss_at_zero": None}
    i0 = alphas.index(0.0)
    l0 = losses[i0]
    increases = [v - l0 for v in losses]
    lo = hi = i0
    while lo > 0 and losses[lo - 1] <= l0 + 1.0:
        lo -= 1
    while hi < len(alphas) - 1 and losses[hi + 1] <= l0 + 1.0:
        hi += 1
    return {
        "loss_at_zero": l0,
        "accuracy_at_zero": curve["accuracy"][i0],
        "mean_loss_increase": sum(increases) / len(increases),
        "max_loss_increase": max(increases),
        "width_loss_below_plus_1": alphas[hi] - alphas[lo],
    }
