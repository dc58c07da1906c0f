"""The model registry: ``@register_model`` on a factory ``fn(num_classes=..., **options)``.

Every module of :mod:`advfeat.models` is imported by the package, so a new model family is one
new file whose factories carry the decorator (the name is the function's name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from advfeat.registry import Registry

__all__ = ["MODELS", "ModelFactory", "register_model"]

ModelFactory = Callable[..., nn.Module]
"""``factory(num_classes, *, mean, std, **options) -> nn.Module`` (a ``normalize`` child is added
by :func:`advfeat.models.build_model` when the factory does not create one)."""

MODELS: Registry[ModelFactory] = Registry("model")

F = TypeVar("F", bound=ModelFactory)


def register_model(factory: F) -> F:
    """Function decorator: register ``factory`` under its function name."""
    MODELS.add(factory.__name__, factory)
    return factory
