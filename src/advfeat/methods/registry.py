"""The method registry: ``build_method(name, **options)``, and ``build_task_method(name, task)``
for a task's method (classification, detection, segmentation).

A method trains a task when the task's name is in its :attr:`~advfeat.methods.Method.tasks`
(``standard``, ``alfa`` and ``afan`` train detection and segmentation): the same classes for
every task, built with ``task=``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from advfeat.errors import AdvfeatError
from advfeat.methods.base import Method
from advfeat.registry import Registry
from advfeat.tasks.base import Task

__all__ = ["METHODS", "build_method", "build_task_method", "register_method", "task_methods"]

METHODS: Registry[type[Method]] = Registry("method")

M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: register a :class:`Method` subclass under its ``name``."""
    METHODS.add(cls.name, cls)
    return cls


def build_method(name: str, **options: Any) -> Method:
    """Instantiate method ``name`` with ``options`` over its paper defaults (validated)."""
    return METHODS.get(name)(**options)


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
