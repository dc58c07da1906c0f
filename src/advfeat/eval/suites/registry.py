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
  work, and :meth:`Suite.run` refuses them too): registered task names, where
  ``"classification"`` stands for every classifier task (:func:`advfeat.tasks.is_classifier_task`:
  a :class:`~advfeat.tasks.ClassificationTask` subclass of one's own too; a task of one's own
  is registered before a suite that names it); ``None`` is every task, those registered later
  included (``clean``, ``attacks``, ``shift``);
* ``title`` and ``report(result, task) -> lines`` make its section of the Markdown report
  (a skipped result shows its reason under the title);
* ``per_branch`` lets the ``bn`` suite run it under every BN branch; ``ready(config)`` returns
  one line per optional package it needs for ``config`` that is missing (the runner stops on
  them before any work; :func:`advfeat.eval.preflight.missing_packages` gathers them);
* ``options`` is the suite's own settings, a dataclass whose fields are declared with
  :func:`advfeat.options.option` (checked generically, like a method's ``Options``; a
  ``validate(self, task)`` method adds the rules that tie two of them together, or to the
  task, and a ``defaults(task)`` classmethod the defaults that differ by task); they are set with
  ``--set NAME.KEY=VALUE``, the keyword ``NAME={"KEY": VALUE}`` (a config section) or a flat
  alias the suite lists in ``aliases`` (``hessian_iters``), written into the results and
  covered by ``--resume``'s fingerprint; the suite reads them with :func:`options_of`;
* ``plots`` maps a file stem (``<out>_plots/<stem>.png``) to ``plot(results, path)``, which
  returns ``None`` when the results hold nothing to draw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.eval.plots import PlotFn
from advfeat.eval.report import ReportFn
from advfeat.options import check_options
from advfeat.registry import Registry
from advfeat.tasks.registry import TASKS, is_classifier_task

if TYPE_CHECKING:
    from advfeat.eval.config import EvalConfig
    from advfeat.eval.context import EvalContext

__all__ = [
    "SUITES",
    "PlotFn",
    "ReadyFn",
    "ReportFn",
    "Suite",
    "SuiteFn",
    "chosen_suites",
    "options_of",
    "ordered_suites",
    "register_suite",
    "skipped",
    "split_options",
    "suite_names",
    "suite_options",
]

SuiteFn = Callable[["EvalContext"], dict[str, Any]]
ReadyFn = Callable[["EvalConfig"], list[str]]
"""``config -> one line per missing optional package`` (empty: ready)."""


@dataclass(frozen=True)
class Suite:
    """A named evaluation: ``run(ctx)`` returns its JSON-ready results."""

    name: str
    description: str
    fn: SuiteFn
    order: int = 100
    tasks: tuple[str, ...] | None = ("classification",)
    """The tasks it applies to: names (``"classification"``: every classifier task), or ``None``:
    every registered task, resolved when a suite is chosen (a task registered later too)."""
    title: str = ""
    report: ReportFn | None = None
    report_skipped: bool = True
    """Show a skipped result's reason in the report (else a skipped suite has no section)."""
    plots: Mapping[str, PlotFn] = field(default_factory=dict)
    per_branch: bool = False
    """May run again under every BN branch (the ``bn`` suite's ``bn_suites``)."""
    ready: ReadyFn | None = None
    """One line per optional package it needs for ``config`` that is missing (none: ready)."""
    options: type[Any] | None = None
    """Its settings (a dataclass declared with :func:`advfeat.options.option`), or None."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Flat keyword -> option name (``hessian_iters`` -> ``iters``): older spellings kept."""

    def applies_to(self, task: str) -> bool:
        """Whether it applies to the registered task ``task`` (an unknown name raises)."""
        classifier = is_classifier_task(task)
        if self.tasks is None or task in self.tasks:
            return True
        return classifier and "classification" in self.tasks

    def refusal(self, task: str) -> str:
        """Why this suite does not apply to ``task`` models (one line)."""
        allowed = ", ".join(suite_names(task))
        if is_classifier_task(task):
            return f"suite {self.name!r} does not apply to {task} models; their suites: {allowed}"
        return (
            f"suite {self.name!r} measures class accuracy and does not apply to {task} models; "
            f"their suites: {allowed}"
        )

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        task = ctx.data.task_name
        if not self.applies_to(task):
            raise AdvfeatError(self.refusal(task))
        return self.fn(ctx)


SUITES: Registry[Suite] = Registry("suite")


