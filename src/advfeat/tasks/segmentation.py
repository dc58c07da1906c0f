"""Semantic segmentation with torchvision DeepLabV3 and advfeat's DeepLabV3+ (A-FAN §6).

Batches are ``(images [N, 3, H, W] in [0, 1], masks int64 [N, H, W])``; mask values are class
ids ``0..num_classes-1`` or ``ignore_index`` (255: VOC's object boundaries, Cityscapes' void).
The loss is pixel-wise cross-entropy over non-ignored pixels on ``model(x)["out"]`` (plus
``aux_weight`` times the same loss on ``"aux"`` when the model has an auxiliary head, 0.5 as in
torchvision's reference scripts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.data.bundle import DatasetBundle
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.tasks.base import (
    DenseTask,
    ForwardPass,
    TaskPass,
    check_images,
    described,
    last_child,
)
from advfeat.tasks.metrics import SegmentationMeter
from advfeat.tasks.models import SEGMENTERS, build_segmenter
from advfeat.tasks.registry import register_task

__all__ = ["SegmentationTask", "check_masks", "segmentation_logits"]


def check_masks(images: Tensor, masks: Any, num_classes: int, ignore_index: int | None) -> None:
    """Masks: integer ``[N, H, W]`` of the images' size, ids in ``[0, num_classes)`` or ignored."""
    if not isinstance(masks, Tensor) or masks.is_floating_point() or masks.ndim != 3:
        raise AdvfeatError(
            f"segmentation masks must be an integer tensor [N, H, W], got {described(masks)}"
        )
    want = (images.shape[0], *images.shape[-2:])
    if tuple(masks.shape) != want:
        raise AdvfeatError(
            f"masks have shape {tuple(masks.shape)} but the images need {want} (one mask per image, "
            f"same height and width); resize masks with nearest-neighbour interpolation"
        )
    valid = masks[masks != ignore_index] if ignore_index is not None else masks.flatten()
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise AdvfeatError(
            f"masks hold class ids in [{int(valid.min())}, {int(valid.max())}], but the model has "
            f"{num_classes} classes (ids 0..{num_classes - 1}; ignore index {ignore_index})"
        )


def segmentation_logits(output: Any) -> Tensor:
    """``output["out"]`` for torchvision-style dict outputs, else the output tensor itself."""
    if isinstance(output, dict):
        if "out" not in output:
            raise AdvfeatError(f"segmentation output dict has keys {list(output)}, expected 'out'")
        output = output["out"]
    if not isinstance(output, Tensor) or output.ndim != 4:
        raise AdvfeatError("a segmenter must return [N, C, H, W] logits (or a dict with 'out')")
    return output


@register_task
class SegmentationTask(DenseTask):
    """Pixel cross-entropy with ignore index, attack objective and mIoU evaluation."""

    name = "segmentation"
    models = SEGMENTERS
    metrics = ("miou", "pixel_acc")
    primary_metric = "miou"

    def __init__(
        self, num_classes: int, *, ignore_index: int | None = 255, aux_weight: float = 0.5
    ) -> None:
        super().__init__(num_classes)
        self.ignore_index = ignore_index
        self.aux_weight = float(aux_weight)

    def _ce(self, logits: Tensor, masks: Tensor) -> Tensor:
        if logits.shape[1] != self.num_classes:
            raise AdvfeatError(
                f"the model outputs {logits.shape[1]} classes, the task has {self.num_classes}"
            )
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(
                logits, size=masks.shape[-2:], mode="bilinear", align_corners=False
            )
        ignore = -100 if self.ignore_index is None else self.ignore_index
        if not bool((masks != ignore).any()):
            return logits.sum() * 0.0  # every pixel ignored: no signal, not NaN
        return F.cross_entropy(logits, masks, ignore_index=ignore)

    def output_loss(self, output: Any, y: Any) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {"loss_seg": self._ce(segmentation_logits(output), y)}
        if isinstance(output, dict) and output.get("aux") is not None and self.aux_weight > 0:
            parts["loss_aux"] = self.aux_weight * self._ce(output["aux"], y)
        return torch.stack(list(parts.values())).sum(), parts

    def attack_loss(self, output: Any, y: Any) -> Tensor:
        return self._ce(segmentation_logits(output), y)

    def clean_pass(self, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> TaskPass:
        return ForwardPass(self, model, x, y, sites, replay=True)

    def check(self, images: Any, targets: Any) -> None:
        check_images(images, stacked=True)
        check_masks(images, targets, self.num_classes, self.ignore_index)

    def collate(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        images = torch.stack([b[0] for b in batch])
        masks = torch.stack([torch.as_tensor(b[1], dtype=torch.int64) for b in batch])
        return images, masks

    def to_device(self, images: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
        return images.to(device), targets.to(device)

    def build_model(self, name: str, data: DatasetBundle, **options: Any) -> nn.Module:
        """Segmenter ``name`` of :data:`~advfeat.tasks.SEGMENTERS` for ``data``."""
        if name not in SEGMENTERS:
            raise unknown_name("segmentation model", name, SEGMENTERS)
        return build_segmenter(name, data.num_classes, mean=data.mean, std=data.std, **options)

    def default_sites(self, model: nn.Module) -> list[str]:
        """The last backbone stage and the decoder (DeepLabV3+) or the head's last ReLU (DeepLabV3)
        (A-FAN §6: "the last layer of backbone and the decoder networks of DeepLab V3+")."""
        names = {n for n, _ in model.named_modules()}
        head = (
            "decoder" if "decoder" in names else "classifier.3" if "classifier.3" in names else None
        )
        sites = [last_child(model, "backbone")]
        return sites + ([head] if head else [])

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        """Label maps ``[N, H, W]`` (model in eval mode)."""
        model.eval()
        return segmentation_logits(model(images)).argmax(1)

    def meter(self) -> SegmentationMeter:
        """mIoU and pixel accuracy (A-FAN Table 6)."""
        return SegmentationMeter(self.num_classes, self.ignore_index)
