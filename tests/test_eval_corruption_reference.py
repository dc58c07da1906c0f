"""The generated CIFAR-10-C corruptions against Hendrycks & Dietterich's (ICLR 2019) released
CIFAR-10-C generator, restated below as its recipe at CIFAR-10-C's parameters (32-px images).

Random corruptions are compared in distribution: statistics of the corrupted image (mean, spread,
roughness, change from the clean image, change on the border frame) averaged over many seeds, per
severity, against the same statistics of the released recipe; the fog map on its own (roughness,
spread) over 200 maps per severity. Deterministic corruptions are compared image for image. Recipes written with NumPy and Pillow always run; those
that call OpenCV, SciPy or scikit-image as the release does (they come with the ``corruptions``
extra) are skipped where these are missing.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from advfeat.eval.corruption_cifar import CIFAR_SEVERITIES, corrupt_cifar
from advfeat.eval.corruption_ops import bilinear_sample, plasma_fractal

SIDE = 32
MAP_SEEDS = 200
REFERENCE_SEED_OFFSET = 100_000  # the recipe's fog maps are drawn from other seeds than ours


# ---------------------------------------------------------------- the released recipe, restated


def released_plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map on a torus (the release's ``plasma_fractal``): every new point
    is the mean of its four neighbours plus ``w · U(−w, w)``, where ``w`` starts at 100 and is
    divided by ``decay`` after each level; the map is then scaled to [0, 1]."""
    height = np.zeros((size, size))
    step, w = size, 100.0
    while step >= 2:
        half = step // 2
        corner = height[::step, ::step]
        below, right = np.roll(corner, -1, axis=0), np.roll(corner, -1, axis=1)
        square_mean = (corner + below + right + np.roll(below, -1, axis=1)) / 4
        height[half::step, half::step] = square_mean + w * rng.uniform(-w, w, corner.shape)
        centre = height[half::step, half::step]
        # between two corners of a row: those corners and the centres above and below
        row_mean = (corner + right + centre + np.roll(centre, 1, axis=0)) / 4
        height[::step, half::step] = row_mean + w * rng.uniform(-w, w, corner.shape)
        # between two corners of a column: those corners and the centres left and right
        column_mean = (corner + below + centre + np.roll(centre, 1, axis=1)) / 4
        height[half::step, ::step] = column_mean + w * rng.uniform(-w, w, corner.shape)
        step, w = half, w / decay
    height -= height.min()
    return height / height.max()


