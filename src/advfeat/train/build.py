"""Build the dataset, task, model and method of a run from its configuration (train and eval
share it).

Every run gets the :class:`~advfeat.tasks.Task` its dataset names
(:func:`advfeat.tasks.build_task`: classification, detection, segmentation), the task's model
(:meth:`Task.build_model`: :func:`advfeat.models.build_model`, a detector or a segmenter) and the
method built for that task (:func:`advfeat.methods.registry.build_task_method`: the methods whose
``tasks`` include it — ``standard``, ``alfa``, ``afan`` for detection and segmentation), which
prepares the model (:meth:`Method.prepare_with`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from advfeat.checkpoint import read_initial_weights
from advfeat.data import DatasetBundle, build_dataset
from advfeat.data.bundle import check_dataset
from advfeat.errors import AdvfeatError
from advfeat.methods import Method, PrepareContext
from advfeat.methods.registry import build_task_method
from advfeat.models import build_model
from advfeat.tasks import DenseTask, Task, build_task, model_task
from advfeat.train.config import TrainConfig
from advfeat.train.graphs import resolve_cuda_graph, run_refusal
from advfeat.train.runtime import resolve_device

__all__ = [
    "RunParts",
    "build_data",
    "build_parts",
    "check_config",
    "input_shape",
    "prepare_context",
]


@dataclass
class RunParts:
    data: DatasetBundle
    model: nn.Module
    method: Method
    task: Task
    """The run's task (classification, detection, segmentation), also ``method.task``."""


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
    for real data, where its files are), the model's and the method's names and options, and what
    the method needs to start (:meth:`Method.check_run`).

    ``advfeat train`` checks its run and ``advfeat compare`` every run of every arm this way
    before the first one starts.
    """
    cfg.validate()
    device = resolve_device(cfg.device) if check_device else None
    check_dataset(cfg.dataset, cfg.data_dir, **_dataset_arguments(cfg, {}))
    task = build_task(model_task(cfg.model), 2)  # the data's classes are not read here
    method = build_task_method(cfg.method, task, **cfg.method_options)
    method.check_run()
    if device is not None and cfg.cuda_graph == "true":
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        refusal = run_refusal(cfg, device, method.capture_refusal(), distributed=distributed)
        resolve_cuda_graph(cfg.cuda_graph, refusal)
    if not isinstance(task, DenseTask):  # a classifier's options are checked by building it
        build_model(cfg.model, num_classes=10, **cfg.model_options)


def build_parts(cfg: TrainConfig, data: DatasetBundle | None = None) -> RunParts:
    """Dataset, task, method, and the task's model prepared by the method."""
    cfg.validate()
    data = data if data is not None else build_data(cfg)
    task = build_task(data.task, data.num_classes)
    method = build_task_method(cfg.method, task, **cfg.method_options)
    model = task.build_model(cfg.model, data, **cfg.model_options)
    model = method.prepare_with(model, prepare_context(method, data))
    return RunParts(data=data, model=model, method=method, task=task)


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
