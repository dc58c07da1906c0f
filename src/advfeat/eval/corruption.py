"""Common corruptions generated on the fly and the mCE metric.

Severities: ``scale="cifar"`` uses CIFAR-10-C's parameters wherever
:mod:`advfeat.eval.corruption_cifar` implements them (17 corruptions, no extra package needed);
``frost`` (:data:`IMAGENET_ONLY`), and every corruption under ``scale="imagenet"``, uses
ImageNet-C's parameters through the ``imagecorruptions`` package (install the extra
``advfeat[corruptions]``, which pulls its maintained fork ``imagecorruptions-imaug``; the
original 1.1.2 release fails on NumPy ≥ 2). The package needs images of at least 32×32 pixels:
smaller images are enlarged bilinearly to 32 pixels on their short side, corrupted, and shrunk
back with area averaging (recorded in the results as ``corrupted_at``).

Every image gets its own seed, so a corrupted test set does not depend on batch size or order;
NumPy's global random state is restored afterwards.

mCE (Hendrycks & Dietterich 2019, Eq. in §3): for corruption c, CE_c = Σ_s E_{s,c} / Σ_s E^base_{s,c}
with E the top-1 error at severity s; mCE is the mean of CE_c over corruptions. Relative mCE uses
E_{s,c} − E_clean in numerator and denominator.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from advfeat.errors import AdvfeatError
from advfeat.eval.corruption_cifar import corrupt_cifar, has_cifar_severities

__all__ = [
    "ALEXNET_ERRORS",
    "ALEXNET_MEAN_ERRORS",
    "IMAGENET_ONLY",
    "MIN_SIZE",
    "MISSING_IMAGECORRUPTIONS",
    "SCALES",
    "corrupt_batch",
    "corruption_errors",
    "require_imagecorruptions",
    "severity_scale",
]

SCALES = ("cifar", "imagenet")
"""Whose severity parameters: CIFAR-10-C's or ImageNet-C's."""


ALEXNET_MEAN_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
"""AlexNet's ImageNet-C top-1 error per corruption, averaged over severities 1-5 (the published
normaliser of ImageNet-C's mCE, Hendrycks & Dietterich 2019)."""

ALEXNET_ERRORS: dict[str, dict[str, float]] = {
    name: {str(s): 1 - err for s in range(1, 6)} for name, err in ALEXNET_MEAN_ERRORS.items()
}
"""The same as per-severity *accuracies* for :func:`corruption_errors` (equal per severity: only
the sum over all five severities is published, so use it with all five)."""


IMAGENET_ONLY: dict[str, str] = {
    "frost": (
        "ImageNet-C parameters: CIFAR-10-C's frost (image weight, frost weight) = "
        "(1, 0.2) … (0.75, 0.45) blends crops of frost photographs shrunk to 0.2×, which "
        "advfeat does not ship; imagecorruptions ships them but writes ImageNet-C's weights "
        "(1, 0.4) … (0.6, 0.75) and scale into its frost function"
    ),
}
"""Why a corruption runs at ImageNet-C's parameters even when CIFAR-10-C's are asked for."""


def severity_scale(name: str, scale: str) -> str:
    """The scale corruption ``name`` actually runs at when ``scale`` is asked for."""
    return "cifar" if scale == "cifar" and has_cifar_severities(name) else "imagenet"


MIN_SIZE = 32
"""The smallest image side ``imagecorruptions`` accepts."""


MISSING_IMAGECORRUPTIONS = (
    "the corruptions suite needs the optional package imagecorruptions: "
    "pip install 'advfeat[corruptions]' (installs imagecorruptions-imaug)"
)


def require_imagecorruptions() -> Any:
    """The ``imagecorruptions`` module, or a clear error naming the extra to install."""
    try:
        import imagecorruptions
    except ImportError:
        raise AdvfeatError(MISSING_IMAGECORRUPTIONS) from None
    return imagecorruptions


def corrupted_size(height: int, width: int) -> tuple[int, int]:
    """The size images are corrupted at (at least :data:`MIN_SIZE` on the short side)."""
    short = min(height, width)
    if short >= MIN_SIZE:
        return height, width
    scale = MIN_SIZE / short
    return max(MIN_SIZE, round(height * scale)), max(MIN_SIZE, round(width * scale))