def _stored(x: np.ndarray) -> np.ndarray:
    """How the release stores a float result in [0, 1]: ``np.uint8(clip(x) · 255)``, truncated."""
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _released_clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The central ``ceil(32 / factor)`` pixels enlarged by SciPy's linear ``zoom``, trimmed."""
    from scipy.ndimage import zoom

    crop = int(np.ceil(SIDE / factor))
    top = (SIDE - crop) // 2
    zoomed = zoom(x[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - SIDE) // 2
    return zoomed[trim : trim + SIDE, trim : trim + SIDE]  # type: ignore[no-any-return]


def _image_magick_motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage on 8-bit values, written back to an 8-bit PNG (rounded);
    the line of taps is ``imagecorruptions``' NumPy version of ImageMagick's."""
    from imagecorruptions.corruptions import _motion_blur

    blurred = _motion_blur(x.astype(np.float64), radius=radius, sigma=sigma, angle=angle)
    return np.clip(np.floor(blurred + 0.5), 0, 255)  # type: ignore[no-any-return]


def _gaussian_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = image / 255
    return _stored(x + rng.normal(scale=c, size=x.shape))


def _shot_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _stored(rng.poisson(image / 255 * c) / c)


def _impulse_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """scikit-image's ``random_noise(mode="s&p", amount=c)``: each value is hit with probability
    ``c``; a hit value becomes 1 or 0 with equal probability."""
    x = image / 255
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    x[hit & salt], x[hit & ~salt] = 1.0, 0.0
    return _stored(x)


def _speckle_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = image / 255
    return _stored(x + x * rng.normal(scale=c, size=x.shape))


def _gaussian_blur(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from skimage.filters import gaussian

    return _stored(gaussian(image / 255, sigma=c, channel_axis=-1))


def _glass_blur(
    image: np.ndarray, c: tuple[float, int, int], rng: np.random.Generator
) -> np.ndarray:
    from skimage.filters import gaussian

    sigma, delta, iterations = c
    x = (gaussian(image / 255, sigma=sigma, channel_axis=-1) * 255).astype(np.uint8)
    span = range(SIDE - delta, delta, -1)
    offsets = rng.integers(-delta, delta, size=(iterations, len(span), len(span), 2)).tolist()
    for per_row in offsets:
        for row, per_col in zip(span, per_row, strict=True):
            for col, (d_col, d_row) in zip(span, per_col, strict=True):
                # the release's "swap", a tuple assignment of two NumPy views, kept as written
                x[row, col], x[row + d_row, col + d_col] = x[row + d_row, col + d_col], x[row, col]
    return _stored(gaussian(x / 255, sigma=sigma, channel_axis=-1))


def _defocus_blur(
    image: np.ndarray, c: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    import cv2
    from imagecorruptions.corruptions import disk  # the release's anti-aliased disk kernel

    kernel = disk(radius=c[0], alias_blur=c[1])
    x = image / 255
    return _stored(np.stack([cv2.filter2D(x[..., i], -1, kernel) for i in range(3)], axis=-1))


def _motion_blur(image: np.ndarray, c: tuple[int, float], rng: np.random.Generator) -> np.ndarray:
    return _image_magick_motion_blur(image, c[0], c[1], rng.uniform(-45, 45)).astype(np.uint8)


def _zoom_blur(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = (image / 255).astype(np.float32)
    factors = np.arange(1, c, 0.01)
    total = x + sum(_released_clipped_zoom(x, f) for f in factors)
    return _stored(total / (len(factors) + 1))


def _snow(image: np.ndarray, c: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    import cv2

    mean, std, zoom, threshold, radius, sigma, blend = c
    x = (image / 255).astype(np.float32)
    layer = rng.normal(loc=mean, scale=std, size=(SIDE, SIDE))
    layer = _released_clipped_zoom(layer[..., None], zoom)
    layer[layer < threshold] = 0
    grey_levels = (np.clip(layer[..., 0], 0, 1) * 255).astype(np.uint8)  # saved as an 8-bit PNG
    streaks = _image_magick_motion_blur(grey_levels, int(radius), sigma, rng.uniform(-135, -45))
    streaks = (streaks / 255)[..., None]
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    whitened = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return _stored(whitened + streaks + np.rot90(streaks, k=2))


def _fog(image: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    amplitude, decay = c
    x = image / 255
    peak = x.max()
    foggy = x + amplitude * released_plasma_fractal(SIDE, decay, rng)[..., None]
    return _stored(foggy * peak / (peak + amplitude))


def _brightness(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(image / 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _stored(hsv2rgb(hsv))


def _saturate(image: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(image / 255)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return _stored(hsv2rgb(hsv))


def _contrast(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = image / 255
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _stored((x - mean) * c + mean)


def _jpeg_compression(image: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=c)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _pixelate(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    small = Image.fromarray(image).resize((int(SIDE * c), int(SIDE * c)), Image.Resampling.BOX)
    return np.asarray(small.resize((SIDE, SIDE), Image.Resampling.BOX))


def _elastic_transform(
    image: np.ndarray, c: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """OpenCV's affine warp (borders BORDER_REFLECT_101), then SciPy's linear ``map_coordinates``
    (``mode="reflect"``: half-sample symmetric borders, as SciPy ≥ 1.6 computes it) along a
    displacement field of scikit-image-smoothed uniform noise."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    alpha, sigma, affine = (v * SIDE for v in c)
    x = (image / 255).astype(np.float32)
    centre, side = np.array([SIDE, SIDE], dtype=np.float32) // 2, SIDE // 3
    corners = [centre + side, [centre[0] + side, centre[1] - side], centre - side]
    src = np.array(corners, dtype=np.float32)
    dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)
    matrix = cv2.getAffineTransform(src, dst)  # type: ignore[call-overload]
    x = cv2.warpAffine(x, matrix, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT_101)  # type: ignore[assignment]
    dx, dy = (
        gaussian(rng.uniform(-1, 1, size=(SIDE, SIDE)), sigma, mode="reflect", truncate=3) * alpha
        for _ in range(2)
    )
    rows, cols, channels = np.meshgrid(
        np.arange(SIDE), np.arange(SIDE), np.arange(3), indexing="ij"
    )
    where = (rows + dy[..., None], cols + dx[..., None], channels)
    return _stored(map_coordinates(x, where, order=1, mode="reflect"))


Recipe = Callable[..., np.ndarray]  # (uint8 image, CIFAR-10-C parameter, generator) → uint8

