"""Corruptions people can compare: CIFAR-10-C's own severities for 32-px images, the released
CIFAR-10-C / CIFAR-100-C / ImageNet-C file layouts, and mCE as Hendrycks & Dietterich define it
(ImageNet-C normalised by AlexNet's published errors); the results name the corruption set."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from advfeat.data import build_dataset
from advfeat.data.corruptions_released import CifarCorrupted, ImageNetCorrupted
from advfeat.eval import corruption_cifar, evaluate
from advfeat.eval.corruption import ALEXNET_MEAN_ERRORS, corrupt_batch, severity_scale
from advfeat.eval.corruption_cifar import (
    CIFAR_SEVERITIES,
    UNIMPLEMENTED_CIFAR_SEVERITIES,
    corrupt_cifar,
)
from advfeat.eval.corruption_cifar_spatial import glass_blur
from advfeat.eval.corruption_ops import clipped_zoom, disk_kernel, motion_blur
from advfeat.eval.report import markdown_report
from advfeat.eval.robust import correct
from advfeat.eval.suites import ordered_suites


def test_cifar_severities_are_cifar_10_c_parameters() -> None:
    assert CIFAR_SEVERITIES["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    grey = torch.full((4, 3, 32, 32), 0.5)
    seeds = [0, 1, 2, 3]
    for severity, sigma in ((1, 0.04), (5, 0.10)):
        noisy = corrupt_batch(grey, "gaussian_noise", severity, seeds, scale="cifar")
        assert (noisy - grey).std().item() == pytest.approx(sigma, rel=0.1)
    # corruptions without a CIFAR generator fall back to ImageNet-C's, and say so
    assert severity_scale("frost", "cifar") == "imagenet"
    assert severity_scale("fog", "cifar") == "cifar"
    assert severity_scale("contrast", "cifar") == "cifar"
    assert severity_scale("contrast", "imagenet") == "imagenet"


# Hendrycks & Dietterich's released CIFAR-10-C generator, severities 1-5 (zoom blur: the stop of
# np.arange(1, stop, 0.01); elastic: fractions of the 32-px side).
CIFAR_10_C = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
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
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": (
        (0, 0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    ),
    "pixelate": (0.95, 0.90, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}


def test_32_px_corruptions_run_with_the_cifar_10_c_table(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[tuple[str, object]] = []
    functions = dict(corruption_cifar._FUNCTIONS)
    for name, fn in functions.items():

        def record(x: np.ndarray, c: object, rng: Any, name: str = name, fn: Any = fn) -> Any:
            used.append((name, c))
            return fn(x, c, rng)

        monkeypatch.setitem(corruption_cifar._FUNCTIONS, name, record)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, table in CIFAR_10_C.items():
        if name == "frost":  # the one left to imagecorruptions, at ImageNet-C's parameters
            assert severity_scale(name, "cifar") == "imagenet"
            assert UNIMPLEMENTED_CIFAR_SEVERITIES[name] == table
            continue
        assert severity_scale(name, "cifar") == "cifar"
        for severity, expected in enumerate(table, start=1):
            used.clear()
            out = corrupt_batch(images, name, severity, [severity], scale="cifar")
            assert used == [(name, expected)], (name, severity)
            assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert set(CIFAR_SEVERITIES) == set(CIFAR_10_C) - {"frost"}


def test_blur_operations_equal_the_reference_helpers() -> None:
    """The disk kernel, central zoom and motion-blur line equal imagecorruptions' versions of
    the released generator's helpers at every CIFAR-10-C parameter (float precision)."""
    ref = pytest.importorskip("imagecorruptions.corruptions", reason="optional extra")
    x = np.random.default_rng(0).random((32, 32, 3))
    for radius, alias in CIFAR_SEVERITIES["defocus_blur"]:  # type: ignore[misc]
        np.testing.assert_allclose(disk_kernel(radius, alias), ref.disk(radius, alias), atol=1e-7)
    for stop in CIFAR_SEVERITIES["zoom_blur"]:
        for factor in np.arange(1, stop, 0.01)[[1, -1]]:  # type: ignore[call-overload]
            zoomed = ref.clipped_zoom(x, factor)
            trim = (zoomed.shape[0] - 32) // 2
            expected = zoomed[trim : trim + 32, trim : trim + 32]
            np.testing.assert_allclose(clipped_zoom(x, factor), expected, atol=1e-12)
    for radius, sigma in CIFAR_SEVERITIES["motion_blur"]:  # type: ignore[misc]
        for angle in (-130.0, -45.0, 10.0, 44.0):
            expected = ref._motion_blur(x, radius, sigma, angle)
            np.testing.assert_allclose(motion_blur(x, radius, sigma, angle), expected, atol=1e-12)


