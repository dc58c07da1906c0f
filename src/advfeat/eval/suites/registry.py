"""The suite registry: ``SUITES.get(name)`` (unknown names list close matches)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from advfeat.eval.context import EvalContext
from advfeat.registry import Registry

__all__ = ["SUITES", "Suite", "SuiteFn", "register_suite", "skipped"]

SuiteFn = Callable[[EvalContext], dict[str, Any]]


@dataclass(frozen=True)
class Suite:
    """A named evaluation: ``run(ctx)`` returns its JSON-ready results."""

    name: str
    description: str
    run: SuiteFn


SUITES: Registry[Suite] = Registry("suite")


def register_suite(name: str, description: str) -> Callable[[SuiteFn], SuiteFn]:
    """Function decorator: register ``run(ctx)`` as suite ``name``."""

    def deco(fn: SuiteFn) -> SuiteFn:
        SUITES.add(name, Suite(name, description, fn))
        return fn

    return deco


def skipped(reason: str) -> dict[str, Any]:
    """The result of a suite that does not apply (the report shows ``reason``)."""
    return {"skipped": reason}
