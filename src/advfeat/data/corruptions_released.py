"""The released common-corruption benchmarks of Hendrycks & Dietterich (ICLR 2019), read from
their published file layouts.

- ``cifar10-c`` / ``cifar100-c``: a folder of ``<corruption>.npy`` files, each 50,000×32×32×3
  uint8 (the 10,000 test images at severity 1, then severity 2, ... 5) and ``labels.npy`` (the
  labels of all rows);
- ``imagenet-c``: a folder tree ``<corruption>/<severity>/<wnid>/*.JPEG`` (224×224 images), the
  classes in sorted wnid order (that of an ImageNet ``imagefolder`` run).

As datasets (``--dataset cifar10-c --data-dir CIFAR-10-C``) their test split is every selected
(corruption, severity) set in turn and their shifted domains are the corruptions (all selected
severities each); ``advfeat eval --suite corruptions --set corruption_set=cifar10-c --set
corruption_dir=PATH`` reads them per corruption and severity instead of generating corruptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from advfeat.data.bundle import DATASETS, DatasetBundle
from advfeat.errors import AdvfeatError, unknown_name

__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "CIFAR_C_SETS",
    "EXTRA_CORRUPTIONS",
    "IMAGES_PER_SEVERITY",
    "RELEASED_SETS",
    "CifarCorrupted",
    "ImageNetCorrupted",
    "available_corruptions",
    "released_corruption",
]

BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 corruptions of the benchmark (mCE averages these), in the paper's order."""

EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The 4 held-out corruptions the releases also ship (not part of mCE)."""

IMAGES_PER_SEVERITY = 10_000
CIFAR_C_SETS = {"cifar10-c": 10, "cifar100-c": 100}
RELEASED_SETS = (*CIFAR_C_SETS, "imagenet-c")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise AdvfeatError(f"corruption severity must be an integer 1 to 5, got {severity!r}")
    return severity


class CifarCorrupted(Dataset[tuple[Tensor, int]]):
    """One corruption at one severity of CIFAR-10-C / CIFAR-100-C (rows ``(s−1)·10⁴ … s·10⁴``),
    read lazily (memory-mapped); items are ``(image CHW float in [0, 1], label)``."""

    def __init__(self, root: str | Path, corruption: str, severity: int) -> None:
        folder = Path(root).expanduser()
        path = folder / f"{corruption}.npy"
        labels = folder / "labels.npy"
        if not path.is_file() or not labels.is_file():
            found = available_corruptions(folder)
            if not found:
                raise AdvfeatError(
                    f"{str(folder)!r} holds no CIFAR-C files: expected <corruption>.npy "
                    "(50000×32×32×3 uint8) and labels.npy, as released"
                )
            raise unknown_name("corruption file", corruption, found)
        self.images = np.load(path, mmap_mode="r")
        self.labels = np.load(labels, mmap_mode="r")
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise AdvfeatError(
                f"{str(path)!r} has shape {self.images.shape}; CIFAR-C files are N×32×32×3"
            )
        per = self.images.shape[0] // 5
        if per * 5 != self.images.shape[0] or self.labels.shape[0] != self.images.shape[0]:
            raise AdvfeatError(
                f"{str(path)!r} holds {self.images.shape[0]} images and labels.npy "
                f"{self.labels.shape[0]}: expected 5 equal severity blocks with one label each"
            )
        self.start = (_check_severity(severity) - 1) * per
        self.length = per

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        row = self.start + index
        image = torch.from_numpy(np.array(self.images[row], dtype=np.uint8))
        return image.permute(2, 0, 1).float().div(255), int(self.labels[row])


class ImageNetCorrupted(Dataset[tuple[Tensor, int]]):
    """One corruption at one severity of ImageNet-C: ``root/<corruption>/<severity>/<wnid>/*``,
    classes in sorted wnid order; items are ``(image CHW float in [0, 1], label)``."""

    EXTENSIONS = (".jpeg", ".jpg", ".png")

    def __init__(self, root: str | Path, corruption: str, severity: int) -> None:
        base = Path(root).expanduser()
        folder = base / corruption / str(_check_severity(severity))
        if not folder.is_dir():
            found = available_corruptions(base)
            if not found:
                raise AdvfeatError(
                    f"{str(base)!r} holds no ImageNet-C tree: expected "
                    "<corruption>/<severity>/<wnid>/*.JPEG, as released"
                )
            raise AdvfeatError(
                f"no {str(folder)!r}: corruptions found there: {', '.join(found)}, severities 1-5"
            )
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.samples = [
            (path, label)
            for label, wnid in enumerate(self.classes)
            for path in sorted((folder / wnid).iterdir())
            if path.suffix.lower() in self.EXTENSIONS
        ]
        if not self.samples:
            raise AdvfeatError(f"{str(folder)!r} holds no images in <wnid>/ sub-folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255), label


def available_corruptions(root: str | Path) -> list[str]:
    """The corruptions present under ``root`` (CIFAR-C files or ImageNet-C folders)."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.glob("*.npy") if p.stem != "labels"}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "1").is_dir()}
    order = {name: i for i, name in enumerate(BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def released_corruption(set_name: str, root: str | Path, corruption: str, severity: int) -> Dataset:
    """The released images of ``corruption`` at ``severity`` from benchmark ``set_name``
    (one of :data:`RELEASED_SETS`) under ``root``."""
    if set_name in CIFAR_C_SETS:
        return CifarCorrupted(root, corruption, severity)
    if set_name == "imagenet-c":
        return ImageNetCorrupted(root, corruption, severity)
    raise unknown_name("released corruption set", set_name, RELEASED_SETS)


def _bundle(
    set_name: str,
    root: str | Path | None,
    corruptions: list[str] | None,
    severities: list[int] | None,
) -> DatasetBundle:
    if root is None:
        raise AdvfeatError(
            f"{set_name} needs --data-dir: the folder of the released files "
            f"({'<corruption>.npy and labels.npy' if set_name in CIFAR_C_SETS else '<corruption>/<severity>/<wnid>/*.JPEG'})"
        )
    found = available_corruptions(root)
    chosen = list(corruptions) if corruptions else [c for c in found if c in BENCHMARK_CORRUPTIONS]
    if not chosen:
        raise AdvfeatError(f"{str(root)!r} holds none of the benchmark's corruption files")
    levels = [_check_severity(s) for s in (severities or [1, 2, 3, 4, 5])]
    per_corruption: dict[str, Dataset] = {
        c: ConcatDataset([released_corruption(set_name, root, c, s) for s in levels])
        for c in chosen
    }
    if set_name in CIFAR_C_SETS:
        num_classes, size, mean, std = CIFAR_C_SETS[set_name], 32, CIFAR_MEAN, CIFAR_STD
        names = [str(i) for i in range(num_classes)]
    else:
        first = released_corruption(set_name, root, chosen[0], levels[0])
        assert isinstance(first, ImageNetCorrupted)
        names = list(first.classes)
        num_classes, size, mean, std = len(names), 224, IMAGENET_MEAN, IMAGENET_STD
    empty = TensorDataset(torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long))
    return DatasetBundle(
        train=empty,
        val=None,
        test=ConcatDataset(list(per_corruption.values())),
        num_classes=num_classes,
        image_size=size,
        mean=mean,
        std=std,
        task="classification",
        class_names=names,
        shifted=dict(per_corruption),
    )


def _register(set_name: str) -> None:
    def factory(
        root: str | Path | None = None,
        *,
        seed: int = 0,
        val_fraction: float = 0.0,
        augment: bool = True,
        download: bool = False,
        corruptions: list[str] | None = None,
        severities: list[int] | None = None,
    ) -> DatasetBundle:
        del seed, val_fraction, augment  # test-only benchmarks: nothing to split or augment
        if download:
            raise AdvfeatError(f"{set_name} is not downloaded by advfeat: fetch the released files")
        return _bundle(set_name, root, corruptions, severities)

    factory.__doc__ = f"{set_name}: the released files (test only); see :mod:`{__name__}`."
    DATASETS.add(set_name, factory)


for _name in RELEASED_SETS:
    _register(_name)


def describe(set_name: str, root: Any) -> str:
    """How the report names a released set."""
    return f"released {set_name} files ({root})"
