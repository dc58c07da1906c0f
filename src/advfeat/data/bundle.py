"""What every dataset factory returns, the dataset registry, the train/validation split, collate.

A dataset factory takes ``(root, *, seed, val_fraction, augment, download, **options)`` and
returns a :class:`DatasetBundle`. Items of every split are ``(image, target)`` with ``image`` a
float tensor CHW in ``[0, 1]`` (normalisation lives inside the model) and ``target`` an ``int``
(classification), a dict ``{"boxes", "labels"}`` (detection) or an ``int64`` mask (segmentation).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from advfeat.errors import AdvfeatError
from advfeat.registry import Registry

__all__ = [
    "DATASETS",
    "DATASET_CHECKS",
    "ArrayDataset",
    "BoxTargets",
    "DatasetBundle",
    "LabelTargets",
    "MaskTargets",
    "PairTransform",
    "Task",
    "build_dataset",
    "channel_stats",
    "check_dataset",
    "check_positive_int",
    "detection_collate",
    "fetches_into",
    "split_indices",
    "train_val_views",
]

Task = Literal["classification", "detection", "segmentation"]
PairTransform = Callable[[Tensor, Any], tuple[Tensor, Any]]
"""A transform of ``(image, target)`` pairs, so that geometric changes move boxes and masks too."""


@dataclass
class DatasetBundle:
    """The splits of one dataset and what a model needs to know about it.

    ``val`` is ``None`` when ``val_fraction == 0``; ``shifted`` maps a domain name to a test set
    with the same targets as ``test`` but a shifted input distribution (empty for real data).
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: Task
    class_names: list[str]
    shifted: dict[str, Dataset] = field(default_factory=dict)


DatasetFactory = Callable[..., DatasetBundle]
DATASETS: Registry[DatasetFactory] = Registry("dataset")
"""Dataset factories by name; :func:`build_dataset` calls them."""

DatasetCheck = Callable[..., None]
DATASET_CHECKS: Registry[DatasetCheck] = Registry("dataset check")
"""What a dataset's factory refuses before it reads or generates any data, by dataset name:
called with every argument of the factory (its defaults filled in), it raises
:class:`AdvfeatError` where the factory would (:func:`check_dataset` calls it)."""

_COMMON_ARGS = ("root", "seed", "val_fraction", "augment", "download")


def build_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    **kw: Any,
) -> DatasetBundle:
    """Build dataset ``name`` (see :data:`DATASETS`) with its train/val/test splits.

    ``val_fraction`` holds out that fraction of the training set as a validation set
    (deterministic from ``seed``, never augmented); the papers use 0.1. ``augment`` switches the
    standard training augmentation on for the train split only. ``download`` lets torchvision
    fetch a missing real dataset into ``root``. Other keyword options are dataset specific
    (e.g. ``n_train``, ``image_size``, ``max_per_class``); unknown ones raise
    :class:`AdvfeatError` listing the accepted ones.
    """
    check_dataset(
        name, root, seed=seed, val_fraction=val_fraction, augment=augment, download=download, **kw
    )
    return DATASETS.get(name)(
        root,
        seed=int(seed),
        val_fraction=float(val_fraction),
        augment=bool(augment),
        download=bool(download),
        **kw,
    )


def check_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    **kw: Any,
) -> None:
    """Raise :class:`AdvfeatError` where :func:`build_dataset` with the same arguments would
    before it reads, downloads or generates data: the name, the options' names, ``seed``,
    ``val_fraction`` and the dataset's own check (:data:`DATASET_CHECKS`: its option values and,
    for real data, whether the files are where ``root`` says)."""
    factory = DATASETS.get(name)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise AdvfeatError(f"seed must be an integer, got {seed!r}")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, numbers.Real)
        or not 0 <= float(val_fraction) < 1
    ):
        raise AdvfeatError(
            f"val_fraction must be a number in [0, 1) (0.1 holds out 10 % of the training set), "
            f"got {val_fraction!r}"
        )
    _check_options(name, factory, kw)
    if name in DATASET_CHECKS:
        arguments = inspect.signature(factory).bind(
            root, seed=seed, val_fraction=val_fraction, augment=augment, download=download, **kw
        )
        arguments.apply_defaults()
        DATASET_CHECKS.get(name)(**arguments.arguments)


def fetches_into(name: str, root: str | Path) -> bool:
    """Whether dataset ``name`` downloads its files into ``root`` (a folder that need not exist):
    its own check refuses ``root`` as it stands and accepts it with ``download=True``."""
    try:
        check_dataset(name, root, download=True)
    except AdvfeatError:
        return False
    try:
        check_dataset(name, root)
    except AdvfeatError:
        return True
    return False


