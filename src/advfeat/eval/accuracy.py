"""Top-k accuracy of a classifier over a dataset (evaluation mode, restored afterwards): the loop
of :class:`~advfeat.tasks.ClassificationTask`, :func:`~advfeat.tasks.classification.topk_accuracy`."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from advfeat.modes import eval_mode
from advfeat.tasks.classification import topk_accuracy

__all__ = ["eval_mode", "evaluate_accuracy"]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    topk: tuple[int, ...] = (1,),
    workers: int = 0,
) -> dict[str, float]:
    """Return ``{"top1": ..., "top5": ...}`` (fractions in [0, 1]) of ``model`` on ``dataset``
    (in order, ``batch_size`` images a batch)."""
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin
    )
    accuracy = topk_accuracy(model, loader, device=device, topk=topk)
    return {f"top{k}": v for k, v in accuracy.items()}