RELEASED: dict[str, tuple[Recipe, tuple[str, ...]]] = {
    # name: (recipe, modules it needs beyond NumPy and Pillow)
    "gaussian_noise": (_gaussian_noise, ()),
    "shot_noise": (_shot_noise, ()),
    "impulse_noise": (_impulse_noise, ()),
    "speckle_noise": (_speckle_noise, ()),
    "gaussian_blur": (_gaussian_blur, ("skimage",)),
    "glass_blur": (_glass_blur, ("skimage",)),
    "defocus_blur": (_defocus_blur, ("cv2", "imagecorruptions.corruptions")),
    "motion_blur": (_motion_blur, ("imagecorruptions.corruptions",)),
    "zoom_blur": (_zoom_blur, ("scipy",)),
    "snow": (_snow, ("cv2", "scipy", "imagecorruptions.corruptions")),
    "fog": (_fog, ()),
    "brightness": (_brightness, ("skimage",)),
    "saturate": (_saturate, ("skimage",)),
    "contrast": (_contrast, ()),
    "jpeg_compression": (_jpeg_compression, ()),
    "pixelate": (_pixelate, ()),
    "elastic_transform": (_elastic_transform, ("cv2", "scipy", "skimage")),
}

RANDOM = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "fog",
    "elastic_transform",
)
DETERMINISTIC = tuple(sorted(set(RELEASED) - set(RANDOM)))


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _released(name: str) -> Recipe:
    recipe, modules = RELEASED[name]
    for module in modules:
        pytest.importorskip(module, reason="the released recipe calls it (corruptions extra)")
    return recipe


# ------------------------------------------------------------------------------- measurements


def _test_image() -> np.ndarray:
    """A 32×32 CIFAR-like image: smooth random colour waves, a flat red block and a white
    (saturated) strip, as uint8."""
    rng = np.random.default_rng(2019)
    rows, cols = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    channels = []
    for _ in range(3):
        frequency = rng.uniform(0.5, 3, size=(3, 2))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        waves = sum(
            np.sin(2 * np.pi * (f_row * rows + f_col * cols) + p)
            for (f_row, f_col), p in zip(frequency, phase, strict=True)
        )
        channels.append(0.5 + 0.13 * waves)
    image = np.stack(channels, axis=-1)
    image[8:20, 10:24] = (0.9, 0.2, 0.1)
    image[26:, :] = 1.0
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


STATISTICS = ("mean", "std", "roughness", "change", "border change")


