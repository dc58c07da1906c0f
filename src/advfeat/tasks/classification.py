"""Image classification as a task: logits, cross-entropy, top-k accuracy.

Batches are ``(images [N, C, H, W] in [0, 1], labels int64 [N])``. The training loss is the mean
cross-entropy; attacks ascend the summed cross-entropy (per-sample gradients independent of the
batch size, :func:`advfeat.attacks.base.default_loss`); the metrics are top-1 (``acc``, the
primary one) and top-5 accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

from advfeat.data.bundle import DatasetBundle
from advfeat.models import build_model
from advfeat.modes import eval_mode
from advfeat.sites import last_stage
from advfeat.tasks.base import ForwardPass, Task, TaskPass
from advfeat.tasks.registry import register_task

__all__ = ["ClassificationTask", "topk_accuracy", "topk_counts", "topk_hits"]


def topk_counts(logits: Tensor, y: Tensor, topk: Sequence[int]) -> Tensor:
    """For each ``k`` of ``topk``, the number of samples whose label is among the ``k`` largest
    logits: an int64 tensor on the logits' device (read it once, after the last batch)."""
    k_max = min(max(topk), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    return torch.stack([(top[:, : min(k, k_max)] == y[:, None]).any(dim=1).sum() for k in topk])


def topk_hits(logits: Tensor, y: Tensor, topk: Sequence[int]) -> dict[int, int]:
    """``{k: number of samples whose label is among the k largest logits}``."""
    return dict(zip(topk, topk_counts(logits, y, topk).tolist(), strict=True))


@torch.no_grad()
def topk_accuracy(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str = "cpu",
    topk: Sequence[int] = (1,),
    attack: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[int, float]:
    """``{k: top-k accuracy}`` of ``model`` in eval mode (its flags restored afterwards) over the
    ``(images, labels)`` batches of ``loader``, on images attacked by ``attack(x, y)`` when given.
    The hits are counted on the device and read once, after the last batch."""
    hits = torch.zeros(len(topk), dtype=torch.long, device=device)
    total = 0
    with eval_mode(model):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if attack is not None:
                with torch.enable_grad():
                    x = attack(x, y)
            hits += topk_counts(model(x), y, topk)
            total += y.numel()
    return {k: n / max(total, 1) for k, n in zip(topk, hits.tolist(), strict=True)}


@register_task
class ClassificationTask(Task):
    """Cross-entropy training, summed cross-entropy for attacks, top-k accuracy.

    :meth:`evaluate` reports top-1 accuracy (``acc``; ``top1`` in the evaluation suites), and
    with ``detailed=True`` top-5 (``top5``) too when there are more than 5 classes.
    """

    name = "classification"
    metrics = ("acc", "top5")
    primary_metric = "acc"
    eval_names: ClassVar[Mapping[str, str]] = {"acc": "top1"}
    seeded_evaluation = False
    """Top-k accuracy in eval mode draws no random numbers: its results carry no seed."""
    capturable = True
    classifier = True

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

    def collate(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        x, y = default_collate(list(batch))
        return x, y

    def to_device(self, x: Any, y: Any, device: torch.device) -> tuple[Any, Any]:
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def output_loss(self, output: Any, y: Any) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(output, y)
        return loss, {"loss_ce": loss}

    def attack_loss(self, output: Any, y: Any) -> Tensor:
        return F.cross_entropy(output, y, reduction="sum")

    def clean_pass(self, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> TaskPass:
        return ForwardPass(self, model, x, y, sites, replay=False)

    def build_model(self, name: str, data: DatasetBundle, **options: Any) -> nn.Module:
        """Classifier ``name`` of :data:`advfeat.models.MODELS` for ``data``."""
        return build_model(
            name,
            num_classes=data.num_classes,
            mean=data.mean,
            std=data.std,
            image_size=data.image_size,
            **options,
        )

    def default_sites(self, model: nn.Module) -> list[str]:
        """The last stage (:func:`advfeat.sites.last_stage`), "the last block" of ALFA / A-FAN."""
        return [last_stage(model)]

    def logits(self, output: Any) -> Tensor | None:
        return output

    def running_metrics(self, logits: Tensor | None, y: Any) -> dict[str, Tensor]:
        """``{"acc": top-1 hits}`` of a batch, counted on the device."""
        return {} if logits is None else {"acc": (logits.detach().argmax(1) == y).sum()}

    def evaluate(
        self,
        model: nn.Module,
        loader: Any,
        *,
        device: torch.device | str = "cpu",
        attack: Any = None,
        detailed: bool = False,
    ) -> dict[str, Any]:
        """Top-1 (``acc``) and top-5 accuracy in eval mode (:func:`topk_accuracy`), on the
        images ``attack(model, x, y)`` returns when given."""
        topk = (1, 5) if detailed and (self.num_classes or 0) > 5 else (1,)
        attack_xy = None if attack is None else lambda x, y: attack(model, x, y)
        accuracy = topk_accuracy(model, loader, device=device, topk=topk, attack=attack_xy)
        return {("acc" if k == 1 else f"top{k}"): v for k, v in accuracy.items()}
