"""The method registry: ``build_method(name, **options)``."""

from __future__ import annotations

from typing import Any, TypeVar

from advfeat.methods.base import Method
from advfeat.registry import Registry

__all__ = ["METHODS", "build_method", "register_method"]

METHODS: Registry[type[Method]] = Registry("method")

M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: register a :class:`Method` subclass under its ``name``."""
    METHODS.add(cls.name, cls)
    return cls


def build_method(name: str, **options: Any) -> Method:
    """Instantiate method ``name`` with ``options`` over its paper defaults (validated)."""
    return METHODS.get(name)(**options)