def _statistics(corrupted: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """In grey levels: mean, standard deviation, roughness (mean |difference| of neighbouring
    pixels), mean |change| from the clean image, and the same on the 2-pixel border frame."""
    out, change = corrupted.astype(np.float64), np.abs(corrupted.astype(np.float64) - clean)
    roughness = (np.abs(np.diff(out, axis=0)).mean() + np.abs(np.diff(out, axis=1)).mean()) / 2
    frame = np.ones(out.shape[:2], dtype=bool)
    frame[2:-2, 2:-2] = False
    return np.array([out.mean(), out.std(), roughness, change.mean(), change[frame].mean()])


def _map_statistics(maps: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Mean and standard error over maps of: roughness (mean |difference| of neighbours), the
    same at a 4-pixel lag, and each map's standard deviation."""
    per_map = np.array(
        [
            [
                (np.abs(np.diff(m, axis=0)).mean() + np.abs(np.diff(m, axis=1)).mean()) / 2,
                (np.abs(m[4:] - m[:-4]).mean() + np.abs(m[:, 4:] - m[:, :-4]).mean()) / 2,
                m.std(),
            ]
            for m in maps
        ]
    )
    means, errors = per_map.mean(axis=0), per_map.std(axis=0) / np.sqrt(len(maps))
    names = ("roughness", "roughness at lag 4", "std")
    return {n: (float(m), float(e)) for n, m, e in zip(names, means, errors, strict=True)}


@contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """The release draws from NumPy's global generator; seed it and restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


# ------------------------------------------------------------------------------------- tests


def test_every_generated_corruption_has_a_released_recipe_here() -> None:
    assert set(RELEASED) == set(CIFAR_SEVERITIES)
    assert set(RANDOM) | set(DETERMINISTIC) == set(RELEASED)


@functools.cache
def _fog_map_statistics(decay: float) -> dict[str, dict[str, tuple[float, float]]]:
    """Statistics of 200 maps of 32 px at ``decay``: ours, the restated recipe and, where
    installed, ``imagecorruptions``' copy of the released ``plasma_fractal``."""
    seeds = range(MAP_SEEDS)
    reference_seeds = range(REFERENCE_SEED_OFFSET, REFERENCE_SEED_OFFSET + MAP_SEEDS)
    out = {
        "ours": _map_statistics(
            [plasma_fractal(SIDE, decay, np.random.default_rng(s)) for s in seeds]
        ),
        "restated recipe": _map_statistics(
            [
                released_plasma_fractal(SIDE, decay, np.random.default_rng(s))
                for s in reference_seeds
            ]
        ),
    }
    try:
        from imagecorruptions.corruptions import plasma_fractal as packaged
    except ImportError:
        return out
    maps = []
    for s in reference_seeds:
        with _global_numpy_seed(s):
            maps.append(packaged(mapsize=SIDE, wibbledecay=decay).astype(np.float64))
    out["imagecorruptions"] = _map_statistics(maps)
    return out


def _agree(a: tuple[float, float], b: tuple[float, float], relative: float) -> bool:
    """Two (mean, standard error) pairs within 4.5 standard errors plus ``relative``."""
    return abs(a[0] - b[0]) <= 4.5 * np.hypot(a[1], b[1]) + relative * abs(b[0])


def test_fog_map_has_the_released_statistics_at_every_severity() -> None:
    """The release adds ``w · U(−w, w)`` at every diamond-square step (``w`` = 100, then divided
    by the decay per level). Per severity, the roughness at lags 1 and 4 and the spread of 200
    maps agree with the restated recipe's and ``imagecorruptions``' (within 4.5 standard errors
    plus 2 %); the restatement itself agrees with ``imagecorruptions``."""
    mismatches = []
    for severity, parameter in enumerate(CIFAR_SEVERITIES["fog"], start=1):
        decay = float(parameter[1])  # type: ignore[index]
        statistics = _fog_map_statistics(decay)
        ours = statistics["ours"]
        for reference in ("restated recipe", "imagecorruptions"):
            for statistic, expected in statistics.get(reference, {}).items():
                if not _agree(ours[statistic], expected, 0.02):
                    mismatches.append(
                        f"severity {severity} (decay {decay}) {statistic}: ours "
                        f"{ours[statistic][0]:.4f}, {reference} {expected[0]:.4f}"
                    )
        for statistic, expected in statistics.get("imagecorruptions", {}).items():
            assert _agree(statistics["restated recipe"][statistic], expected, 0), statistic
    assert not mismatches, "\n".join(mismatches)


def test_fog_map_roughness_is_the_measured_release_value() -> None:
    """The released recipe's roughness (mean |difference| of neighbours, 200 maps of 32 px):
    ≈ 0.0206 at decay 3 and ≈ 0.0291 at decay 1.75 (the ``U(−w, w)`` offsets gave 0.0296 and
    0.0645)."""
    for decay, released in ((3.0, 0.0206), (1.75, 0.0291)):
        roughness, _ = _fog_map_statistics(decay)["ours"]["roughness"]
        assert roughness == pytest.approx(released, rel=0.06), decay


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruption_matches_the_released_recipe_in_distribution(name: str) -> None:
    """Per severity, each statistic averaged over the seeds agrees with the recipe's within 4.5
    standard errors (plus 0.05 grey levels for 8-bit rounding). Both run on the same seeds
    (common random numbers): where the two draw alike the comparison is sharp, and where they do
    not the spread of the per-seed differences still gives the right standard error."""
    recipe = _released(name)
    seeds = 12 if name == "glass_blur" else 24
    clean = _test_image()
    mismatches = []
    for severity, parameter in enumerate(CIFAR_SEVERITIES[name], start=1):
        ours = np.array(
            [_statistics(corrupt_cifar(clean, name, severity, s), clean) for s in range(seeds)]
        )
        released = np.array(
            [
                _statistics(recipe(clean, parameter, np.random.default_rng(s)), clean)
                for s in range(seeds)
            ]
        )
        difference = ours - released
        error = difference.std(axis=0) / np.sqrt(seeds)
        for i in np.flatnonzero(np.abs(difference.mean(axis=0)) > 4.5 * error + 0.05):
            mismatches.append(
                f"severity {severity} {STATISTICS[i]}: ours {ours[:, i].mean():.3f}, "
                f"released {released[:, i].mean():.3f} (standard error {error[i]:.3f})"
            )
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruption_equals_the_released_recipe(name: str) -> None:
    """Every pixel within one grey level of the recipe's, and no bias: the mean difference under
    0.1 grey level. (Float rounding just under a grey level, which the release's 8-bit
    truncation turns into one level less, differs in places: zoom blur, summed in float32 in the
    release, loses a level on up to 9 % of the pixels of the flat block where ours does not.)"""
    recipe = _released(name)
    clean = _test_image()
    for severity, parameter in enumerate(CIFAR_SEVERITIES[name], start=1):
        ours = corrupt_cifar(clean, name, severity, seed=0).astype(int)
        released = recipe(clean, parameter, np.random.default_rng(0)).astype(int)
        difference = ours - released
        assert np.abs(difference).max() <= 1, severity
        assert abs(difference.mean()) < 0.1, (severity, difference.mean())


def _extended_bilinear(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, pad_mode: str
) -> np.ndarray:
    """Bilinear reading of ``x`` extended by ``np.pad(mode=pad_mode)`` far enough that every
    coordinate falls inside the extension (the definition of a border mode)."""
    margin = 8
    padded = np.pad(x, [(margin, margin), (margin, margin), (0, 0)], mode=pad_mode)  # type: ignore[call-overload]
    r, c = rows + margin, cols + margin
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    fr, fc = (r - r0)[..., None], (c - c0)[..., None]
    return (  # type: ignore[no-any-return]
        padded[r0, c0] * (1 - fr) * (1 - fc)
        + padded[r0, c0 + 1] * (1 - fr) * fc
        + padded[r0 + 1, c0] * fr * (1 - fc)
        + padded[r0 + 1, c0 + 1] * fr * fc
    )


def test_resampling_extends_borders_as_opencv_and_scipy_do() -> None:
    """The elastic transform's two readings: the affine warp extends the image as OpenCV's
    BORDER_REFLECT_101 (``np.pad`` "reflect", SciPy "mirror"), the displacement field reads it as
    SciPy's ``map_coordinates(mode="reflect")`` (``np.pad`` "symmetric"), up to 6 px outside."""
    rng = np.random.default_rng(0)
    x = rng.random((SIDE, SIDE, 3))
    rows, cols = rng.uniform(-6, SIDE + 5, size=(2, 40, 40))
    for mode, pad_mode, scipy_mode in (
        ("reflect", "reflect", "mirror"),
        ("symmetric", "symmetric", "reflect"),
    ):
        ours = bilinear_sample(x, rows, cols, mode=mode)
        np.testing.assert_allclose(ours, _extended_bilinear(x, rows, cols, pad_mode), atol=1e-12)
        if _importable("scipy"):
            from scipy.ndimage import map_coordinates

            expected = np.stack(
                [
                    map_coordinates(x[..., i], [rows, cols], order=1, mode=scipy_mode)
                    for i in range(3)
                ],
                axis=-1,
            )
            np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_elastic_transform_equals_the_released_recipe_given_the_same_draws() -> None:
    """Both draw the affine offsets, then the x and y displacement noise, from one generator (the
    release's order), so with the same seed they must agree pixel for pixel; the distribution
    statistics above hardly see the borders, where the two border readings matter."""
    recipe = _released("elastic_transform")
    clean = _test_image()
    for severity, parameter in enumerate(CIFAR_SEVERITIES["elastic_transform"], start=1):
        for seed in range(6):
            ours = corrupt_cifar(clean, "elastic_transform", severity, seed).astype(int)
            released = recipe(clean, parameter, np.random.default_rng(seed)).astype(int)
            assert np.abs(ours - released).max() <= 1, (severity, seed)


@pytest.mark.parametrize("name", ["defocus_blur", "elastic_transform"])
def test_flat_images_keep_their_grey_level_as_in_the_release(name: str) -> None:
    """A blur of equal values is that value: the release's float32 disk kernels (which sum to
    just over 1) and its OpenCV / SciPy resampling keep every grey level of a flat image, so
    float rounding must not become one grey level less at the 8-bit truncation."""
    recipe, modules = RELEASED[name]
    check_release = all(_importable(m) for m in modules)
    for severity, parameter in enumerate(CIFAR_SEVERITIES[name], start=1):
        for level in range(0, 256, 15):
            flat = np.full((SIDE, SIDE, 3), level, dtype=np.uint8)
            ours = corrupt_cifar(flat, name, severity, seed=level)
            assert (ours == level).all(), (severity, level)
            if check_release:  # the release does keep them
                released = recipe(flat, parameter, np.random.default_rng(level))
                assert (released == level).all(), ("release", severity, level)
