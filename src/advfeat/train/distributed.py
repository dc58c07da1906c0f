"""Distributed data parallel set-up from ``torchrun`` environment variables, and the sampler.

The same code runs on one process or under ``torchrun --nproc_per_node N``: with N processes,
each takes every N-th index of the epoch's permutation, so the union of the N per-rank batches of
step k is exactly the single-process batch k (the global batch size stays ``batch_size``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from advfeat.errors import AdvfeatError

__all__ = ["DistInfo", "EpochSampler", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


class EpochSampler(Sampler[int]):
    """A permutation fixed by ``(seed, epoch)``, strided across ranks.

    Every rank gets ``len(dataset) // world_size`` indices (the tail is dropped so that ranks stay
    in step); with one process and ``shuffle=False`` it is the identity.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, info: DistInfo | None = None):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.info = info or DistInfo()
        self.epoch = 0
        self.skip = 0
        """Indices of this rank to leave out at the start of the epoch (a run resumed mid-epoch
        continues where it stopped); ``len()`` still counts the whole epoch."""
        if n < self.info.world_size:
            raise AdvfeatError(
                f"dataset of {n} items is smaller than the {self.info.world_size} processes"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.info.world_size

    def permutation(self) -> Tensor:
        """The epoch's order of all ``n`` indices (the identity without ``shuffle``)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def share(self) -> slice:
        """This rank's positions in :meth:`permutation`: every ``world_size``-th, the tail that
        would leave the ranks uneven dropped."""
        usable = len(self) * self.info.world_size
        return slice(self.info.rank, usable, self.info.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation()[self.share()][self.skip :].tolist())