def test_glass_blur_copies_up_left_neighbours_as_the_release_does() -> None:
    """The release's "swap" of two NumPy views copies the neighbour into the pixel; with max
    shift 1 every pixel then shows itself or its up / left / up-left neighbour (a true swap
    would carry pixels across the image)."""
    rng = np.random.default_rng(0)
    image = rng.random((12, 12, 3))
    out = glass_blur(image, (0.05, 1, 1), np.random.default_rng(1))  # σ 0.05: no blur
    source = np.floor(image * 255) / 255
    moved = 0
    for row in range(12):
        for col in range(12):
            candidates = [
                source[max(row - dr, 0), max(col - dc, 0)] for dr in (0, 1) for dc in (0, 1)
            ]
            assert any(np.allclose(out[row, col], v, atol=1e-12) for v in candidates), (row, col)
            moved += not np.allclose(out[row, col], source[row, col], atol=1e-12)
    assert moved > 50  # most pixels take a neighbour's value (3 of 4 offsets move)


def _test_image() -> np.ndarray:
    """32×32 colour gradients, a sinusoid and a sharp-edged block: every corruption shows."""
    rows, cols = np.mgrid[0:32, 0:32] / 31
    image = np.stack([cols, rows, 0.5 + 0.4 * np.sin(6 * cols + 4 * rows)], axis=-1)
    image[8:20, 10:24] = (0.9, 0.2, 0.1)
    return (image * 255).astype(np.uint8)


def _strength(name: str) -> list[float]:
    """Mean absolute change (grey levels) per severity, averaged over three seeds."""
    image = _test_image()
    return [
        float(
            np.mean(
                [
                    np.abs(corrupt_cifar(image, name, s, seed).astype(float) - image).mean()
                    for seed in range(3)
                ]
            )
        )
        for s in range(1, 6)
    ]


@pytest.mark.parametrize("name", sorted(CIFAR_SEVERITIES))
def test_cifar_corruption_strength_follows_severity(name: str) -> None:
    s = _strength(name)
    assert min(s) > 0.5, s
    if name == "saturate":  # severities 1-2 desaturate (×0.3, ×0.1), 3-5 oversaturate
        assert s[0] < s[1] and s[2] < s[3] < s[4], s
    elif name == "elastic_transform":
        # CIFAR-10-C's affine part shrinks from 8 % to 3 % of the side while the elastic field
        # stays under a pixel, so the released severities get weaker, not stronger
        assert all(a > b for a, b in itertools.pairwise(s)), s
    else:  # motion blur 3 → 4 only adds taps weighing < 1e-7: equal up to 8-bit truncation
        assert all(b > a - 0.05 for a, b in itertools.pairwise(s)), s
        assert s[4] > s[0] + 1, s


