"""Detection and segmentation metrics: COCO AP / AP50 / AP75 and mAP@0.5, mIoU with ignore index.

* :class:`DetectionMeter` wraps ``torchmetrics.detection.MeanAveragePrecision`` (COCO protocol,
  101-point interpolated precision; needs the optional dependency ``torchmetrics`` with
  ``pycocotools``): ``ap`` (AP@[.5:.95], A-FAN Table 5's COCO "AP"), ``ap50`` (= the VOC "mAP"
  column at IoU 0.5, see Table 5's footnote; COCO-style interpolation, not VOC07's 11 points),
  ``ap75``.
* :func:`confusion_matrix`, :func:`iou_from_confusion` and :class:`SegmentationMeter`: mIoU as
  in DeepLab (Chen et al.): one confusion matrix over the whole evaluation set, IoU_c =
  TP_c / (TP_c + FP_c + FN_c), mean over the classes that occur in prediction or ground truth;
  pixels whose target is ``ignore_index`` do not count.

Why mIoU is ours and not ``torchmetrics.classification.MulticlassJaccardIndex`` (checked with
torchmetrics 1.9.0, ``average="macro"``): with an ignore index outside the classes (255, the
datasets' value) its mean is the same quantity, but no configuration reproduces ours exactly:

- it divides in float32 (``_safe_divide`` casts the int64 confusion matrix to float32; setting the
  metric's dtype does not change that), so mIoU differs from this float64 value by up to ~2e-8;
- a class absent from prediction and target gets IoU ``zero_division`` (0.0) with
  ``average="none"``, where ``iou_per_class`` reports NaN (both leave it out of the mean);
- an ignore index inside ``[0, C)`` also drops that class from its mean; here the class keeps its
  column (pixels predicted as it are still false positives), e.g. 0.110 vs 0.147 on random masks;
- it is the optional extra ``advfeat[metrics]``, and segmentation must work on a base install.

``tests/test_tasks_segmentation.py`` checks the agreement to float32 precision on random masks
with absent classes and an ignore index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from advfeat.errors import AdvfeatError

__all__ = ["DetectionMeter", "SegmentationMeter", "confusion_matrix", "iou_from_confusion"]


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255
) -> Tensor:
    """``M[t, p]`` = number of pixels of true class ``t`` predicted as ``p`` (int64 ``[C, C]``).

    ``pred`` and ``target`` are integer label maps of the same shape; target pixels equal to
    ``ignore_index`` are skipped. Labels outside ``[0, num_classes)`` raise :class:`AdvfeatError`.
    """
    if pred.shape != target.shape:
        raise AdvfeatError(
            f"prediction and target masks must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise AdvfeatError("masks must be integer label maps (take logits.argmax(1) first)")
    keep = (
        target != ignore_index
        if ignore_index is not None
        else torch.ones_like(target, dtype=torch.bool)
    )
    t, p = target[keep].long(), pred[keep].long()
    for label, values in (("target", t), ("prediction", p)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise AdvfeatError(
                f"{label} mask holds class ids in [{int(values.min())}, {int(values.max())}], but the model "
                f"has {num_classes} classes (ids 0..{num_classes - 1}; ignore index {ignore_index})"
            )
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).cpu()


def iou_from_confusion(matrix: Tensor) -> tuple[float, Tensor]:
    """``(mIoU, per-class IoU)``; classes absent from prediction and target are NaN, left out."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    miou = float(iou[valid].mean()) if bool(valid.any()) else float("nan")
    return miou, iou


class SegmentationMeter:
    """Accumulates a confusion matrix over batches; :meth:`compute` gives mIoU and pixel accuracy."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` labels (or ``[N, C, H, W]`` logits) and ``target`` masks."""
        if pred.is_floating_point():
            pred = pred.argmax(1)
        self.matrix += confusion_matrix(
            pred.detach(), target.detach(), self.num_classes, self.ignore_index
        )

    def compute(self) -> dict[str, Any]:
        miou, iou = iou_from_confusion(self.matrix)
        total = int(self.matrix.sum())
        acc = float(self.matrix.diag().sum()) / total if total else float("nan")
        return {"miou": miou, "pixel_acc": acc, "iou_per_class": [float(v) for v in iou]}


class DetectionMeter:
    """COCO-style AP of box detections (torchmetrics ``MeanAveragePrecision``, iou_type bbox)."""

    def __init__(self, iou_thresholds: Sequence[float] | None = None) -> None:
        try:
            from torchmetrics.detection import MeanAveragePrecision
        except ImportError:
            raise AdvfeatError(
                "detection metrics need torchmetrics and pycocotools: pip install advfeat[detection]"
            ) from None
        thresholds = list(iou_thresholds) if iou_thresholds is not None else None
        self.metric = MeanAveragePrecision(iou_type="bbox", iou_thresholds=thresholds)

    def update(
        self, predictions: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> None:
        """Add detections ``{"boxes", "scores", "labels"}`` and ground truth ``{"boxes", "labels"}``."""
        if len(predictions) != len(targets):
            raise AdvfeatError(f"{len(predictions)} predictions but {len(targets)} targets")
        preds = [
            {k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in predictions
        ]
        gts = [{k: t[k].detach().cpu() for k in ("boxes", "labels")} for t in targets]
        self.metric.update(preds, gts)

    def compute(self) -> dict[str, float]:
        out = self.metric.compute()
        return {"ap": float(out["map"]), "ap50": float(out["map_50"]), "ap75": float(out["map_75"])}
