"""The trainer's batches cut on the device (``device_data``) instead of by a DataLoader.

With ``device_data`` on, the training split's uint8 images live on the training device
(:class:`~advfeat.data.device.DeviceImages`) and each epoch is a :class:`DeviceEpoch`: the
sampler's permutation and this process's share of it, as with the DataLoader, and crop and flip
draws from a generator seeded by ``(seed, epoch)`` alone, so that a resumed epoch that skips its
first batches gets the same later batches, whatever the global RNG did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from advfeat.data.device import DeviceImages, device_data_refusal
from advfeat.errors import AdvfeatError
from advfeat.train.distributed import EpochSampler

__all__ = ["DEVICE_DATA", "DeviceEpoch", "augment_seed", "device_images"]

DEVICE_DATA = ("auto", "true", "false")
"""Values of ``device_data``: ``auto`` holds the training images on a CUDA device when the
dataset allows it, ``true`` on any device (refusing a dataset that does not allow it)."""


def device_images(
    choice: str, dataset: Any, device: torch.device, *, name: str
) -> DeviceImages | None:
    """The training split ``dataset`` of dataset ``name`` held on ``device`` as ``choice`` asks,
    or ``None`` when the trainer reads it with a DataLoader."""
    if choice not in DEVICE_DATA:
        raise AdvfeatError(f"device_data must be one of {', '.join(DEVICE_DATA)}, got {choice!r}")
    reason = device_data_refusal(dataset)
    if choice == "false" or (choice == "auto" and (device.type != "cuda" or reason is not None)):
        return None
    if reason is not None:
        raise AdvfeatError(
            f"device_data=true: dataset {name!r} cannot be held on the device ({reason}); "
            "use device_data=auto or false"
        )
    return DeviceImages(dataset, device)


def augment_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s crop and flip draws: a hash of ``(seed, epoch)``, unrelated
    to the seeds of the global RNG and of the sampler."""
    digest = hashlib.blake2b(f"crop-flip {seed} {epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class DeviceEpoch:
    """One epoch of ``(images, labels)`` batches of ``batch_size`` cut on the device.

    Like a DataLoader over ``sampler`` (drop_last): ``len()`` counts the epoch's full batches,
    and iterating starts after the sampler's ``skip`` first items (a resumed epoch); the plan
    (indices and draws) is moved to the device in one copy per epoch.
    """

    def __init__(
        self, images: DeviceImages, sampler: EpochSampler, batch_size: int, *, seed: int
    ) -> None:
        self.images = images
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def plan(self) -> Tensor:
        """The epoch's plan (:meth:`DeviceImages.plan`) for this process, ``skip`` included."""
        generator = torch.Generator().manual_seed(self.seed)
        return self.images.plan(self.sampler.permutation(), self.sampler.share(), generator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.images.batches(self.plan()[:, self.sampler.skip :], self.batch_size)
