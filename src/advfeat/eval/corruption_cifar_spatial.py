"""CIFAR-10-C's blur, weather and elastic corruptions, written on :mod:`advfeat.eval.corruption_ops`.

Each function takes a float H×W×3 image in [0, 1], its CIFAR-10-C parameter (one entry of
:data:`advfeat.eval.corruption_cifar.CIFAR_SEVERITIES`) and a ``numpy`` generator, following the
operations Hendrycks & Dietterich (ICLR 2019) describe and release for CIFAR-10-C:

- ``defocus_blur`` (radius, alias σ): a flat disk kernel, anti-aliased;
- ``glass_blur`` (σ, max shift, iterations): Gaussian blur, local pixel copies, Gaussian blur;
- ``motion_blur`` (radius, σ): a one-sided Gaussian-weighted line at a random angle in ±45°;
- ``zoom_blur`` (stop): the mean of the image and its central zooms by ``np.arange(1, stop,
  0.01)``;
- ``snow`` (mean, std, zoom, threshold, radius, σ, blend): a thresholded, zoomed Gaussian snow
  layer streaked by motion blur (angle in −135…−45°), added twice (once rotated 180°) to a
  whitened image;
- ``fog`` (amplitude, decay): a plasma fractal added, then rescaled by the image's maximum;
- ``elastic_transform`` (α, σ, affine; in units of the image size 32): a random affine warp
  moving three points by up to ``affine`` pixels, then a displacement field of Gaussian-smoothed
  uniform noise (σ) scaled by α.

The generators of the release use OpenCV, SciPy and ImageMagick; these are our own NumPy
versions of the same operations. The disk kernel, central zoom and motion-blur line equal
``imagecorruptions``' versions of the release's helpers to float precision, and every corruption
agrees with the release's recipe at CIFAR-10-C's parameters (tests/test_eval_corruption_reference:
image for image within one grey level where nothing is random, in distribution over seeds where
it is). The random draws come from a NumPy generator, not the release's global random state, so
the corrupted images are CIFAR-10-C's in distribution, not bit for bit.
"""

from __future__ import annotations

import numpy as np

from advfeat.eval.corruption_ops import (
    bilinear_sample,
    clipped_zoom,
    convolve,
    disk_kernel,
    gaussian_filter,
    motion_blur,
    plasma_fractal,
)

__all__ = [
    "defocus_blur",
    "elastic_transform",
    "fog",
    "glass_blur",
    "motion_blur_corruption",
    "snow",
    "zoom_blur",
]

REFERENCE_SIZE = 32
"""``elastic_transform``'s parameters are fractions of this image side (CIFAR's)."""


def defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    return convolve(x, disk_kernel(c[0], c[1]), mode="reflect")


def glass_blur(x: np.ndarray, c: tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    """Every pixel, from the bottom-right corner up, takes the value of a neighbour up to
    ``max shift`` rows/columns away (offsets drawn in ``[−max shift, max shift)``). The release
    writes this as a swap of two NumPy views, which copies instead of swapping: both pixels end
    with the neighbour's value. We do the same, so the strength matches CIFAR-10-C's."""
    sigma, delta, iterations = c
    blurred = np.floor(np.clip(gaussian_filter(x, sigma), 0, 1) * 255) / 255
    h, w = x.shape[:2]
    source = list(range(h * w))  # which pixel of ``blurred`` each flat position shows
    visits = [
        (row, col)
        for _ in range(iterations)
        for row in range(h - delta, delta, -1)
        for col in range(w - delta, delta, -1)
    ]
    offsets = rng.integers(-delta, delta, size=(len(visits), 2)).tolist()
    for (row, col), (dc, dr) in zip(visits, offsets, strict=True):
        source[row * w + col] = source[(row + dr) * w + col + dc]
    shuffled = blurred.reshape(h * w, -1)[source].reshape(blurred.shape)
    return gaussian_filter(shuffled, sigma)


def _to_8_bits(x: np.ndarray) -> np.ndarray:
    """Rounded to the nearest of 256 grey levels, as ImageMagick writes an 8-bit PNG."""
    return np.floor(np.clip(x, 0, 1) * 255 + 0.5) / 255  # type: ignore[no-any-return]


def motion_blur_corruption(
    x: np.ndarray, c: tuple[int, float], rng: np.random.Generator
) -> np.ndarray:
    """The release blurs with ImageMagick and reads the result back from an 8-bit PNG: rounded,
    where the other corruptions' results are truncated to 8 bits."""
    return _to_8_bits(motion_blur(x, c[0], c[1], rng.uniform(-45, 45)))


def zoom_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    factors = np.arange(1, c, 0.01)
    total = x + sum(clipped_zoom(x, f) for f in factors)
    return total / (len(factors) + 1)  # type: ignore[no-any-return]


def _grey(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (OpenCV's RGB → grey), H×W×1."""
    return (x @ np.array([0.299, 0.587, 0.114]))[..., None]  # type: ignore[no-any-return]


def snow(x: np.ndarray, c: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    mean, std, zoom, threshold, radius, sigma, blend = c
    layer = rng.normal(loc=mean, scale=std, size=(*x.shape[:2], 1))
    layer = clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255) / 255  # stored as an 8-bit grey image
    layer = _to_8_bits(motion_blur(layer, int(radius), sigma, rng.uniform(-135, -45)))
    whitened = blend * x + (1 - blend) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return whitened + layer + np.rot90(layer, k=2)  # type: ignore[no-any-return]


def fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """The fractal map is the next power of two of at least 32 pixels, cut to the image."""
    amplitude, decay = c
    h, w = x.shape[:2]
    size = max(REFERENCE_SIZE, 1 << (max(h, w) - 1).bit_length())
    peak = x.max()
    foggy = x + amplitude * plasma_fractal(size, decay, rng)[:h, :w, None]
    return foggy * peak / (peak + amplitude)  # type: ignore[no-any-return]


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2×3 affine map taking the three (x, y) points ``src`` to ``dst``."""
    ones = np.ones((3, 1))
    return np.linalg.solve(np.hstack([src, ones]), dst).T  # type: ignore[no-any-return]


def elastic_transform(
    x: np.ndarray, c: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """The affine warp mirrors about the border pixels (OpenCV's BORDER_REFLECT_101 in the
    release); the displacement field is read with the border pixel repeated in the mirror
    (SciPy's ``map_coordinates(mode="reflect")`` in the release, half-sample symmetric)."""
    alpha, sigma, affine = (v * REFERENCE_SIZE for v in c)
    h, w = x.shape[:2]
    centre = np.array([w // 2, h // 2], dtype=np.float64)
    side = min(h, w) // 3
    src = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    dst = src + rng.uniform(-affine, affine, size=src.shape)
    inverse = np.linalg.inv(np.vstack([_affine_from_points(src, dst), [0, 0, 1]]))
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    src_cols = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
    src_rows = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
    warped = bilinear_sample(x, src_rows, src_cols)
    if alpha == 0:
        return warped
    dx, dy = (
        gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, truncate=3, mode="symmetric")
        * alpha
        for _ in range(2)
    )
    return bilinear_sample(warped, rows + dy, cols + dx, mode="symmetric")
