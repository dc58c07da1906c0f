"""What an evaluation does: the suites, their budgets and settings, validated once.

Every number that changes a result lives in :class:`EvalConfig`, is written into the result JSON,
and (through :meth:`EvalConfig.fingerprint`) decides whether saved partial results may be reused
by ``--resume``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from advfeat.data.corruptions_released import BENCHMARK_CORRUPTIONS
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.options import Integer, Number, check_options, option
from advfeat.tasks.registry import TASKS, is_classifier_task

__all__ = [
    "ATTACK_NAMES",
    "CORRUPTION_NAMES",
    "DEFAULT_SUITES",
    "DENSE_ATTACK_NAMES",
    "EvalConfig",
    "check_eps",
    "check_task",
    "names_of",
]

DEFAULT_SUITES: tuple[str, ...] = ("clean", "attacks")

DENSE_ATTACK_NAMES: tuple[str, ...] = ("pgd",)
"""Detection and segmentation are attacked with image-space PGD on the task loss (A-FAN §5-6)."""

DENSE_BATCH_SIZE = 8
"""Default evaluation batch size of detection, segmentation and every other task that is not a
classifier (whole images, large models)."""

ATTACK_NAMES: tuple[str, ...] = (
    "pgd",
    "fgsm",
    "cw",
    "curve",
    "transfer",
    "autoattack",
    "autoattack-fast",
    "adaptive",
)
"""Attacks of the ``attacks`` suite; ``transfer`` needs a surrogate, ``adaptive`` an AFA model;
``autoattack-fast`` is a cheaper variant, never the standard AutoAttack."""

CORRUPTION_NAMES: tuple[str, ...] = BENCHMARK_CORRUPTIONS
"""The 15 corruption types of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich 2019)."""

ADAPTIVE_WEIGHTS: tuple[tuple[float, float], ...] = (
    (10, 1),
    (5, 1),
    (2, 1),
    (1, 1),
    (1, 2),
    (1, 5),
    (1, 10),
)
"""AFA §5.2: the seven CE:BCE loss weights of the adaptive attack."""


EPS = Number(low=0, high=1, hint="images are in [0, 1]; 8/255 ≈ 0.0314")
"""An L∞ budget on [0, 1] images."""
POSITIVE = Number(low=0, low_open=True)


def check_eps(value: Any, name: str = "eps") -> float:
    """An L∞ budget on [0, 1] images: a finite number in [0, 1]."""
    return float(EPS("", name, value))


def check_task(task: Any) -> str:
    """``task`` when a task is registered under that name (:data:`advfeat.tasks.TASKS`: the
    built-in ones and any registered with :func:`~advfeat.tasks.register_task`), else one line
    naming close matches and the registered tasks."""
    if not isinstance(task, str) or task not in TASKS:
        known = unknown_name("evaluation task", str(task), TASKS.names())
        raise AdvfeatError(f"{known}; a task of one's own is registered with register_task")
    return task


def names_of(values: Any, kind: str, known: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """A list of names (or ``"a,b"``) without repeats; each among ``known`` when given."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    if not isinstance(values, (list, tuple)):
        raise AdvfeatError(f"{kind}s must be a list of names, got {values!r}")
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or (known is not None and v not in known):
            raise unknown_name(kind, str(v), known or ())
        if v not in out:
            out.append(v)
    return tuple(out)


@dataclass
class EvalConfig:
    """Settings of one evaluation (defaults: the papers' CIFAR protocol).

    Only what every suite shares; each suite's own settings are in ``suite_options``.
    """

    suites: tuple[str, ...] = DEFAULT_SUITES
    """The suites to run, in run order (chosen and checked once, by
    :func:`advfeat.eval.suites.chosen_suites`, which the runner calls)."""
    task: str = "classification"
    """A registered task's name (``classification``, ``detection``, ``segmentation`` or one's
    own): which suites and attacks apply (:func:`advfeat.tasks.is_classifier_task`)."""
    batch_size: int = option(256, Integer(low=1))
    max_images: int | None = option(None, Integer(low=1, optional=True))
    """Evaluate a seeded random subset of this many test images (``None``: all)."""
    seed: int = option(0, Integer())
    suite_options: dict[str, Any] = field(default_factory=dict)
    """Each suite's own settings, ``{suite: its Options}`` (declared by the suite, checked and
    completed with defaults by :func:`advfeat.eval.suites.suite_options`, which the runner
    calls); written into the results and part of the fingerprint."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded with the results (e.g. the surrogate's path)."""

    def validate(self) -> EvalConfig:
        """Check every value; raise :class:`AdvfeatError` naming the bad one. Returns ``self``."""
        check_task(self.task)
        self.suites = names_of(self.suites, "suite")
        check_options("", self, write=True)  # every field declared with option(...)
        return self

    @classmethod
    def for_task(cls, task: str, **options: Any) -> EvalConfig:
        """A validated config for ``task`` whose unset options take the task's protocol.

        A classifier (:func:`advfeat.tasks.is_classifier_task`) keeps the field defaults (CIFAR
        protocol); every other task (detection, segmentation, one's own) defaults to batch size
        :data:`DENSE_BATCH_SIZE` (their attacks follow A-FAN's PGD-10,
        :meth:`advfeat.eval.suites.attacks.AttackOptions.defaults`). Options given here win.
        """
        check_task(task)
        given = options.pop("task", task)
        if given != task:
            raise AdvfeatError(f"this is a {task} model; task={given!r} does not fit it")
        if not is_classifier_task(task):
            options = {"batch_size": DENSE_BATCH_SIZE, **options}
        return cls.from_options(task=task, **options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_options(cls, **options: Any) -> EvalConfig:
        """Build from keyword options; unknown keys list close matches."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise unknown_name("evaluation option", key, known)
        return cls(**options).validate()

    def replace(self, **changes: Any) -> EvalConfig:
        return dataclasses.replace(self, **changes).validate()

    def fingerprint(self) -> str:
        """A short hash of everything that changes results (for ``--resume``)."""
        values = self.to_dict()
        values.pop("suites")
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
