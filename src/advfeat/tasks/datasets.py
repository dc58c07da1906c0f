"""Moved to :mod:`advfeat.data.dense` (datasets belong to the data layer); this name re-exports it."""

from advfeat.data.dense import (
    CITYSCAPES_TRAIN_IDS,
    VOC_CLASSES,
    CityscapesSegmentation,
    CocoDetection,
    PadTo,
    SegmentationCrop,
    VOCDetection,
    VOCSegmentation,
    cityscapes,
    coco,
    pad_pair,
    voc_det,
    voc_seg,
)

__all__ = [
    "CITYSCAPES_TRAIN_IDS",
    "VOC_CLASSES",
    "CityscapesSegmentation",
    "CocoDetection",
    "PadTo",
    "SegmentationCrop",
    "VOCDetection",
    "VOCSegmentation",
    "cityscapes",
    "coco",
    "pad_pair",
    "voc_det",
    "voc_seg",
]
