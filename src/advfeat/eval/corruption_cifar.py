"""Common corruptions at CIFAR-10-C's own severities, for 32-pixel images.

Hendrycks & Dietterich (ICLR 2019) built CIFAR-10-C with weaker parameters than ImageNet-C (e.g.
Gaussian noise σ 0.04-0.10 instead of 0.08-0.38); ``imagecorruptions`` only has ImageNet-C's.
This module implements the corruptions whose CIFAR-10-C version is a parameter change of a
simple operation, with the released parameters (``CIFAR_SEVERITIES``, per severity 1-5):

- noise: ``gaussian_noise`` (σ), ``shot_noise`` (Poisson rate), ``impulse_noise`` (salt-and-
  pepper fraction), ``speckle_noise`` (σ of the multiplicative noise);
- ``gaussian_blur`` (σ in pixels);
- photometric: ``brightness`` (added to HSV value), ``saturate`` (HSV saturation ×a + b),
  ``contrast`` (factor towards the per-channel mean);
- digital: ``jpeg_compression`` (JPEG quality), ``pixelate`` (box down-/up-sampling factor).

The other benchmark corruptions (defocus, glass, motion and zoom blur, snow, frost, fog, elastic)
need generators not reimplemented here; :mod:`advfeat.eval.corruption` runs them with
``imagecorruptions`` at ImageNet-C severities and the results say so per corruption.
Images are uint8 H×W×3 arrays; randomness comes from the given ``numpy`` generator.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = ["CIFAR_SEVERITIES", "corrupt_cifar", "has_cifar_severities"]

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
}
"""CIFAR-10-C's parameters (Hendrycks & Dietterich 2019, the released CIFAR generator)."""


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


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(4 * sigma + 0.5))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    kernel = _gaussian_kernel(c)
    r = len(kernel) // 2
    out = x
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(x.ndim)]
        padded = np.pad(out, pad, mode="edge")
        out = sum(
            k * np.take(padded, range(i, i + x.shape[axis]), axis=axis)
            for i, k in enumerate(kernel)
        )
    return out


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
}


def corrupt_cifar(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (H×W×3 uint8) corrupted with ``name`` at CIFAR-10-C ``severity`` (1-5)."""
    parameter = CIFAR_SEVERITIES[name][severity - 1]
    rng = np.random.default_rng(seed)
    x = image.astype(np.float64) / 255
    out = _FUNCTIONS[name](x, parameter, rng)
    out = np.clip(np.nan_to_num(out, nan=0.0), 0, 1)
    return (out * 255).astype(np.uint8)  # truncated, as the released generator stores them
