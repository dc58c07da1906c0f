"""The suite registry: a suite is one module that registers one :class:`Suite`.

A suite carries everything the evaluation needs to know about it, so that adding one is one new
file in ``advfeat/eval/suites/`` (the package imports every module of its folder)::

    @register_suite(
        "mine", "what it measures", order=55, tasks=("classification",),
        title="My measurement", report=my_section, plots={"my_plot": my_plot},
    )
    def run(ctx: EvalContext) -> dict[str, Any]: ...

* ``order`` places it in a run (and in the report) among the others;
* ``tasks`` says which models it applies to (``EvalConfig`` rejects it for the others before any
  work, and :meth:`Suite.run` refuses them too);
* ``title`` and ``report(result, task) -> lines`` make its section of the Markdown report
  (a skipped result shows its reason under the title);
* ``per_branch`` lets the ``bn`` suite run it under every BN branch; ``ready(config)`` raises
  before any work when an optional package it needs is missing;
* ``plots`` maps a file stem (``<out>_plots/<stem>.png``) to ``plot(results, path)``, which
  returns ``None`` when the results hold nothing to draw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from advfeat.errors import AdvfeatError
from advfeat.eval.config import TASK_NAMES
from advfeat.registry import Registry

if TYPE_CHECKING:
    from advfeat.eval.config import EvalConfig
    from advfeat.eval.context import EvalContext

__all__ = [
    "ALL_TASKS",
    "SUITES",
    "PlotFn",
    "ReadyFn",
    "ReportFn",
    "Suite",
    "SuiteFn",
    "register_suite",
    "skipped",
    "suite_names",
    "task_of",
]

SuiteFn = Callable[["EvalContext"], dict[str, Any]]
ReadyFn = Callable[["EvalConfig"], None]
ReportFn = Callable[[dict[str, Any], str], list[str]]
"""``(suite result, task) -> Markdown lines`` of the suite's report section."""
PlotFn = Callable[[dict[str, Any], Path], "Path | None"]
"""``(all results, png path) -> the path written, or None (nothing to draw)``."""

ALL_TASKS: tuple[str, ...] = TASK_NAMES
"""The kinds of model an evaluation knows (a suite that applies to all of them)."""


def task_of(ctx: EvalContext) -> str:
    """``classification``, or the name of the dense task of the evaluated data."""
    from advfeat.tasks import DenseTask

    task = getattr(ctx.data, "task", None)
    return task.name if isinstance(task, DenseTask) else "classification"


@dataclass(frozen=True)
class Suite:
    """A named evaluation: ``run(ctx)`` returns its JSON-ready results."""

    name: str
    description: str
    fn: SuiteFn
    order: int = 100
    tasks: tuple[str, ...] = ("classification",)
    title: str = ""
    report: ReportFn | None = None
    report_skipped: bool = True
    """Show a skipped result's reason in the report (else a skipped suite has no section)."""
    plots: Mapping[str, PlotFn] = field(default_factory=dict)
    per_branch: bool = False
    """May run again under every BN branch (the ``bn`` suite's ``bn_suites``)."""
    ready: ReadyFn | None = None
    """Raise before any work when an optional piece it needs for ``config`` is missing."""

    def applies_to(self, task: str) -> bool:
        return task in self.tasks

    def refusal(self, task: str) -> str:
        """Why this suite does not apply to ``task`` models (one line)."""
        allowed = ", ".join(suite_names(task))
        if task == "classification":
            return f"suite {self.name!r} does not apply to classification models; their suites: {allowed}"
        return (
            f"suite {self.name!r} measures class accuracy and does not apply to {task} models; "
            f"their suites: {allowed}"
        )

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        task = task_of(ctx)
        if not self.applies_to(task):
            raise AdvfeatError(self.refusal(task))
        return self.fn(ctx)


SUITES: Registry[Suite] = Registry("suite")


def register_suite(
    name: str,
    description: str,
    *,
    order: int = 100,
    tasks: tuple[str, ...] = ("classification",),
    title: str = "",
    report: ReportFn | None = None,
    report_skipped: bool = True,
    plots: Mapping[str, PlotFn] | None = None,
    per_branch: bool = False,
    ready: ReadyFn | None = None,
) -> Callable[[SuiteFn], SuiteFn]:
    """Function decorator: register ``run(ctx)`` as suite ``name`` (see the module docstring)."""
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise AdvfeatError(f"suite {name!r}: tasks must be among {ALL_TASKS}, got {tasks!r}")

    def deco(fn: SuiteFn) -> SuiteFn:
        suite = Suite(
            name, description, fn, order, tuple(tasks), title, report, report_skipped,
            dict(plots or {}), per_branch, ready,
        )  # fmt: skip
        SUITES.add(name, suite)
        return fn

    return deco


def suite_names(task: str | None = None) -> tuple[str, ...]:
    """Every registered suite (or those that apply to ``task``), in the order they run."""
    ordered = sorted((SUITES.get(n) for n in SUITES), key=lambda s: (s.order, s.name))
    return tuple(s.name for s in ordered if task is None or s.applies_to(task))


def skipped(reason: str) -> dict[str, Any]:
    """The result of a suite that does not apply (the report shows ``reason``)."""
    return {"skipped": reason}