def _accepts_seed(fn: Any) -> bool:
    try:
        return "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def corrupt_batch(
    images: Tensor, name: str, severity: int, seeds: Sequence[int], *, scale: str = "imagenet"
) -> Tensor:
    """Corrupt ``images`` (B, C, H, W in [0, 1], C = 1 or 3) with ``name`` at ``severity`` (1-5),
    with CIFAR-10-C's parameters where ``scale="cifar"`` and they are implemented, else
    ImageNet-C's (:func:`severity_scale`)."""
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise AdvfeatError(f"corruption severity must be an integer 1 to 5, got {severity!r}")
    if scale not in SCALES:
        from advfeat.errors import unknown_name

        raise unknown_name("corruption severity scale", scale, SCALES)
    if severity_scale(name, scale) == "cifar":
        return _corrupt_cifar_batch(images, name, severity, seeds)
    ic = require_imagecorruptions()
    functions = getattr(ic, "corruption_dict", {})
    if name not in functions:
        from advfeat.errors import unknown_name

        raise unknown_name("corruption", name, list(functions) or ic.get_corruption_names("all"))
    batch, channels, height, width = images.shape
    if channels not in (1, 3):
        raise AdvfeatError(f"corruptions need 1- or 3-channel images, got {channels} channels")
    size = corrupted_size(height, width)
    work = images.detach().float().cpu()
    if size != (height, width):
        work = F.interpolate(work, size=size, mode="bilinear", align_corners=False)
    arrays = (work.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    kwargs_for_seed = _accepts_seed(functions[name])
    state = np.random.get_state()
    out = []
    try:
        for array, seed in zip(arrays, seeds, strict=True):
            np.random.seed(seed % (2**32))
            image = array[..., 0] if channels == 1 else array
            extra = {"seed": seed} if kwargs_for_seed else {}
            corrupted = ic.corrupt(image, corruption_name=name, severity=severity, **extra)
            corrupted = np.array(corrupted, dtype=np.uint8)  # a writable copy
            if channels == 1 and corrupted.ndim == 3:
                corrupted = corrupted.mean(axis=2, keepdims=True)
            elif corrupted.ndim == 2:
                corrupted = corrupted[..., None]
            out.append(torch.from_numpy(np.ascontiguousarray(corrupted)).float().div(255))
    finally:
        np.random.set_state(state)
    result = torch.stack(out).permute(0, 3, 1, 2)
    if size != (height, width):
        result = F.interpolate(result, size=(height, width), mode="area")
    return (
        result.clamp(0, 1)
        .to(device=images.device, dtype=images.dtype)
        .reshape(batch, channels, height, width)
    )


def _corrupt_cifar_batch(images: Tensor, name: str, severity: int, seeds: Sequence[int]) -> Tensor:
    channels = images.shape[1]
    if channels not in (1, 3):
        raise AdvfeatError(f"corruptions need 1- or 3-channel images, got {channels} channels")
    work = images.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1)
    arrays = (work * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = [
        torch.from_numpy(corrupt_cifar(array, name, severity, seed))
        for array, seed in zip(arrays, seeds, strict=True)
    ]
    result = torch.stack(out).permute(0, 3, 1, 2).float().div(255)
    if channels == 1:
        result = result.mean(dim=1, keepdim=True)
    return result.to(device=images.device, dtype=images.dtype)


def corruption_errors(
    accuracy: dict[str, dict[str, float]],
    baseline: dict[str, dict[str, float]],
    *,
    clean_accuracy: float | None = None,
    baseline_clean_accuracy: float | None = None,
) -> dict[str, Any]:
    """CE_c, mCE (and relative CE_c, relative mCE when both clean accuracies are given).

    ``accuracy[c][str(s)]`` is top-1 accuracy under corruption c at severity s; ``baseline`` the
    same for the normalising model. Every (c, s) of ``accuracy`` must be in ``baseline``.
    CE_c is ``None`` where the baseline's error sum is zero, and mCE averages the defined CE_c
    (the undefined ones are listed under ``ce_undefined``).
    """
    missing = [
        f"{c}@{s}" for c, row in accuracy.items() for s in row if s not in baseline.get(c, {})
    ]
    if missing:
        raise AdvfeatError(
            f"the baseline has no result for {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}; evaluate it with the same corruptions and "
            "severities"
        )
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    for c, row in accuracy.items():
        err = sum(1 - a for a in row.values())
        base = sum(1 - baseline[c][s] for s in row)
        ce[c] = err / base if base > 0 else None
        if clean_accuracy is not None and baseline_clean_accuracy is not None:
            num = sum((1 - a) - (1 - clean_accuracy) for a in row.values())
            den = sum((1 - baseline[c][s]) - (1 - baseline_clean_accuracy) for s in row)
            rel[c] = num / den if den > 0 else None
    out: dict[str, Any] = {"ce": ce, "mce": _mean_defined(ce)}
    undefined = [c for c, v in ce.items() if v is None]
    if undefined:
        out["ce_undefined"] = undefined
    if rel:
        out["relative_ce"] = rel
        out["relative_mce"] = _mean_defined(rel)
    return out


def _mean_defined(values: dict[str, float | None]) -> float | None:
    """Mean over the defined values; a CE is undefined (``None``) when the baseline makes no
    error on that corruption (the normalising denominator is zero)."""
    defined = [v for v in values.values() if v is not None]
    return sum(defined) / len(defined) if defined else None
