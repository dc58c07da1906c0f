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

__all__ = ["announce", "gradient_passes_per_image", "missing_packages"]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _needs_imagecorruptions(cfg: EvalConfig) -> bool:
    from advfeat.eval.corruption_cifar import has_cifar_severities

    if cfg.corruption_set != "generated":
        return False
    if cfg.corruption_scale == "cifar":
        return not all(has_cifar_severities(c) for c in cfg.corruptions)
    return True  # ImageNet-C severities (or ``auto`` on images that may be larger than 32 px)


def missing_packages(cfg: EvalConfig, *, plots: bool) -> list[str]:
    """One line per missing optional package that ``cfg`` (and plotting) needs."""
    from advfeat.eval.autoattack import MISSING_HINT, autoattack_backend

    missing: list[str] = []
    corruptions = "corruptions" in cfg.suites or (
        "bn" in cfg.suites and "corruptions" in cfg.bn_suites
    )
    if corruptions and _needs_imagecorruptions(cfg) and not _installed("imagecorruptions"):
        missing.append(
            "the corruptions suite needs the optional package imagecorruptions: "
            "pip install 'advfeat[corruptions]' (installs imagecorruptions-imaug)"
        )
    wants_aa = {"autoattack", "autoattack-fast"} & set(cfg.attacks)
    if "attacks" in cfg.suites and wants_aa and autoattack_backend() is None:
        missing.append(f"AutoAttack was asked for, but {MISSING_HINT}")
    if plots and not _installed("matplotlib"):
        missing.append("plots need matplotlib: pip install 'advfeat[plot]', or pass --no-plots")
    return missing


def gradient_passes_per_image(cfg: EvalConfig) -> int:
    """Forward + backward passes per test image of the ``attacks`` suite (AutoAttack excluded:
    it stops early on fooled points)."""
    if "attacks" not in cfg.suites:
        return 0
    passes = 0
    if "pgd" in cfg.attacks:
        passes += cfg.pgd_steps
    if "fgsm" in cfg.attacks:
        passes += 1
    if "cw" in cfg.attacks:
        passes += cfg.cw_steps * cfg.cw_search_steps
    if "curve" in cfg.attacks:
        passes += cfg.pgd_steps * sum(1 for e in cfg.eps_curve if e > 0)
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
    if passes and cfg.task == "classification":
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
