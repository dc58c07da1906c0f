"""The evaluation suites, one small module each, registered in :data:`SUITES`.

A suite is a function ``run(ctx: EvalContext) -> dict`` (JSON-ready); a suite that does not apply
to the model or data returns ``{"skipped": "<why>"}``.
"""

from advfeat.eval.suites import (
    advbn,
    attacks,
    bn,
    clean,
    corruptions,
    divergence,
    features,
    hessian,
    landscape,
    shift,
)
from advfeat.eval.suites.registry import SUITES, Suite, register_suite, skipped

__all__ = [
    "SUITES",
    "Suite",
    "advbn",
    "attacks",
    "bn",
    "clean",
    "corruptions",
    "divergence",
    "features",
    "hessian",
    "landscape",
    "register_suite",
    "shift",
    "skipped",
]
