"""``hessian``: top eigenvalue and trace of the training-loss Hessian w.r.t. the weights
(A-FAN Tab. 1), on a fixed seeded set of un-augmented training batches."""

from __future__ import annotations

from typing import Any

import torch

from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.hessian import hessian_trace, top_eigenvalue, weights_of
from advfeat.eval.suites.registry import register_suite

__all__ = ["run"]


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
)
def run(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.config
    source = "train" if ctx.data.train is not None else "test"
    dataset = ctx.data.train if ctx.data.train is not None else ctx.data.test
    subset = seeded_subset(dataset, cfg.hessian_batches * cfg.hessian_batch_size, cfg.seed)
    batches = list(ctx.batches(subset, batch_size=cfg.hessian_batch_size))
    n = sum(int(y.shape[0]) for _, y in batches)
    meta = {
        "data": source,
        "n": n,
        "batches": len(batches),
        "parameters": sum(p.numel() for p in weights_of(ctx.model)),
    }

    def eigen() -> dict[str, Any]:
        g = torch.Generator().manual_seed(ctx.seed_for("hessian/eigenvalue"))
        return top_eigenvalue(
            ctx.model, batches, iters=cfg.hessian_iters, tol=cfg.hessian_tol, generator=g
        )

    def trace() -> dict[str, Any]:
        g = torch.Generator().manual_seed(ctx.seed_for("hessian/trace"))
        return hessian_trace(ctx.model, batches, samples=cfg.hutchinson_samples, generator=g)

    bar = ctx.bar(2, "hessian")
    try:
        top = ctx.unit("hessian/eigenvalue", eigen)
        bar.update(1)
        tr = ctx.unit("hessian/trace", trace)
        bar.update(1)
    finally:
        bar.close()
    return {**meta, **top, **tr}
