"""NumPy image operations the generated corruptions are composed of (no SciPy / OpenCV needed).

Images are float H×W×C arrays. Border handling is named as in :func:`numpy.pad`: ``"edge"``
repeats the last pixel, ``"reflect"`` mirrors without repeating it (OpenCV's default border),
``"symmetric"`` mirrors with it (SciPy's ``reflect``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "bilinear_sample",
    "clipped_zoom",
    "convolve",
    "disk_kernel",
    "filter_separable",
    "gaussian_filter",
    "gaussian_kernel",
    "motion_blur",
    "plasma_fractal",
]


def gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian of ``sigma`` on ``-radius … radius``."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def filter_separable(x: np.ndarray, kernel: np.ndarray, mode: str = "edge") -> np.ndarray:
    """``x`` correlated with ``kernel`` (summing to 1) along rows, then along columns (axes 0
    and 1); summed as ``x + Σ k·(neighbour − x)``, so a flat region keeps its exact value."""
    r = len(kernel) // 2
    out = x
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(x.ndim)]
        padded = np.pad(out, pad, mode=mode)  # type: ignore[call-overload]
        n = x.shape[axis]
        out = out + sum(
            k * (np.take(padded, range(i, i + n), axis=axis) - out) for i, k in enumerate(kernel)
        )
    return out


def gaussian_filter(
    x: np.ndarray, sigma: float, *, truncate: float = 4.0, mode: str = "edge"
) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels over axes 0 and 1, cut at ``truncate`` σ
    (scikit-image's ``gaussian`` with its defaults)."""
    if sigma <= 0:
        return x
    radius = max(1, int(truncate * sigma + 0.5))
    return filter_separable(x, gaussian_kernel(sigma, radius), mode)


def convolve(x: np.ndarray, kernel: np.ndarray, mode: str = "reflect") -> np.ndarray:
    """``x`` (H×W×C) correlated with the 2-D ``kernel`` (odd sides, summing to 1), per channel.

    Summed as ``x + Σ k·(neighbour − x)``: a flat region keeps its exact value, as with the
    CIFAR-10-C generator's float32 disk kernels (which sum to just over 1); ``Σ k·neighbour``
    lands a rounding error below it, which the 8-bit truncation turns into one grey level less.
    """
    rh, rw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(x, [(rh, rh), (rw, rw)] + [(0, 0)] * (x.ndim - 2), mode=mode)  # type: ignore[call-overload]
    h, w = x.shape[:2]
    out = np.array(x, dtype=np.float64)
    for i, j in zip(*np.nonzero(kernel), strict=True):
        out += kernel[i, j] * (padded[i : i + h, j : j + w] - x)
    return out


def disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """A flat disk of ``radius`` (on a 17×17 grid, larger for radius > 8), normalised, then
    anti-aliased with a 3×3 Gaussian of ``alias_sigma`` (5×5 for radius > 8)."""
    half = max(8, math.ceil(radius))
    t = np.arange(-half, half + 1)
    rows, cols = np.meshgrid(t, t, indexing="ij")
    disk = (rows**2 + cols**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    smooth = gaussian_kernel(alias_sigma, 1 if radius <= 8 else 2)
    return filter_separable(disk, smooth, mode="constant")


def _fold(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Integer pixel indices outside ``0 … n − 1`` folded back into it: ``"reflect"`` mirrors
    about the border pixels (OpenCV's BORDER_REFLECT_101, SciPy's ``mirror``), ``"symmetric"``
    about the image edges, repeating the border pixel (SciPy's ``reflect``)."""
    if n == 1:
        return np.zeros_like(index)
    if mode == "reflect":
        period = 2 * (n - 1)
        index = np.mod(index, period)
        return np.where(index > n - 1, period - index, index)
    if mode == "symmetric":
        period = 2 * n
        index = np.mod(index, period)
        return np.where(index > n - 1, period - 1 - index, index)
    raise ValueError(f"unknown border mode {mode!r}: use 'reflect' or 'symmetric'")


def bilinear_sample(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str = "reflect"
) -> np.ndarray:
    """``x`` (H×W×C) read at fractional ``rows``/``cols`` (any equal shape) by bilinear
    interpolation between the four nearest pixels, those outside the image taken from its
    extension by ``mode`` (see :func:`_fold`). Written ``a + (b − a)·t``: equal neighbours give
    their exact value."""
    h, w = x.shape[:2]
    r = np.asarray(rows, dtype=np.float64)
    c = np.asarray(cols, dtype=np.float64)
    r_floor, c_floor = np.floor(r), np.floor(c)
    fr, fc = (r - r_floor)[..., None], (c - c_floor)[..., None]
    r0, c0 = r_floor.astype(int), c_floor.astype(int)
    r1, c1 = _fold(r0 + 1, h, mode), _fold(c0 + 1, w, mode)
    r0, c0 = _fold(r0, h, mode), _fold(c0, w, mode)
    top = x[r0, c0] + (x[r0, c1] - x[r0, c0]) * fc
    bottom = x[r1, c0] + (x[r1, c1] - x[r1, c0]) * fc
    return top + (bottom - top) * fr  # type: ignore[no-any-return]


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The central ``1/factor`` of ``x`` enlarged linearly (corner-aligned, as SciPy's ``zoom``
    of order 1) by ``factor`` and cut back to ``x``'s size."""
    h, w = x.shape[:2]
    crop_h, crop_w = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = x[top : top + crop_h, left : left + crop_w]
    out_h, out_w = round(crop_h * factor), round(crop_w * factor)
    trim_h, trim_w = (out_h - h) // 2, (out_w - w) // 2
    scale_h = (crop_h - 1) / (out_h - 1) if out_h > 1 else 0.0
    scale_w = (crop_w - 1) / (out_w - 1) if out_w > 1 else 0.0
    rows = (np.arange(trim_h, trim_h + h) * scale_h)[:, None] * np.ones((1, w))
    cols = (np.arange(trim_w, trim_w + w) * scale_w)[None, :] * np.ones((h, 1))
    return bilinear_sample(crop, rows, cols)


def motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion blur: a one-sided line of ``2·radius + 1`` taps at ``angle`` degrees,
    weighted ``exp(−i² / 2σ²)``, reading pixels at rounded offsets, borders repeated."""
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    h, w = x.shape[:2]
    a = math.radians(angle)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    out = np.zeros_like(x, dtype=np.float64)
    for i, weight in enumerate(weights):
        dr, dc = math.ceil(i * math.sin(a) - 0.5), math.ceil(i * math.cos(a) - 0.5)
        out += weight * x[np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)]
    return out


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size``×``size`` (a power of two) diamond-square height map on a torus, scaled to
    [0, 1], as Hendrycks & Dietterich's (2019) CIFAR-10-C / ImageNet-C generator makes it: each
    new point is the mean of its four neighbours plus ``w · U(−w, w)``, where ``w`` starts at
    100 and is divided by ``decay`` after every level (so the offsets shrink by ``decay²``)."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def offsets(shape: tuple[int, ...]) -> np.ndarray:
        return wibble * rng.uniform(-wibble, wibble, shape)  # type: ignore[no-any-return]

    while step >= 2:
        half = step // 2
        corners = grid[::step, ::step]
        below, right = np.roll(corners, -1, 0), np.roll(corners, -1, 1)
        centres = (corners + below + right + np.roll(below, -1, 1)) / 4
        grid[half::step, half::step] = centres + offsets(centres.shape)
        centres = grid[half::step, half::step]
        top_edge = (corners + right + centres + np.roll(centres, 1, 0)) / 4
        left_edge = (corners + below + centres + np.roll(centres, 1, 1)) / 4
        grid[::step, half::step] = top_edge + offsets(top_edge.shape)
        grid[half::step, ::step] = left_edge + offsets(left_edge.shape)
        step, wibble = half, wibble / decay
    grid -= grid.min()
    return grid / grid.max()
