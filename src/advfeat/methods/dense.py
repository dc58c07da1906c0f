"""The methods that train detectors and segmenters: ``build_task_method(name, task)``.

A method trains a task when the task's name is in its :attr:`~advfeat.methods.Method.tasks`
(``standard``, ``alfa`` and ``afan`` train detection and segmentation): the same classes as for
classification, built with ``task=``.
"""

from __future__ import annotations

from typing import Any

from advfeat.errors import AdvfeatError
from advfeat.methods.base import Method
from advfeat.methods.registry import METHODS
from advfeat.tasks.base import Task

__all__ = ["build_task_method", "task_methods"]


def task_methods(task_name: str) -> list[str]:
    """The names of the methods that train ``task_name``."""
    return [name for name in METHODS.names() if task_name in METHODS.get(name).tasks]


def build_task_method(name: str, task: Task, **options: Any) -> Method:
    """Method ``name`` for ``task`` with validated ``options`` over the task's defaults.

    An unknown name lists the close matches; a method that does not train the task names the
    ones that do."""
    cls = METHODS.get(name)
    if task.name not in cls.tasks:
        raise AdvfeatError(
            f"method {name!r} has no {task.name} version; {task.name} trains with: "
            f"{', '.join(task_methods(task.name))}"
        )
    return cls(task=task, **options)
