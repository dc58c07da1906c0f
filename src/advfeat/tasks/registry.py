"""The task registry: a task's name (a dataset's ``task``) → its :class:`~advfeat.tasks.Task`.

Each task module registers its class with :func:`register_task` (classification, detection,
segmentation); :func:`build_task` is the one place a run's task is built, by training
(:func:`advfeat.train.build.build_parts`) and by evaluation (:func:`advfeat.eval.loading.eval_data`).
Evaluation takes its task names from here too, and :func:`is_classifier_task` is the one place
that says whether a task is evaluated as a classifier (:attr:`Task.classifier`).
"""

from __future__ import annotations

from typing import TypeVar

from advfeat.registry import Registry
from advfeat.tasks.base import Task

__all__ = ["TASKS", "build_task", "is_classifier_task", "model_task", "register_task"]

TASKS: Registry[type[Task]] = Registry("task")
"""Task classes by :attr:`Task.name` (``classification``, ``detection``, ``segmentation``)."""

T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator: register a :class:`Task` subclass under its ``name``."""
    TASKS.add(cls.name, cls)
    return cls


def build_task(name: str, num_classes: int) -> Task:
    """The task ``name`` (a dataset bundle's ``task``) with its defaults, for ``num_classes``
    classes (the background included for detection and segmentation)."""
    return TASKS.get(name)(num_classes)  # type: ignore[call-arg]  # each task takes its classes


def model_task(model: str) -> str:
    """The task of model name ``model``: the registered task whose ``models`` hold it
    (detectors, segmenters), else ``classification`` (whose names include ``timm:...``)."""
    for name in TASKS:
        if model in TASKS.get(name).models:
            return name
    return "classification"


def is_classifier_task(name: str) -> bool:
    """Whether the registered task ``name`` is a classifier (:attr:`Task.classifier`: a
    :class:`~advfeat.tasks.ClassificationTask` subclass): evaluation then follows the classifier
    protocol, else the task protocol of detection and segmentation. An unknown name raises
    :class:`~advfeat.errors.AdvfeatError` listing the registered tasks."""
    return TASKS.get(name).classifier
