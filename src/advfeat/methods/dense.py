"""The methods that train detectors and segmenters: ``build_task_method(name, task)``.

A method trains a task when the task's name is in its :attr:`~advfeat.methods.Method.tasks`
(``standard``, ``alfa`` and ``afan`` train detection and segmentation): the same classes as for
classification, built with ``task=``.
"""

from __future__ import annotations

from typing import Any

from advfeat.errors import unknown_name
from advfeat.methods.base import Method
from advfeat.methods.registry import METHODS
from advfeat.tasks.base import Task

__all__ = ["build_task_method", "task_methods"]


def task_methods(task_name: str) -> list[str]:
    """The names of the methods that train ``task_name``."""
    return [name for name in METHODS.names() if task_name in METHODS.get(name).tasks]


def build_task_method(name: str, task: Task, **options: Any) -> Method:
    """Method ``name`` for ``task`` with validated ``options`` over the task's defaults."""
    if name not in task_methods(task.name):
        raise unknown_name(f"{task.name} method", name, task_methods(task.name))
    return METHODS.get(name)(task=task, **options)
