"""Top-k accuracy of a classifier over a dataset (evaluation mode, restored afterwards)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from advfeat.modes import eval_mode
from advfeat.tasks.classification import topk_counts

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
    """Return ``{"top1": ..., "top5": ...}`` (fractions in [0, 1]) of ``model`` on ``dataset``."""
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin
    )
    hits = torch.zeros(len(topk), dtype=torch.long, device=device)  # read once, at the end
    total = 0
    with eval_mode(model):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            hits += topk_counts(model(x), y, topk)
            total += y.numel()
    counts = hits.tolist()
    return {f"top{k}": counts[i] / max(total, 1) for i, k in enumerate(topk)}