def _check_options(name: str, factory: DatasetFactory, kw: dict[str, Any]) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in _COMMON_ARGS]
    unknown = sorted(set(kw) - set(params))
    if unknown:
        listed = ", ".join(accepted) if accepted else "none"
        raise AdvfeatError(
            f"dataset {name!r} does not take the option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {listed}"
        )


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` or raise :class:`AdvfeatError` if it is not ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise AdvfeatError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint sorted ``(train, val)`` index tensors covering ``range(n)``.

    The validation part has ``round(n * val_fraction)`` items (at least one when
    ``val_fraction > 0``), drawn by a random permutation seeded with ``seed`` only, so the split
    is the same in every run with that seed (the papers' 90 %/10 % protocol uses 0.1).
    """
    if not 0 <= val_fraction < 1:
        raise AdvfeatError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise AdvfeatError(
            f"val_fraction={val_fraction} leaves no training items out of {n}; use more data "
            f"or a smaller val_fraction"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class LabelTargets:
    """Class labels stored as one ``int64`` tensor; item ``i`` is a Python ``int``."""

    def __init__(self, labels: Tensor) -> None:
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> int:
        return int(self.labels[i])


class BoxTargets:
    """Detection targets stored padded: ``boxes`` ``[N, K, 4]`` xyxy and ``labels`` ``[N, K]``.

    Slots with label 0 are empty. Item ``i`` is torchvision's detection target
    ``{"boxes": float32 [n, 4], "labels": int64 [n]}`` (labels ``1..C``, 0 = background).
    """

    def __init__(self, boxes: Tensor, labels: Tensor) -> None:
        self.boxes = boxes.to(torch.float32)
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        keep = self.labels[i] > 0
        return {"boxes": self.boxes[i][keep].clone(), "labels": self.labels[i][keep].clone()}


class MaskTargets:
    """Segmentation masks stored as ``uint8`` ``[N, H, W]``; item ``i`` is an ``int64`` mask."""

    def __init__(self, masks: Tensor) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> Tensor:
        return self.masks[i].to(torch.int64)


class ArrayDataset(Dataset):
    """Images kept in memory as ``uint8`` ``[N, C, H, W]``, converted to float ``[0, 1]`` per item.

    ``targets`` is indexable by item (e.g. :class:`LabelTargets`); ``indices`` selects a view
    without copying; ``transform`` maps ``(image, target)`` pairs (augmentation).
    """

    def __init__(
        self,
        images: Tensor,
        targets: Any,
        *,
        indices: Tensor | None = None,
        transform: PairTransform | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise AdvfeatError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}"
            )
        if len(targets) != len(images):
            raise AdvfeatError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images) if self.indices is None else len(self.indices)

    def source_index(self, i: int) -> int:
        """Index of item ``i`` of this view in the underlying storage."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        return i if self.indices is None else int(self.indices[i])

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        j = self.source_index(i)
        image = self.images[j].to(torch.float32).div_(255.0)
        target = self.targets[j]
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def view(
        self, indices: Tensor | None = None, transform: PairTransform | None = None
    ) -> ArrayDataset:
        """A dataset over the same storage with other ``indices`` and ``transform``."""
        if indices is not None and self.indices is not None:
            indices = self.indices[indices]
        elif indices is None:
            indices = self.indices
        return ArrayDataset(self.images, self.targets, indices=indices, transform=transform)


def train_val_views(
    full: ArrayDataset,
    *,
    val_fraction: float,
    seed: int,
    train_transform: PairTransform | None,
) -> tuple[ArrayDataset, ArrayDataset | None]:
    """Split ``full`` into an augmented train view and an un-augmented validation view."""
    if val_fraction == 0:
        return full.view(transform=train_transform), None
    train_idx, val_idx = split_indices(len(full), val_fraction, seed)
    return full.view(train_idx, train_transform), full.view(val_idx, None)


def detection_collate(batch: Sequence[tuple[Tensor, Any]]) -> tuple[list[Tensor], list[Any]]:
    """Collate detection items into ``(list of images, list of target dicts)``.

    torchvision detection models take lists because images and box counts differ in size.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``uint8`` images ``[N, C, H, W]`` on ``[0, 1]``.

    Exact, from each channel's 256-bin histogram.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        p = hist / hist.sum()
        mean = float((p * levels).sum())
        var = float((p * (levels - mean).square()).sum())
        means.append(round(mean, 4))
        stds.append(round(var**0.5, 4))
    return tuple(means), tuple(stds)
