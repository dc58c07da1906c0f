"""Training images held on the training device, cropped and flipped there in batches.

The in-memory datasets (CIFAR-10/100, SVHN, ``cifar10-jpeg``, ``shapes``) store their images
once as ``uint8 [N, C, H, W]`` (:class:`~advfeat.data.bundle.ArrayDataset`). :class:`DeviceImages`
moves a training split's images and labels to the device once; :meth:`DeviceImages.batches` then
cuts batches there: each batch is gathered, cropped and flipped by one indexing operation
(:func:`crop_flip`) and converted to float in [0, 1] on the device. The crop offsets and flips are
drawn for a whole epoch at once (:meth:`CropFlip.draw`), with the distribution of
:class:`~advfeat.data.transforms.CifarAugment`, whose images :func:`crop_flip` reproduces pixel
for pixel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advfeat.data.bundle import ArrayDataset, LabelTargets
from advfeat.data.transforms import PADDING_MODES, CifarAugment
from advfeat.errors import AdvfeatError

__all__ = ["CropFlip", "DeviceImages", "crop_flip", "device_data_refusal"]


@dataclass(frozen=True)
class CropFlip:
    """The parameters of :class:`~advfeat.data.transforms.CifarAugment`: pad by ``padding``
    (``"zeros"`` or ``"reflect"``), crop back at a uniform offset, mirror with probability 1/2
    when ``flip``."""

    padding: int
    padding_mode: str
    flip: bool

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``int64 [3, n]``: for each of ``n`` items the vertical and horizontal crop offsets,
        uniform in ``[-padding, padding]``, and the flip (1 with probability 1/2, else 0)."""
        offsets = torch.randint(-self.padding, self.padding + 1, (2, n), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return torch.cat([offsets, (flips & self.flip).long()[None]])


def _reflect(coords: Tensor, size: int) -> Tensor:
    """Mirror coordinates in ``[-(size - 1), 2 (size - 1)]`` into ``[0, size)`` without repeating
    the edge (``F.pad(mode="reflect")``: -1 → 1, size → size - 2)."""
    return (size - 1) - ((size - 1) - coords.abs()).abs()


def crop_flip(images: Tensor, index: Tensor, draws: Tensor, *, padding_mode: str) -> Tensor:
    """``images[index]`` cropped and flipped, as :func:`~advfeat.data.transforms.random_crop_flip`
    does for the same draws, in one gather on ``images``' device.

    ``images``: ``[N, C, H, W]`` (any dtype, uint8 for the cache); ``index``: ``[B]``;
    ``draws``: ``[3, B]`` vertical offset, horizontal offset and flip (0 / 1) of each item (see
    :meth:`CropFlip.draw`). Item ``b`` is the ``H x W`` window at ``(dy, dx)`` of its image padded
    by zeros or by reflection, mirrored left-right when its flip is 1.
    """
    if padding_mode not in PADDING_MODES:
        raise AdvfeatError(
            f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}"
        )
    n, channels, height, width = images.shape
    dy, dx, flip = draws
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    source_rows = dy[:, None] + rows  # [B, H] rows of the unpadded image
    source_cols = dx[:, None] + torch.where(flip[:, None].bool(), width - 1 - cols, cols)
    inside = None
    if padding_mode == "reflect":
        source_rows, source_cols = _reflect(source_rows, height), _reflect(source_cols, width)
    else:
        inside = ((source_rows >= 0) & (source_rows < height))[:, :, None] & (
            (source_cols >= 0) & (source_cols < width)
        )[:, None, :]
        source_rows, source_cols = source_rows.clamp(0, height - 1), source_cols.clamp(0, width - 1)
    pixel = (source_rows[:, :, None] * width + source_cols[:, None, :]).view(-1, 1, height * width)
    channel = torch.arange(channels, device=images.device).view(1, channels, 1)
    out = images.reshape(n, channels, height * width)[index.view(-1, 1, 1), channel, pixel]
    if inside is not None:
        out = out * inside.view(-1, 1, height * width)
    return out.view(-1, channels, height, width)


def device_data_refusal(dataset: Any) -> str | None:
    """Why the training split ``dataset`` cannot be held on the device, or ``None`` when it can
    (an :class:`~advfeat.data.bundle.ArrayDataset` of class labels, augmented by
    :class:`~advfeat.data.transforms.CifarAugment` or not at all)."""
    if not isinstance(dataset, ArrayDataset):
        return (
            f"its training images are read item by item ({type(dataset).__name__}), not held in "
            "memory as one uint8 tensor"
        )
    if not isinstance(dataset.targets, LabelTargets):
        return (
            f"its targets are {type(dataset.targets).__name__}, not class labels (boxes and masks "
            "move with their image)"
        )
    if dataset.transform is not None and type(dataset.transform) is not CifarAugment:
        return f"its training transform {dataset.transform!r} is not the crop and flip"
    return None


class DeviceImages:
    """A training split's images (``uint8 [N, C, H, W]``) and labels held on ``device``, with
    the split's crop-and-flip augmentation (``augment``; ``None`` when it has none).

    Raises :class:`~advfeat.errors.AdvfeatError` naming the reason when the split cannot be held
    (:func:`device_data_refusal`).
    """

    def __init__(self, dataset: Any, device: torch.device) -> None:
        reason = device_data_refusal(dataset)
        if reason is not None:
            raise AdvfeatError(f"the training split cannot be held on the device: {reason}")
        images, labels = dataset.images, dataset.targets.labels
        if dataset.indices is not None:
            images, labels = images[dataset.indices], labels[dataset.indices]
        transform = dataset.transform
        augment = (
            None
            if transform is None
            else CropFlip(transform.padding, transform.padding_mode, transform.flip)
        )
        height, width = images.shape[-2:]
        if (
            augment is not None
            and augment.padding_mode == "reflect"
            and augment.padding >= min(height, width)
        ):
            raise AdvfeatError(
                f"reflect padding of {augment.padding} pixels needs images larger than that, "
                f"got {height}x{width}"
            )
        self.augment = augment
        self.images = images.contiguous().to(device)
        self.labels = labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def plan(self, order: Tensor, share: slice, generator: torch.Generator) -> Tensor:
        """``int64 [1 or 4, M]`` on the device: the indices ``order[share]`` and, with
        augmentation, their draws (:meth:`CropFlip.draw`). The draws are made for every position
        of ``order``, so an item's crop and flip do not depend on how ``order`` is shared out
        among processes."""
        rows = [order[share][None]]
        if self.augment is not None:
            rows.append(self.augment.draw(len(order), generator)[:, share])
        return torch.cat(rows).to(self.images.device)

    def batch(self, plan: Tensor) -> tuple[Tensor, Tensor]:
        """Float images in [0, 1] and labels of the items of ``plan`` (columns of :meth:`plan`)."""
        index = plan[0]
        if self.augment is None:
            pixels = self.images[index]
        else:
            pixels = crop_flip(self.images, index, plan[1:], padding_mode=self.augment.padding_mode)
        return pixels.float().div_(255.0), self.labels[index]

    def batches(self, plan: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The full batches of ``plan``'s columns, in order (a partial last batch is dropped)."""
        for start in range(0, plan.shape[1] - batch_size + 1, batch_size):
            yield self.batch(plan[:, start : start + batch_size])