def register_suite(
    name: str,
    description: str,
    *,
    order: int = 100,
    tasks: tuple[str, ...] | None = ("classification",),
    title: str = "",
    report: ReportFn | None = None,
    report_skipped: bool = True,
    plots: Mapping[str, PlotFn] | None = None,
    per_branch: bool = False,
    ready: ReadyFn | None = None,
    options: type[Any] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> Callable[[SuiteFn], SuiteFn]:
    """Function decorator: register ``run(ctx)`` as suite ``name`` (see the module docstring)."""
    if tasks is not None and (not tasks or any(t not in TASKS for t in tasks)):
        raise AdvfeatError(
            f"suite {name!r}: tasks must be registered task names ({', '.join(TASKS)}) or None "
            f"for every task, got {tasks!r}"
        )

    applies = None if tasks is None else tuple(tasks)

    def deco(fn: SuiteFn) -> SuiteFn:
        suite = Suite(
            name, description, fn, order, applies, title, report, report_skipped,
            dict(plots or {}), per_branch, ready, options, dict(aliases or {}),
        )  # fmt: skip
        SUITES.add(name, suite)
        return fn

    return deco


def ordered_suites(task: str | None = None) -> tuple[Suite, ...]:
    """Every registered suite (or those that apply to ``task``), in the order they run."""
    ordered = sorted((SUITES.get(n) for n in SUITES), key=lambda s: (s.order, s.name))
    return tuple(s for s in ordered if task is None or s.applies_to(task))


def suite_names(task: str | None = None) -> tuple[str, ...]:
    """The names of :func:`ordered_suites`."""
    return tuple(s.name for s in ordered_suites(task))


def chosen_suites(names: Iterable[str] | str, task: str) -> tuple[str, ...]:
    """The one check of a choice of suites: ``names`` (a list, or ``"clean,attacks"``; ``all`` is
    every suite that applies to ``task``) in run order; an unknown name lists close matches, and
    a suite that does not apply to ``task`` models is refused."""
    chosen = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
    chosen = [s for s in chosen if s]
    if "all" in chosen:
        return suite_names(task)
    every = suite_names()
    for name in chosen:
        if not isinstance(name, str) or name not in every:
            raise unknown_name("suite", str(name), every)
    if not chosen:
        raise AdvfeatError(f"choose at least one suite ({', '.join(every)})")
    wrong = [n for n in chosen if not SUITES.get(n).applies_to(task)]
    if wrong and is_classifier_task(task):
        raise AdvfeatError(SUITES.get(wrong[0]).refusal(task))
    if wrong:
        raise AdvfeatError(
            f"suite {', '.join(map(repr, wrong))} does not apply to {task} models (they report "
            f"AP / mIoU, not class accuracy); {task} suites: {', '.join(suite_names(task))}"
        )
    return tuple(n for n in every if n in chosen)


def split_options(
    options: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Keyword options -> ``(shared, {suite: {key: value}})``: ``NAME.KEY`` keys, ``NAME``
    sections (a mapping) and each suite's flat ``aliases`` go to the suite; the rest are the
    :class:`~advfeat.eval.config.EvalConfig` options every suite shares."""
    with_options = {s.name: s for s in ordered_suites() if s.options is not None}
    alias = {flat: (s.name, key) for s in with_options.values() for flat, key in s.aliases.items()}
    shared: dict[str, Any] = {}
    per_suite: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        head, dot, rest = key.partition(".")
        if dot:
            if head not in with_options:
                raise unknown_name("suite with options", head, tuple(with_options))
            per_suite.setdefault(head, {})[rest] = value
        elif key in with_options and isinstance(value, Mapping):
            per_suite.setdefault(key, {}).update(value)
        elif key in alias:
            name, option = alias[key]
            per_suite.setdefault(name, {})[option] = value
        else:
            shared[key] = value
    return shared, per_suite


def _build(suite: Suite, given: Any, task: str) -> Any:
    assert suite.options is not None
    if isinstance(given, suite.options):
        opts = dataclasses.replace(given)
    elif isinstance(given, Mapping):
        known = tuple(f.name for f in dataclasses.fields(suite.options))
        for key in given:
            if key not in known:
                raise unknown_name(f"{suite.name} option", str(key), known)
        defaults = getattr(suite.options, "defaults", None)
        opts = suite.options(**{**(defaults(task) if callable(defaults) else {}), **given})
    else:
        raise AdvfeatError(
            f"the options of suite {suite.name!r} are KEY: VALUE pairs "
            f"(--set {suite.name}.KEY=VALUE), got {given!r}"
        )
    check_options(suite.name, opts, write=True)
    validate = getattr(opts, "validate", None)
    if callable(validate):
        validate(task)
    return opts


def suite_options(given: Mapping[str, Any], task: str = "classification") -> dict[str, Any]:
    """Every registered suite's options (``{suite: Options}``) for ``task`` models, from
    ``given`` (``{suite: {key: value} or Options}``; the rest take their defaults), each
    checked generically."""
    with_options = {s.name: s for s in ordered_suites() if s.options is not None}
    for name in given:
        if name not in with_options:
            raise unknown_name("suite with options", str(name), tuple(with_options))
    return {name: _build(s, given.get(name, {}), task) for name, s in with_options.items()}


def options_of(config: EvalConfig, name: str) -> Any:
    """The options of suite ``name`` in ``config`` (checked; defaults when not given)."""
    return _build(SUITES.get(name), config.suite_options.get(name, {}), config.task)


def skipped(reason: str) -> dict[str, Any]:
    """The result of a suite that does not apply (the report shows ``reason``)."""
    return {"skipped": reason}
