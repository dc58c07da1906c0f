"""Common corruptions at CIFAR-10-C's own severities, for 32-pixel images.

Hendrycks & Dietterich (ICLR 2019) built CIFAR-10-C with weaker parameters than ImageNet-C (e.g.
Gaussian noise σ 0.04-0.10 instead of 0.08-0.38); ``imagecorruptions`` only has ImageNet-C's,
written into its functions. This module implements 17 corruptions with the released CIFAR-10-C
parameters (``CIFAR_SEVERITIES``, per severity 1-5):

- noise: ``gaussian_noise`` (σ), ``shot_noise`` (Poisson rate), ``impulse_noise`` (salt-and-
  pepper fraction), ``speckle_noise`` (σ of the multiplicative noise);
- blur: ``gaussian_blur`` (σ in pixels), ``defocus_blur``, ``glass_blur``, ``motion_blur``,
  ``zoom_blur`` (:mod:`advfeat.eval.corruption_cifar_spatial`);
- weather: ``snow``, ``fog`` (same module);
- photometric: ``brightness`` (added to HSV value), ``saturate`` (HSV saturation ×a + b),
  ``contrast`` (factor towards the per-channel mean);
- digital: ``jpeg_compression`` (JPEG quality), ``pixelate`` (box down-/up-sampling factor),
  ``elastic_transform`` (same module).

``frost`` is not here: it blends the image with crops of frost photographs, which advfeat does
not ship; :mod:`advfeat.eval.corruption` runs it with ``imagecorruptions`` (which ships the
photographs) at ImageNet-C's parameters, and the results say so. Its CIFAR-10-C parameters are
listed in :data:`UNIMPLEMENTED_CIFAR_SEVERITIES` for reference.
Images are uint8 H×W×3 arrays; randomness comes from the given ``numpy`` generator.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from advfeat.eval.corruption_cifar_spatial import (
    defocus_blur,
    elastic_transform,
    fog,
    glass_blur,
    motion_blur_corruption,
    snow,
    zoom_blur,
)
from advfeat.eval.corruption_ops import gaussian_filter

__all__ = [
    "CIFAR_SEVERITIES",
    "UNIMPLEMENTED_CIFAR_SEVERITIES",
    "corrupt_cifar",
    "has_cifar_severities",
]

CIFAR_SEVERITIES: dict[str, tuple[object, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
    "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.90, 0.85, 0.75, 0.65),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "elastic_transform": (
        (0, 0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    ),
}
"""CIFAR-10-C's parameters (Hendrycks & Dietterich 2019, the released CIFAR generator); the
meaning of each tuple is in :mod:`advfeat.eval.corruption_cifar_spatial`."""

UNIMPLEMENTED_CIFAR_SEVERITIES: dict[str, tuple[object, ...]] = {
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
}
"""CIFAR-10-C parameters of corruptions run at ImageNet-C's instead: ``frost`` (weight of the
image, weight of a crop of a frost photograph shrunk to 0.2×) needs the photographs."""


def has_cifar_severities(name: str) -> bool:
    return name in CIFAR_SEVERITIES


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    hit = rng.random(x.shape) < c
    out[hit] = (rng.random(int(hit.sum())) < 0.5).astype(x.dtype)
    return out


def _speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(scale=c, size=x.shape)


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return gaussian_filter(x, c)


def _with_value(x: np.ndarray, value: np.ndarray) -> np.ndarray:
    """RGB with the HSV value replaced (hue and saturation kept): components scale with V."""
    v = x.max(axis=2, keepdims=True)
    scaled = x * np.divide(value, v, out=np.zeros_like(v), where=v > 0)
    return np.where(v > 0, scaled, value)


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    v = x.max(axis=2, keepdims=True)
    return _with_value(x, np.clip(v + c, 0, 1))


def _saturate(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """HSV saturation S → clip(a·S + b) at fixed hue and value. Each component is
    V·(1 − S·k) with k fixed by the hue; grey pixels have hue 0 (red), as in scikit-image."""
    a, b = c
    v = x.max(axis=2, keepdims=True)
    lo = x.min(axis=2, keepdims=True)
    s = np.divide(v - lo, v, out=np.zeros_like(v), where=v > 0)
    k = np.divide(v - x, v * s, out=np.zeros_like(x), where=(v * s) > 0)
    grey = (s == 0)[..., 0]
    k[grey] = np.array([0.0, 1.0, 1.0])
    new_s = np.clip(a * s + b, 0, 1)
    return v * (1 - new_s * k)


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * c + mean


def _to_pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))


def _jpeg(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _to_pil(x).save(buffer, "JPEG", quality=int(c))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64) / 255


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    img = _to_pil(x)
    small = img.resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255


_FUNCTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,  # type: ignore[dict-item]
    "shot_noise": _shot_noise,  # type: ignore[dict-item]
    "impulse_noise": _impulse_noise,  # type: ignore[dict-item]
    "speckle_noise": _speckle_noise,  # type: ignore[dict-item]
    "gaussian_blur": _gaussian_blur,  # type: ignore[dict-item]
    "brightness": _brightness,  # type: ignore[dict-item]
    "saturate": _saturate,  # type: ignore[dict-item]
    "contrast": _contrast,  # type: ignore[dict-item]
    "jpeg_compression": _jpeg,  # type: ignore[dict-item]
    "pixelate": _pixelate,  # type: ignore[dict-item]
    "defocus_blur": defocus_blur,  # type: ignore[dict-item]
    "glass_blur": glass_blur,  # type: ignore[dict-item]
    "motion_blur": motion_blur_corruption,  # type: ignore[dict-item]
    "zoom_blur": zoom_blur,  # type: ignore[dict-item]
    "snow": snow,  # type: ignore[dict-item]
    "fog": fog,  # type: ignore[dict-item]
    "elastic_transform": elastic_transform,  # type: ignore[dict-item]
}


def corrupt_cifar(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (H×W×3 uint8) corrupted with ``name`` at CIFAR-10-C ``severity`` (1-5)."""
    parameter = CIFAR_SEVERITIES[name][severity - 1]
    rng = np.random.default_rng(seed)
    x = image.astype(np.float64) / 255
    out = _FUNCTIONS[name](x, parameter, rng)
    out = np.clip(np.nan_to_num(out, nan=0.0), 0, 1)
    return (out * 255).astype(np.uint8)  # truncated, as the released generator stores them
