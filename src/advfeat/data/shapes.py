"""The embedded ``shapes`` datasets: generated offline, deterministic from a seed.

One generator gives three tasks on the same scenes:

- ``shapes``: one shape per image (default 32x32, 5000 train / 1000 test), label = its class.
- ``shapes-det``: up to ``max_objects`` shapes per image (default 64x64), target
  ``{"boxes": float32 [n, 4], "labels": int64 [n]}``; boxes are xyxy in pixels and are the tight
  box of the object's mask pixels, ``[x_min, y_min, x_max + 1, y_max + 1]`` (pixel edges);
  labels are ``class + 1`` (0 is torchvision's background).
- ``shapes-seg``: the same scenes as ``shapes-det`` (same seed and options), target an ``int64``
  mask ``[H, W]`` with 0 = background and ``class + 1`` on shape pixels; with
  ``ignore_boundary=True`` the object pixels that touch another label (4-neighbourhood) are
  set to 255, the usual ignore index.

For detection and segmentation ``num_classes`` counts the background (index 0, first of
``class_names``), as torchvision's detection and segmentation models expect.

A scene: a textured background (training styles ``noise`` = smooth random field, ``stripes``,
``checker``; two dark, weakly saturated colours), then shapes of eight classes (circle, square,
triangle, ring, cross, star, crescent, heart) with random colour (bright and saturated, hue in
[0, 0.6)), size, position, rotation and a soft shading gradient. With several objects the image
is divided into a grid of cells, one object per cell, so objects never overlap.

Shifted test domains (``bundle.shifted``; same scenes and targets as the test set):

- ``colour``: shape and background hues from [0.67, 0.95) (blue-violet-magenta), never seen in
  training; geometry, brightness and saturation unchanged.
- ``fog``: blended towards a bright, smooth fog field (weight 0.5-0.65): lower contrast.
- ``noise``: additive Gaussian pixel noise (std 0.1 on the [0, 1] scale).
- ``style``: backgrounds of unseen styles (``dots``, concentric ``rings``); shapes unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advfeat.data.bundle import (
    DATASET_CHECKS,
    DATASETS,
    ArrayDataset,
    BoxTargets,
    DatasetBundle,
    LabelTargets,
    MaskTargets,
    Task,
    channel_stats,
    check_positive_int,
    train_val_views,
)
from advfeat.data.transforms import CifarAugment, HorizontalFlip
from advfeat.errors import AdvfeatError

__all__ = [
    "SHAPE_NAMES",
    "SHIFTED_DOMAINS",
    "Scenes",
    "boxes_from_instances",
    "build_shapes",
    "render_scenes",
    "sample_scenes",
    "shape_sizes",
]

SHAPE_NAMES = ("circle", "square", "triangle", "ring", "cross", "star", "crescent", "heart")
STYLES = ("noise", "stripes", "checker", "dots", "rings")
TRAIN_STYLES = (0, 1, 2)
SHIFTED_STYLES = (3, 4)
TRAIN_HUES = (0.0, 0.6)
SHIFTED_HUES = (0.67, 0.95)
SHIFTED_DOMAINS = ("colour", "fog", "noise", "style")
_STREAMS = {"train": 1, "test": 2, "colour": 3, "fog": 4, "noise": 5, "style": 6}
_NOISE_GRID = 4
_CHUNK = 512

# ----------------------------------------------------------------------------- geometry


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star (pentagram outline), tips on the unit circle, one pointing up.

    The five lines of the pentagram each keep the centre on one side; a point is in the star
    when it is on the far side of at most one of them (the inner pentagon: none; a tip: one).
    """
    outside = np.zeros(u.shape, dtype=np.uint8)
    for k in range(5):
        a = -math.pi / 2 + 2 * math.pi * k / 5  # direction of tip k
        outside += u * math.cos(a) + v * math.sin(a) > math.cos(2 * math.pi / 5)
    return outside <= 1


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local coordinates ``(u, v)`` in shape ``shape``; all fit the unit disc."""
    rr = u * u + v * v
    name = SHAPE_NAMES[shape]
    if name == "circle":
        return rr <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= math.sqrt(0.5)
    if name == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = -math.pi / 2 + math.pi / 3 + 2 * math.pi * k / 3
            inside &= u * math.cos(a) + v * math.sin(a) <= 0.5
        return inside
    if name == "ring":
        return (rr <= 1.0) & (rr >= 0.55**2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.95) & (av <= 0.3)) | ((av <= 0.95) & (au <= 0.3))
    if name == "star":
        return _star(u, v)
    if name == "crescent":
        return (rr <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)
    # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled and centred to fit the unit disc
    x, y = 1.25 * u, 0.25 - 1.25 * v
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Convert ``[..., 3]`` HSV in [0, 1] to RGB in [0, 1]."""
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h * 6.0, 6.0)
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# ----------------------------------------------------------------------------- scenes


