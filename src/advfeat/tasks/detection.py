"""Object detection with torchvision's Faster R-CNN (A-FAN §5).

Batches are ``(list of [3, H, W] images in [0, 1], list of {"boxes", "labels"})``, boxes xyxy in
pixels, labels ``1..num_classes-1`` (0 is the background). The training loss is the sum of
Faster R-CNN's loss dict (RPN objectness and box regression, ROI classification and box
regression: "detection models adopt regression and classification loss", A-FAN §3.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from advfeat.data.bundle import DatasetBundle, detection_collate
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.tasks.base import (
    DenseTask,
    HookPass,
    TaskPass,
    check_images,
    described,
    last_child,
)
from advfeat.tasks.detection_pass import DetectionPass
from advfeat.tasks.metrics import DetectionMeter
from advfeat.tasks.models import DETECTORS, build_detector
from advfeat.tasks.registry import register_task

__all__ = [
    "ROI_TERMS",
    "RPN_TERMS",
    "SMALL_DETECTION_IMAGES",
    "DetectionTask",
    "check_detection_targets",
]

SMALL_DETECTION_IMAGES = 256
"""Detection images up to this size are square generated ones: the detector keeps their size and
scales its anchors to it; larger sizes are the shorter side torchvision resizes real photos to."""

RPN_TERMS = ("loss_objectness", "loss_rpn_box_reg")
ROI_TERMS = ("loss_classifier", "loss_box_reg")


def check_detection_targets(images: Sequence[Tensor], targets: Any, num_classes: int) -> None:
    """Boxes ``[n, 4]`` float xyxy with positive width and height, labels in ``1..num_classes-1``."""
    if not isinstance(targets, Sequence) or len(targets) != len(images):
        n = len(targets) if isinstance(targets, Sequence) else type(targets).__name__
        raise AdvfeatError(
            f"detection needs one target dict per image: {len(images)} images, {n} targets"
        )
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise AdvfeatError(f"target {i} must be a dict with 'boxes' [n, 4] and 'labels' [n]")
        boxes, labels = t["boxes"], t["labels"]
        if (
            not isinstance(boxes, Tensor)
            or not boxes.is_floating_point()
            or boxes.ndim != 2
            or boxes.shape[1] != 4
        ):
            raise AdvfeatError(
                f"target {i}: boxes must be a float tensor [n, 4] (x1, y1, x2, y2), "
                f"got {described(boxes)}"
            )
        if (
            not isinstance(labels, Tensor)
            or labels.dtype != torch.int64
            or labels.shape != (boxes.shape[0],)
        ):
            raise AdvfeatError(
                f"target {i}: labels must be int64 [{boxes.shape[0]}] (one per box), "
                f"got {described(labels)}"
            )
        if not bool(torch.isfinite(boxes).all()):
            raise AdvfeatError(f"target {i}: boxes contain NaN or infinite coordinates")
        bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise AdvfeatError(
                f"target {i}: box {j} {boxes[j].tolist()} is degenerate; boxes are (x1, y1, x2, y2) "
                f"with x2 > x1 and y2 > y1 (drop empty boxes before training)"
            )
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= num_classes):
            raise AdvfeatError(
                f"target {i}: labels {sorted(set(labels.tolist()))} out of range; the model has "
                f"{num_classes} classes, so object labels are 1..{num_classes - 1} (0 is the background)"
            )


@register_task
class DetectionTask(DenseTask):
    """Faster R-CNN training loss, attack objective and COCO/VOC evaluation.

    ``attack_terms``: ``"all"`` (default: the whole loss dict, "regression and classification
    loss", §3.3) or ``"roi"`` (only the ROI head's classification + box regression, the terms a
    ROI-head feature perturbation reaches). ``fast_tails``: run the clean pass stage by stage so
    that a feature method's later passes start where the site is (:class:`DetectionPass`);
    ``False`` runs every pass over the whole detector (the reference the fast path is tested
    against).
    """

    name = "detection"
    models = DETECTORS
    metrics = ("ap", "ap50", "ap75")
    primary_metric = "ap50"
    autocast = False  # torchvision's box coder and ROI pooling want float32
    stacked_images = False

    def __init__(
        self, num_classes: int, *, attack_terms: str = "all", fast_tails: bool = True
    ) -> None:
        super().__init__(num_classes)
        if attack_terms not in ("all", "roi"):
            raise unknown_name("detection attack terms", str(attack_terms), ["all", "roi"])
        self.terms = attack_terms
        self.fast_tails = fast_tails

    def forward_output(self, model: nn.Module, x: Any, y: Any) -> dict[str, Tensor]:
        """Faster R-CNN's loss dict (the model must be in training mode)."""
        if not model.training:
            raise AdvfeatError(
                "Faster R-CNN returns its losses in training mode: call model.train() first"
            )
        parts = model(list(x), list(y))
        if not isinstance(parts, dict):
            raise AdvfeatError(
                f"the detector returned {type(parts).__name__}, expected torchvision's loss dict"
            )
        return dict(parts)

    def loss_parts(self, model: nn.Module, images: Any, targets: Any) -> dict[str, Tensor]:
        """The model's training loss terms on a batch (model in training mode)."""
        return self.forward_output(model, images, targets)

    def output_loss(self, output: Any, y: Any) -> tuple[Tensor, dict[str, Tensor]]:
        parts = dict(output)
        return torch.stack(list(parts.values())).sum(), parts

    def attack_terms(self, parts: dict[str, Tensor]) -> Tensor:
        """The scalar that attacks ascend, from the loss terms."""
        keys = ROI_TERMS if self.terms == "roi" else tuple(parts)
        return torch.stack([parts[k] for k in keys]).sum()

    def attack_loss(self, output: Any, y: Any) -> Tensor:
        return self.attack_terms(dict(output))

    def clean_pass(self, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> TaskPass:
        if self.fast_tails and DetectionPass.supports(model, sites):
            return DetectionPass(self, model, x, y, sites)
        return HookPass(self, model, x, y, sites)

    def check(self, images: Any, targets: Any) -> None:
        check_images(images, stacked=False)
        check_detection_targets(images, targets, self.num_classes)

    def collate(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        return detection_collate(batch)

    def to_device(self, images: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
        return [x.to(device) for x in images], [
            {k: v.to(device) for k, v in t.items()} for t in targets
        ]

    def build_model(self, name: str, data: DatasetBundle, **options: Any) -> nn.Module:
        """Detector ``name`` of :data:`~advfeat.tasks.DETECTORS` for ``data``: small square
        images (up to :data:`SMALL_DETECTION_IMAGES`) keep their size, larger ones set the
        shorter side torchvision resizes to."""
        if name not in DETECTORS:
            raise unknown_name("detection model", name, DETECTORS)
        size_key = "image_size" if data.image_size <= SMALL_DETECTION_IMAGES else "min_size"
        options = {size_key: data.image_size, **options}
        return build_detector(name, data.num_classes, mean=data.mean, std=data.std, **options)

    def default_sites(self, model: nn.Module) -> list[str]:
        """``backbone.body.<last stage>`` and ``roi_heads.box_head`` (A-FAN §5: "the last layer of
        backbone and ROI networks of Faster RCNN")."""
        return [last_child(model, "backbone.body"), "roi_heads.box_head"]

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections ``{"boxes", "scores", "labels"}`` per image (model in eval mode)."""
        model.eval()
        return list(model(list(images)))

    def meter(self) -> DetectionMeter:
        """COCO AP, AP50 (VOC mAP@0.5) and AP75 (A-FAN Table 5)."""
        return DetectionMeter()