def test_hsv_corruptions_match_scikit_image() -> None:
    color = pytest.importorskip("skimage.color", reason="scikit-image is an optional extra")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image[0, 0] = (128, 128, 128)  # a grey pixel: hue 0 in scikit-image
    image[0, 1] = (0, 0, 0)
    for name, severity in (("brightness", 5), ("saturate", 5), ("saturate", 1)):
        ours = corrupt_cifar(image, name, severity, seed=0)
        hsv = color.rgb2hsv(image / 255.0)
        c = CIFAR_SEVERITIES[name][severity - 1]
        if name == "brightness":
            hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        else:
            hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)  # type: ignore[index]
        reference = (np.clip(color.hsv2rgb(hsv), 0, 1) * 255).astype(np.uint8)
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def _cifar_c(
    root: Path, per_severity: int = 4, corruptions: tuple[str, ...] = ("fog", "snow")
) -> None:
    """Tiny files in the released layout: N = 5·per_severity rows of 32×32×3 uint8."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = 5 * per_severity
    labels = np.tile(np.arange(per_severity) % 3, 5).astype(np.int64)
    np.save(root / "labels.npy", labels)
    for name in corruptions:
        np.save(root / f"{name}.npy", rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8))


def test_released_cifar_c_layout(tmp_path: Path) -> None:
    _cifar_c(tmp_path)
    fog = np.load(tmp_path / "fog.npy")
    sev2 = CifarCorrupted(tmp_path, "fog", 2)
    assert len(sev2) == 4
    image, label = sev2[1]
    assert torch.equal(image, torch.from_numpy(fog[5]).permute(2, 0, 1).float() / 255)
    assert label == 1
    bundle = build_dataset("cifar10-c", str(tmp_path), severities=[1, 3])
    assert bundle.num_classes == 10 and set(bundle.shifted) == {"fog", "snow"}
    assert len(bundle.test) == 2 * 2 * 4  # type: ignore[arg-type]
    with pytest.raises(Exception, match="holds no CIFAR-C files"):
        CifarCorrupted(tmp_path / "empty", "fog", 1)


def test_corruptions_suite_reads_released_files(
    trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path
) -> None:
    _cifar_c(tmp_path)
    data = torch.utils.data.TensorDataset(tiny_task.x_test[:8], tiny_task.y_test[:8])
    results = evaluate(
        copy.deepcopy(trained_tiny_model),
        data,
        ["corruptions"],
        corruptions=["fog", "snow"],
        severities=[2, 5],
        corruption_set="cifar10-c",
        corruption_dir=str(tmp_path),
    )
    res = results["suites"]["corruptions"]
    assert res["corruption_set"].startswith("released cifar10-c files")
    assert "Corruption set: released cifar10-c files" in markdown_report(results, ordered_suites())
    files = CifarCorrupted(tmp_path, "snow", 5)
    x = torch.stack([files[i][0] for i in range(len(files))])
    y = torch.tensor([files[i][1] for i in range(len(files))])
    expected = correct(trained_tiny_model, x, y).float().mean().item()
    assert res["accuracy"]["snow"]["5"] == pytest.approx(expected)


def test_generated_corruptions_record_their_severity_scale(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    data = torch.utils.data.TensorDataset(tiny_task.x_test[:4], tiny_task.y_test[:4])
    res = evaluate(
        copy.deepcopy(trained_tiny_model),
        data,
        ["corruptions"],
        corruptions=["gaussian_noise", "fog", "frost"],
        severities=[1],
    )["suites"]["corruptions"]
    assert res["severity_scale"] == {"gaussian_noise": "cifar", "fog": "cifar", "frost": "imagenet"}
    assert res["corruption_set"] == (
        "generated on the fly, CIFAR-10-C severities and ImageNet-C severities"
    )
    assert list(res["severity_scale_notes"]) == ["frost"]
    assert "frost photographs" in res["severity_scale_notes"]["frost"]


def _imagenet_c(root: Path, corruptions: tuple[str, ...]) -> None:
    rng = np.random.default_rng(1)
    for name in corruptions:
        for severity in range(1, 6):
            for wnid in ("n01", "n02", "n03"):
                folder = root / name / str(severity) / wnid
                folder.mkdir(parents=True)
                for i in range(2):
                    array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                    Image.fromarray(array).save(folder / f"img{i}.JPEG", quality=95)


def test_imagenet_c_layout_and_alexnet_normalised_mce(
    trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path
) -> None:
    _imagenet_c(tmp_path, ("fog", "contrast"))
    files = ImageNetCorrupted(tmp_path, "fog", 3)
    assert files.classes == ["n01", "n02", "n03"] and len(files) == 6
    assert files[2][1] == 1 and files[2][0].shape == (3, 8, 8)
    data = torch.utils.data.TensorDataset(tiny_task.x_test[:6], tiny_task.y_test[:6])
    res = evaluate(
        copy.deepcopy(trained_tiny_model),
        data,
        ["corruptions"],
        corruptions=["fog", "contrast"],
        corruption_set="imagenet-c",
        corruption_dir=str(tmp_path),
    )["suites"]["corruptions"]
    assert "AlexNet" in res["baseline"]
    for name in ("fog", "contrast"):
        err = 1 - sum(res["accuracy"][name].values()) / 5
        assert res["ce"][name] == pytest.approx(err / ALEXNET_MEAN_ERRORS[name])
    assert res["mce"] == pytest.approx((res["ce"]["fog"] + res["ce"]["contrast"]) / 2)
