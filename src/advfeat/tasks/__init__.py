"""Tasks: classification, detection and segmentation — losses, metrics, models, robust evaluation.

Each task registers itself in :data:`TASKS`; :func:`build_task` builds a run's task from the
name its dataset gives (``bundle.task``).

>>> from advfeat.methods import build_method
>>> from advfeat.tasks import DetectionTask, build_detector
>>> task = DetectionTask(num_classes=9)
>>> model = build_detector("fasterrcnn_tiny", 9, image_size=64)
>>> method = build_method("afan", task=task)          # A-FAN §5 defaults
>>> # out = method(model.train(), images, targets); out.loss.backward()
"""

from advfeat.tasks.base import DenseTask, RngReplay, Task, TaskPass, batchnorm_eval
from advfeat.tasks.classification import ClassificationTask
from advfeat.tasks.deeplab_plus import DeepLabV3Plus, TinyResNetBody
from advfeat.tasks.detection import DetectionTask, check_detection_targets
from advfeat.tasks.metrics import (
    DetectionMeter,
    SegmentationMeter,
    confusion_matrix,
    iou_from_confusion,
)
from advfeat.tasks.models import DETECTORS, SEGMENTERS, build_detector, build_segmenter
from advfeat.tasks.registry import TASKS, build_task, is_classifier_task, model_task, register_task
from advfeat.tasks.robust import DETECTION_PGD, SEGMENTATION_PGD, DensePGD, robust_evaluate
from advfeat.tasks.segmentation import SegmentationTask, check_masks

__all__ = [
    "DETECTION_PGD",
    "DETECTORS",
    "SEGMENTATION_PGD",
    "SEGMENTERS",
    "TASKS",
    "ClassificationTask",
    "DeepLabV3Plus",
    "DensePGD",
    "DenseTask",
    "DetectionMeter",
    "DetectionTask",
    "RngReplay",
    "SegmentationMeter",
    "SegmentationTask",
    "Task",
    "TaskPass",
    "TinyResNetBody",
    "batchnorm_eval",
    "build_detector",
    "build_segmenter",
    "build_task",
    "check_detection_targets",
    "check_masks",
    "confusion_matrix",
    "iou_from_confusion",
    "is_classifier_task",
    "model_task",
    "register_task",
    "robust_evaluate",
]
