"""``hessian``: top eigenvalue and trace of the training-loss Hessian w.r.t. the weights
(A-FAN Tab. 1), on a fixed seeded set of un-augmented training batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from advfeat.eval.config import POSITIVE
from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.hessian import hessian_trace, top_eigenvalue, weights_of
from advfeat.eval.suites.registry import options_of, register_suite
from advfeat.options import Integer, option

__all__ = ["HessianOptions", "run"]


@dataclass
class HessianOptions:
    """Settings of the ``hessian`` suite (``--set hessian.iters=50``)."""

    batches: int = option(2, Integer(low=1))
    """Seeded training batches the loss is taken over."""
    batch_size: int = option(64, Integer(low=1))
    iters: int = option(20, Integer(low=1))
    """Most power iterations for the top eigenvalue."""
    tol: float = option(1e-3, POSITIVE)
    """Relative change of the eigenvalue estimate that stops the power iteration."""
    hutchinson_samples: int = option(20, Integer(low=1))
    """Rademacher probes of Hutchinson's trace estimate."""


def report(h: dict[str, Any], _task: str) -> list[str]:
    """Top eigenvalue and trace of the training loss's Hessian."""
    return [
        f"Top eigenvalue {h['eigenvalue']:.5g} ({h['iterations']} power iterations, "
        f"{'converged' if h['converged'] else 'not converged'}); trace {h['trace']:.5g} ± "
        f"{h['stderr']:.2g} (Hutchinson, {h['samples']} samples); {h['n']} {h['data']} images, "
        f"{h['parameters']} weights.",
        "",
    ]


@register_suite(
    "hessian",
    "top Hessian eigenvalue (power iteration) and trace (Hutchinson)",
    order=60,
    title="Hessian of the training loss (A-FAN Tab. 1)",
    report=report,
    options=HessianOptions,
    aliases={
        "hessian_batches": "batches",
        "hessian_batch_size": "batch_size",
        "hessian_iters": "iters",
        "hessian_tol": "tol",
        "hutchinson_samples": "hutchinson_samples",
    },
)
def run(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.config
    opts: HessianOptions = options_of(cfg, "hessian")
    source = "train" if ctx.data.train is not None else "test"
    dataset = ctx.data.train if ctx.data.train is not None else ctx.data.test
    subset = seeded_subset(dataset, opts.batches * opts.batch_size, cfg.seed)
    batches = list(ctx.batches(subset, batch_size=opts.batch_size))
    n = sum(int(y.shape[0]) for _, y in batches)
    meta = {
        "data": source,
        "n": n,
        "batches": len(batches),
        "parameters": sum(p.numel() for p in weights_of(ctx.model)),
    }

    def eigen() -> dict[str, Any]:
        g = torch.Generator().manual_seed(ctx.seed_for("hessian/eigenvalue"))
        return top_eigenvalue(ctx.model, batches, iters=opts.iters, tol=opts.tol, generator=g)

    def trace() -> dict[str, Any]:
        g = torch.Generator().manual_seed(ctx.seed_for("hessian/trace"))
        return hessian_trace(ctx.model, batches, samples=opts.hutchinson_samples, generator=g)

    bar = ctx.bar(2, "hessian")
    try:
        top = ctx.unit("hessian/eigenvalue", eigen)
        bar.update(1)
        tr = ctx.unit("hessian/trace", trace)
        bar.update(1)
    finally:
        bar.close()
    return {**meta, **top, **tr}