@dataclass
class Scenes:
    """Parameters of ``N`` scenes with ``K`` object slots (class -1 = empty slot)."""

    image_size: int
    classes: np.ndarray  # int64 [N, K]
    centers: np.ndarray  # [N, K, 2] (x, y) in pixels
    radii: np.ndarray  # [N, K] pixels
    angles: np.ndarray  # [N, K] radians
    hsv: np.ndarray  # [N, K, 3]
    light: np.ndarray  # [N, K] direction of the shading gradient
    bg_style: np.ndarray  # int64 [N], index into STYLES
    bg_hsv: np.ndarray  # [N, 2, 3]
    bg_params: np.ndarray  # [N, 5]: period, angle, phase, centre x, centre y
    bg_noise: np.ndarray  # [N, g, g] control points of the smooth random field

    def __len__(self) -> int:
        return len(self.classes)


def _hues(rng: np.random.Generator, size: tuple[int, ...], hues: tuple[float, float]) -> np.ndarray:
    return rng.uniform(hues[0], hues[1], size)


def sample_scenes(
    n: int,
    rng: np.random.Generator,
    *,
    image_size: int,
    max_objects: int = 1,
    num_classes: int = len(SHAPE_NAMES),
) -> Scenes:
    """Draw the parameters of ``n`` training-distribution scenes (all randomness is here)."""
    grid = math.ceil(math.sqrt(max_objects))
    cell = image_size / grid
    k = max_objects
    if k == 1:
        classes = rng.permutation(np.arange(n) % num_classes)[:, None]
        count = np.ones(n, dtype=np.int64)
    else:
        classes = rng.integers(0, num_classes, (n, k))
        count = rng.integers(1, k + 1, n)
    classes = np.where(np.arange(k)[None, :] < count[:, None], classes, -1).astype(np.int64)
    cells = np.argsort(rng.random((n, grid * grid)), axis=1)[:, :k]
    radii = cell / 2 * rng.uniform(0.5, 0.95, (n, k))
    slack = rng.random((n, k, 2)) * (cell - 2 * radii)[..., None]
    corner = np.stack([cells % grid, cells // grid], axis=-1) * cell
    centers = corner + radii[..., None] + slack
    hsv = np.stack(
        [
            _hues(rng, (n, k), TRAIN_HUES),
            rng.uniform(0.55, 1.0, (n, k)),
            rng.uniform(0.6, 1.0, (n, k)),
        ],
        axis=-1,
    )
    v0 = rng.uniform(0.05, 0.3, n)
    v1 = np.minimum(v0 + rng.uniform(0.1, 0.25, n), 0.5)
    bg_hsv = np.stack(
        [_hues(rng, (n, 2), TRAIN_HUES), rng.uniform(0.0, 0.5, (n, 2)), np.stack([v0, v1], 1)],
        axis=-1,
    )
    bg_params = np.stack(
        [
            image_size * rng.uniform(0.15, 0.35, n),
            rng.uniform(0, math.pi, n),
            rng.uniform(0, 2 * math.pi, n),
            rng.uniform(0, image_size, n),
            rng.uniform(0, image_size, n),
        ],
        axis=1,
    )
    return Scenes(
        image_size=image_size,
        classes=classes,
        centers=centers,
        radii=radii,
        angles=rng.uniform(0, 2 * math.pi, (n, k)),
        hsv=hsv,
        light=rng.uniform(0, 2 * math.pi, (n, k)),
        bg_style=rng.choice(np.array(TRAIN_STYLES), n),
        bg_hsv=bg_hsv,
        bg_params=bg_params,
        bg_noise=rng.random((n, _NOISE_GRID, _NOISE_GRID)),
    )


# ----------------------------------------------------------------------------- rendering


def _interp_matrix(size: int, points: int) -> np.ndarray:
    """``[size, points]`` weights of bilinear interpolation from ``points`` control points."""
    pos = (np.arange(size) + 0.5) / size * (points - 1)
    low = np.clip(np.floor(pos).astype(int), 0, points - 2)
    frac = pos - low
    m = np.zeros((size, points))
    m[np.arange(size), low] = 1 - frac
    m[np.arange(size), low + 1] = frac
    return m


def smooth_field(control: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample control points ``[n, g, g]`` to a smooth field ``[n, size, size]``."""
    m = _interp_matrix(size, control.shape[-1]).astype(np.float32)
    return m @ control.astype(np.float32) @ m.T


def _pattern(style: int, params: np.ndarray, noise: np.ndarray, size: int) -> np.ndarray:
    """Background texture in [0, 1], ``[n, size, size]``, for scenes that share ``style``."""
    period, angle, phase, cx, cy = (params[:, i, None, None] for i in range(5))
    x = (np.arange(size, dtype=np.float32) + np.float32(0.5))[None, None, :]
    y = x.reshape(1, size, 1)
    p = x * np.cos(angle) + y * np.sin(angle)
    q = -x * np.sin(angle) + y * np.cos(angle)
    name = STYLES[style]
    if name == "noise":
        return smooth_field(noise, size)
    if name == "stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * p / period + phase)
    if name == "checker":
        half = period / 2
        return np.mod(np.floor(p / half + phase) + np.floor(q / half), 2.0)
    if name == "dots":
        dp = np.mod(p / period + phase / (2 * math.pi), 1.0) - 0.5
        dq = np.mod(q / period, 1.0) - 0.5
        return (dp * dp + dq * dq < 0.3**2).astype(np.float32)
    dist = np.hypot(x - cx, y - cy)
    return 0.5 + 0.5 * np.sin(2 * math.pi * dist / period + phase)


def _render_chunk(sc: Scenes, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    size = sc.image_size
    n = hi - lo
    f32 = np.float32
    image = np.empty((n, 3, size, size), dtype=f32)
    texture = np.empty((n, size, size), dtype=f32)
    styles = sc.bg_style[lo:hi]
    for style in np.unique(styles):
        sel = np.nonzero(styles == style)[0]
        params = sc.bg_params[lo:hi][sel].astype(np.float32)
        texture[sel] = _pattern(int(style), params, sc.bg_noise[lo:hi][sel], size)
    colours = hsv_to_rgb(sc.bg_hsv[lo:hi]).astype(f32)  # [n, 2, 3]
    np.multiply((colours[:, 1] - colours[:, 0])[:, :, None, None], texture[:, None], out=image)
    image += colours[:, 0, :, None, None]
    instances = np.zeros((n, size, size), dtype=np.uint8)
    grid = np.arange(size, dtype=f32) + f32(0.5)
    rgb = hsv_to_rgb(sc.hsv[lo:hi]).astype(f32)  # [n, K, 3]
    for slot in range(sc.classes.shape[1]):
        column = sc.classes[lo:hi, slot]
        if (column < 0).all():
            continue

        def col(field: np.ndarray, slot: int = slot) -> np.ndarray:
            return field[lo:hi, slot].astype(f32)[:, None, None]

        r = col(sc.radii)
        dx = (grid[None, None, :] - col(sc.centers[..., 0])) / r
        dy = (grid[None, :, None] - col(sc.centers[..., 1])) / r
        cos, sin = np.cos(col(sc.angles)), np.sin(col(sc.angles))
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        mask = np.zeros((n, size, size), dtype=bool)
        for shape in np.unique(column[column >= 0]):
            sel = np.nonzero(column == shape)[0]
            mask[sel] = _inside(int(shape), u[sel], v[sel])
        ramp = dx * np.cos(col(sc.light)) + dy * np.sin(col(sc.light))
        shade = f32(0.85) + f32(0.15) * np.clip(f32(0.5) + f32(0.5) * ramp, 0, 1)
        paint = rgb[:, slot, :, None, None] * shade[:, None]
        np.copyto(image, paint, where=mask[:, None])
        instances[mask] = slot + 1
    return image, instances


def render_scenes(sc: Scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes to ``uint8`` images ``[N, 3, H, W]`` and instance maps ``[N, H, W]``.

    The instance map holds ``slot + 1`` on the pixels of the object in that slot, 0 elsewhere.
    """
    n, size = len(sc), sc.image_size
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    instances = torch.empty((n, size, size), dtype=torch.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        img, inst = _render_chunk(sc, lo, hi)
        np.clip(img, 0, 1, out=img)
        images[lo:hi] = torch.from_numpy(np.rint(img * 255).astype(np.uint8))
        instances[lo:hi] = torch.from_numpy(inst)
    return images, instances


def boxes_from_instances(instances: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight xyxy boxes ``[N, K, 4]`` of each slot's pixels, and whether the slot has pixels.

    A box is ``[x_min, y_min, x_max + 1, y_max + 1]`` over the pixels with that slot's id.
    """
    n, h, w = instances.shape
    boxes = torch.zeros((n, slots, 4), dtype=torch.float32)
    present = torch.zeros((n, slots), dtype=torch.bool)
    cols = torch.arange(w)
    rows = torch.arange(h)
    for slot in range(slots):
        mask = instances == slot + 1
        in_col = mask.any(dim=1)  # [n, w]
        in_row = mask.any(dim=2)  # [n, h]
        present[:, slot] = in_row.any(dim=1)
        big = torch.tensor(10**6)
        boxes[:, slot, 0] = torch.where(in_col, cols, big).amin(dim=1).float()
        boxes[:, slot, 2] = torch.where(in_col, cols, -1).amax(dim=1).float() + 1
        boxes[:, slot, 1] = torch.where(in_row, rows, big).amin(dim=1).float()
        boxes[:, slot, 3] = torch.where(in_row, rows, -1).amax(dim=1).float() + 1
    boxes[~present] = 0
    return boxes, present


def _boundary(mask: torch.Tensor) -> torch.Tensor:
    """Object pixels with a 4-neighbour of another label (``[N, H, W]`` bool)."""
    edge = torch.zeros_like(mask, dtype=torch.bool)
    edge[:, 1:, :] |= mask[:, 1:, :] != mask[:, :-1, :]
    edge[:, :-1, :] |= mask[:, :-1, :] != mask[:, 1:, :]
    edge[:, :, 1:] |= mask[:, :, 1:] != mask[:, :, :-1]
    edge[:, :, :-1] |= mask[:, :, :-1] != mask[:, :, 1:]
    return edge & (mask > 0)


# ----------------------------------------------------------------------------- shifts


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream]])


def _fog(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    n, _, size, _ = images.shape
    out = torch.empty_like(images)
    weight = rng.uniform(0.5, 0.65, n)
    control = rng.random((n, _NOISE_GRID, _NOISE_GRID))
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        fog = 0.7 + 0.25 * smooth_field(control[lo:hi], size)[:, None]
        w = weight[lo:hi, None, None, None]
        x = images[lo:hi].numpy() / 255.0
        out[lo:hi] = torch.from_numpy(np.rint((x * (1 - w) + fog * w) * 255).astype(np.uint8))
    return out


def _noise(images: torch.Tensor, rng: np.random.Generator, std: float = 0.1) -> torch.Tensor:
    out = torch.empty_like(images)
    for lo in range(0, len(images), _CHUNK):
        x = images[lo : lo + _CHUNK].numpy() / 255.0
        x = np.clip(x + rng.normal(0.0, std, x.shape), 0, 1)
        out[lo : lo + _CHUNK] = torch.from_numpy(np.rint(x * 255).astype(np.uint8))
    return out


def shifted_images(scenes: Scenes, clean: torch.Tensor, domain: str, seed: int) -> torch.Tensor:
    """Images of ``scenes`` in shifted ``domain`` (one of :data:`SHIFTED_DOMAINS`)."""
    rng = _rng(seed, domain)
    n = len(scenes)
    if domain == "colour":
        hsv = scenes.hsv.copy()
        hsv[..., 0] = _hues(rng, hsv.shape[:2], SHIFTED_HUES)
        bg_hsv = scenes.bg_hsv.copy()
        bg_hsv[..., 0] = _hues(rng, bg_hsv.shape[:2], SHIFTED_HUES)
        return render_scenes(replace(scenes, hsv=hsv, bg_hsv=bg_hsv))[0]
    if domain == "style":
        styles = rng.choice(np.array(SHIFTED_STYLES), n)
        return render_scenes(replace(scenes, bg_style=styles))[0]
    if domain == "fog":
        return _fog(clean, rng)
    if domain == "noise":
        return _noise(clean, rng)
    raise AdvfeatError(f"unknown shifted domain {domain!r}; known: {', '.join(SHIFTED_DOMAINS)}")


# ----------------------------------------------------------------------------- bundles


def _targets(task: Task, scenes: Scenes, instances: torch.Tensor, ignore_boundary: bool) -> Any:
    classes = torch.from_numpy(scenes.classes)
    if task == "classification":
        return LabelTargets(classes[:, 0])
    slots = classes.shape[1]
    boxes, present = boxes_from_instances(instances, slots)
    labels = torch.where(present & (classes >= 0), classes + 1, 0)
    if task == "detection":
        return BoxTargets(boxes, labels)
    lut = torch.cat([torch.zeros(len(labels), 1, dtype=torch.int64), labels], dim=1)
    masks = torch.gather(lut, 1, instances.flatten(1).long()).view(instances.shape)
    masks = masks.to(torch.uint8)
    if ignore_boundary:
        masks[_boundary(masks)] = 255
    return MaskTargets(masks)


def shape_sizes(
    n_train: Any, n_test: Any, image_size: Any, max_objects: Any = 1
) -> tuple[int, int, int, int]:
    """``(n_train, n_test, image_size, max_objects)`` checked (each image holds a grid of
    ``max_objects`` cells of at least 8 pixels) and made ``int``."""
    n_train = check_positive_int("n_train", n_train)
    n_test = check_positive_int("n_test", n_test)
    max_objects = check_positive_int("max_objects", max_objects)
    grid = math.ceil(math.sqrt(max_objects))
    image_size = check_positive_int("image_size", image_size, minimum=8 * grid)
    return n_train, n_test, image_size, max_objects


def build_shapes(
    task: Task,
    *,
    seed: int,
    val_fraction: float,
    augment: bool,
    n_train: int,
    n_test: int,
    image_size: int,
    max_objects: int = 1,
    ignore_boundary: bool = False,
) -> DatasetBundle:
    """Generate the ``shapes`` data for ``task`` (see the module docstring)."""
    n_train, n_test, image_size, max_objects = shape_sizes(n_train, n_test, image_size, max_objects)
    made = {}
    for split, n in (("train", n_train), ("test", n_test)):
        scenes = sample_scenes(n, _rng(seed, split), image_size=image_size, max_objects=max_objects)
        images, instances = render_scenes(scenes)
        made[split] = (scenes, images, _targets(task, scenes, instances, ignore_boundary))
    _, train_images, train_targets = made["train"]
    test_scenes, test_images, test_targets = made["test"]
    if task == "classification":
        augmentation: Any = CifarAugment(padding=image_size // 8)
    else:
        augmentation = HorizontalFlip()
    full = ArrayDataset(train_images, train_targets)
    train, val = train_val_views(
        full,
        val_fraction=val_fraction,
        seed=seed,
        train_transform=augmentation if augment else None,
    )
    shifted: dict[str, Any] = {
        domain: ArrayDataset(shifted_images(test_scenes, test_images, domain, seed), test_targets)
        for domain in SHIFTED_DOMAINS
    }
    mean, std = channel_stats(train_images)
    names = list(SHAPE_NAMES) if task == "classification" else ["background", *SHAPE_NAMES]
    return DatasetBundle(
        train=train,
        val=val,
        test=ArrayDataset(test_images, test_targets),
        num_classes=len(names),
        image_size=image_size,
        mean=mean,
        std=std,
        task=task,
        class_names=names,
        shifted=shifted,
    )


@DATASETS.register("shapes")
def shapes(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    n_train: int = 5000,
    n_test: int = 1000,
    image_size: int = 32,
) -> DatasetBundle:
    """Embedded shape classification (8 classes); ``root`` and ``download`` are not used."""
    return build_shapes(
        "classification",
        seed=seed,
        val_fraction=val_fraction,
        augment=augment,
        n_train=n_train,
        n_test=n_test,
        image_size=image_size,
    )


@DATASETS.register("shapes-det")
def shapes_det(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    n_train: int = 2000,
    n_test: int = 500,
    image_size: int = 64,
    max_objects: int = 4,
) -> DatasetBundle:
    """Embedded shape detection: 1..``max_objects`` shapes per image, torchvision targets."""
    return build_shapes(
        "detection",
        seed=seed,
        val_fraction=val_fraction,
        augment=augment,
        n_train=n_train,
        n_test=n_test,
        image_size=image_size,
        max_objects=max_objects,
    )


@DATASETS.register("shapes-seg")
def shapes_seg(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    n_train: int = 2000,
    n_test: int = 500,
    image_size: int = 64,
    max_objects: int = 4,
    ignore_boundary: bool = False,
) -> DatasetBundle:
    """Embedded shape segmentation: the scenes of ``shapes-det`` with per-pixel class masks."""
    return build_shapes(
        "segmentation",
        seed=seed,
        val_fraction=val_fraction,
        augment=augment,
        n_train=n_train,
        n_test=n_test,
        image_size=image_size,
        max_objects=max_objects,
        ignore_boundary=bool(ignore_boundary),
    )


@DATASET_CHECKS.register("shapes")
@DATASET_CHECKS.register("shapes-det")
@DATASET_CHECKS.register("shapes-seg")
def _check_shapes(
    *, n_train: Any, n_test: Any, image_size: Any, max_objects: Any = 1, **_: Any
) -> None:
    shape_sizes(n_train, n_test, image_size, max_objects)
