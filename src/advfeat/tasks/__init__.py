"""Detection and segmentation: tasks, models, metrics, A-FAN/ALFA objectives, robust evaluation.

>>> from advfeat.tasks import DetectionTask, build_detector, build_task_method
>>> task = DetectionTask(num_classes=9)
>>> model = build_detector("fasterrcnn_tiny", 9, image_size=64)
>>> method = build_task_method("afan", task)          # A-FAN §5 defaults
>>> # out = method(model.train(), images, targets); out.loss.backward()
"""

from advfeat.tasks.base import DenseTask, RngReplay, batchnorm_eval
from advfeat.tasks.deeplab_plus import DeepLabV3Plus, TinyResNetBody
from advfeat.tasks.detection import DetectionTask, check_detection_targets
from advfeat.tasks.metrics import (
    DetectionMeter,
    SegmentationMeter,
    confusion_matrix,
    iou_from_confusion,
)
from advfeat.tasks.models import DETECTORS, SEGMENTERS, build_detector, build_segmenter
from advfeat.tasks.objectives import (
    TASK_METHODS,
    DenseAFAN,
    DenseALFA,
    DenseStandard,
    build_task_method,
)
from advfeat.tasks.robust import DETECTION_PGD, SEGMENTATION_PGD, DensePGD, robust_evaluate
from advfeat.tasks.segmentation import SegmentationTask, check_masks

__all__ = [
    "DETECTION_PGD",
    "DETECTORS",
    "SEGMENTATION_PGD",
    "SEGMENTERS",
    "TASK_METHODS",
    "DeepLabV3Plus",
    "DenseAFAN",
    "DenseALFA",
    "DensePGD",
    "DenseStandard",
    "DenseTask",
    "DetectionMeter",
    "DetectionTask",
    "RngReplay",
    "SegmentationMeter",
    "SegmentationTask",
    "TinyResNetBody",
    "batchnorm_eval",
    "build_detector",
    "build_segmenter",
    "build_task_method",
    "check_detection_targets",
    "check_masks",
    "confusion_matrix",
    "iou_from_confusion",
    "robust_evaluate",
]
