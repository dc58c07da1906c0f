"""Before an evaluation computes anything: the optional packages it will need, and what it is
about to do (sample sizes, an estimate of its duration on this machine)."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from advfeat.eval.config import EvalConfig
from advfeat.eval.suites import SUITES, options_of
from advfeat.tasks import is_classifier_task

__all__ = ["announce", "gradient_passes_per_image", "missing_packages"]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing_packages(cfg: EvalConfig, *, plots: bool) -> list[str]:
    """One line per missing optional package that ``cfg`` (and plotting) needs: each chosen
    suite decides for itself (its ``ready``), and plots need matplotlib."""
    missing: list[str] = []
    for name in cfg.suites:
        check = SUITES.get(name).ready
        missing += check(cfg) if check is not None else []
    if plots and not _installed("matplotlib"):
        missing.append("plots need matplotlib: pip install 'advfeat[plot]', or pass --no-plots")
    return list(dict.fromkeys(missing))


def gradient_passes_per_image(cfg: EvalConfig) -> int:
    """Forward + backward passes per test image of the ``attacks`` suite (AutoAttack excluded:
    it stops early on fooled points)."""
    if "attacks" not in cfg.suites:
        return 0
    opts = options_of(cfg, "attacks")
    passes = 0
    if "pgd" in opts.names:
        passes += opts.pgd_steps
    if "fgsm" in opts.names:
        passes += 1
    if "cw" in opts.names:
        passes += opts.cw_steps * opts.cw_search_steps
    if "curve" in opts.names:
        passes += opts.pgd_steps * sum(1 for e in opts.eps_curve if e > 0)
    return passes


def announce(ctx: Any) -> None:
    """Print the sample sizes and an estimate of the attacks' duration (one timed batch)."""
    cfg = ctx.config
    n = len(ctx.test_set())
    total = len(ctx.data.test)
    subset = f"a seeded subset of {n} of {total}" if n < total else f"all {total}"
    lines = [f"advfeat eval: {', '.join(cfg.suites)} on {subset} test images"]
    if cfg.max_images is not None:
        lines[0] += f" (at most {cfg.max_images}: --max-images N or --all-images change it)"
    passes = gradient_passes_per_image(cfg)
    if passes and is_classifier_task(cfg.task):
        x, y = next(ctx.batches(ctx.test_set(), batch_size=min(cfg.batch_size, 32)))
        x = x.clone().requires_grad_(True)
        timings = []
        for _ in range(2):  # the first pass pays one-off costs: time the second
            start = time.perf_counter()
            loss = F.cross_entropy(ctx.model(x), y)
            torch.autograd.grad(loss, x)
            timings.append(time.perf_counter() - start)
        per_image = timings[-1] / x.shape[0]
        minutes = per_image * passes * n / 60
        lines.append(
            f"  attacks: {passes} gradient passes per image, ≈ {minutes:.1f} min here "
            "(--max-images N changes the sample)"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)
