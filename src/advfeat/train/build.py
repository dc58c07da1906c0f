"""Build the dataset, model and method of a run from its configuration (train and eval share it).

Every run gets a :class:`~advfeat.tasks.Task` (classification, detection, segmentation), a model
(:func:`advfeat.models.build_model`, or a detector / segmenter from :mod:`advfeat.tasks.models`)
and the method built for that task (:func:`advfeat.methods.dense.build_task_method`: the methods
whose ``tasks`` include it — ``standard``, ``alfa``, ``afan`` for detection and segmentation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from advfeat.checkpoint import read_initial_weights
from advfeat.data import DatasetBundle, build_dataset
from advfeat.data.bundle import check_dataset
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.methods import Method, PrepareContext
from advfeat.methods.dense import build_task_method, task_methods
from advfeat.models import build_model
from advfeat.tasks import (
    DETECTORS,
    SEGMENTERS,
    ClassificationTask,
    DenseTask,
    DetectionTask,
    SegmentationTask,
    Task,
    build_detector,
    build_segmenter,
)
from advfeat.train.config import TrainConfig
from advfeat.train.graphs import resolve_cuda_graph, run_refusal

__all__ = [
    "RunParts",
    "build_data",
    "build_dense_parts",
    "build_parts",
    "check_config",
    "input_shape",
    "prepare_context",
]

SMALL_DETECTION_IMAGES = 256
"""Detection images up to this size are square generated ones: the detector keeps their size and
scales its anchors to it; larger sizes are the shorter side torchvision resizes real photos to."""


@dataclass
class RunParts:
    data: DatasetBundle
    model: nn.Module
    method: Method
    task: DenseTask | None = None
    """The detection / segmentation task (``None`` for classification); every method carries
    its task as ``method.task``."""


_RUN_KEYS = {
    "root": "data_dir",
    "seed": "seed",
    "val_fraction": "val_fraction",
    "augment": "augment",
}
"""Dataset arguments that the run's own config keys give (argument → config key)."""


def build_data(cfg: TrainConfig, **extra: Any) -> DatasetBundle:
    return build_dataset(cfg.dataset, cfg.data_dir, **_dataset_arguments(cfg, extra))


def _dataset_arguments(cfg: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the run's dataset: its seed, validation split, augmentation and
    ``dataset_options`` (refused where an option repeats one of the run's own keys)."""
    options = {**cfg.dataset_options, **extra}
    for argument, key in _RUN_KEYS.items():
        if argument in options:
            raise AdvfeatError(
                f"dataset_options.{argument} repeats the config key {key!r}: set {key} instead "
                f"(e.g. --set {key}=...)"
            )
    return dict(seed=cfg.seed, val_fraction=cfg.val_fraction, augment=cfg.augment, **options)


def check_config(cfg: TrainConfig, *, check_device: bool = True) -> None:
    """Check everything a run checks when it starts, without reading data or training: the
    values, the device (unless ``check_device`` is false), the dataset's name and options (and,
    for real data, where its files are), the model's and the method's names and options.

    ``advfeat train`` checks its run and ``advfeat compare`` every run of every arm this way
    before the first one starts.
    """
    from advfeat.train.trainer import resolve_device  # the trainer imports this module

    cfg.validate()
    device = resolve_device(cfg.device) if check_device else None
    check_dataset(cfg.dataset, cfg.data_dir, **_dataset_arguments(cfg, {}))
    dense = cfg.model in DETECTORS or cfg.model in SEGMENTERS
    task: Task = ClassificationTask()
    if dense:
        task = DetectionTask(2) if cfg.model in DETECTORS else SegmentationTask(2)
    method = build_task_method(cfg.method, task, **cfg.method_options)
    if device is not None and cfg.cuda_graph == "true":
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        refusal = run_refusal(cfg, device, method.capture_refusal(), distributed=distributed)
        resolve_cuda_graph(cfg.cuda_graph, refusal)
    if not dense:
        build_model(cfg.model, num_classes=10, **cfg.model_options)


def build_parts(cfg: TrainConfig, data: DatasetBundle | None = None) -> RunParts:
    """Dataset, model (already prepared by the method), method and, for dense data, task."""
    cfg.validate()
    data = data if data is not None else build_data(cfg)
    if data.task != "classification":
        return build_dense_parts(cfg, data)
    task = ClassificationTask(data.num_classes)
    method = build_task_method(cfg.method, task, **cfg.method_options)
    model = build_model(
        cfg.model,
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        image_size=data.image_size,
        **cfg.model_options,
    )
    model = method.prepare_with(model, prepare_context(method, data))
    return RunParts(data=data, model=model, method=method)


def prepare_context(method: Method, data: DatasetBundle) -> PrepareContext:
    """What the trainer hands :meth:`Method.prepare_with`: the shape of one training image and
    the weights of the method's initial checkpoint (read here, not by the method)."""
    path = method.initial_checkpoint()
    initial = read_initial_weights(path, method=method.name) if path else None
    return PrepareContext(input_shape=input_shape(data), initial=initial)


def input_shape(data: DatasetBundle) -> tuple[int, ...]:
    """``(C, H, W)`` of the data's images: its first training image, else (a bundle that only
    describes the data) its channel count and image size."""
    train: Any = data.train
    if len(train) > 0:
        return tuple(train[0][0].shape)
    return (len(data.mean), data.image_size, data.image_size)


def build_dense_parts(cfg: TrainConfig, data: DatasetBundle) -> RunParts:
    """Task, detector / segmenter and dense method for a detection or segmentation dataset."""
    if cfg.method not in task_methods(data.task):
        raise AdvfeatError(
            f"method {cfg.method!r} has no {data.task} version; {data.task} datasets "
            f"({cfg.dataset!r}) train with: {', '.join(task_methods(data.task))}"
        )
    task: DenseTask | None = None
    """The detection / segmentation task (``None`` for classification); every method carries
    its task as ``method.task``."""
    model: nn.Module
    if data.task == "detection":
        if cfg.model not in DETECTORS:
            raise unknown_name("detection model", cfg.model, DETECTORS)
        task = DetectionTask(data.num_classes)
        size_key = "image_size" if data.image_size <= SMALL_DETECTION_IMAGES else "min_size"
        options = {size_key: data.image_size, **cfg.model_options}
        model = build_detector(cfg.model, data.num_classes, mean=data.mean, std=data.std, **options)
    else:
        if cfg.model not in SEGMENTERS:
            raise unknown_name("segmentation model", cfg.model, SEGMENTERS)
        task = SegmentationTask(data.num_classes)
        model = build_segmenter(
            cfg.model, data.num_classes, mean=data.mean, std=data.std, **cfg.model_options
        )
    method = build_task_method(cfg.method, task, **cfg.method_options)
    return RunParts(data=data, model=method.prepare(model), method=method, task=task)
