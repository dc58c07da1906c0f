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
from advfeat.options import Choice, Each, Integer, Number, check_options, option

__all__ = [
    "ATTACK_NAMES",
    "CORRUPTION_NAMES",
    "DEFAULT_SUITES",
    "DENSE_ATTACK_NAMES",
    "TASK_NAMES",
    "EvalConfig",
    "check_eps",
    "names_of",
]

DEFAULT_SUITES: tuple[str, ...] = ("clean", "attacks")

TASK_NAMES: tuple[str, ...] = ("classification", "detection", "segmentation")
"""The kinds of model an evaluation knows (``EvalConfig.task``)."""

DENSE_ATTACK_NAMES: tuple[str, ...] = ("pgd",)
"""Detection and segmentation are attacked with image-space PGD on the task loss (A-FAN §5-6)."""

DENSE_BATCH_SIZE = 8
"""Default evaluation batch size of detection and segmentation (whole images, large models)."""

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

    Budgets are on images in [0, 1]: ``eps=8/255`` is the usual 8 pixel levels.
    """

    suites: tuple[str, ...] = DEFAULT_SUITES
    """The suites to run, in run order (chosen and checked once, by
    :func:`advfeat.eval.suites.chosen_suites`, which the runner calls)."""
    task: str = "classification"
    """``classification``, ``detection`` or ``segmentation``: which suites and attacks apply."""
    batch_size: int = option(256, Integer(low=1))
    max_images: int | None = option(None, Integer(low=1, optional=True))
    """Evaluate a seeded random subset of this many test images (``None``: all)."""
    seed: int = option(0, Integer())
    # attacks (AFA Tab. 1 and 3; Madry et al.)
    attacks: tuple[str, ...] = ("pgd", "fgsm", "cw", "curve")
    eps: float = option(8 / 255, EPS)
    pgd_steps: int = option(20, Integer(low=1))
    pgd_alpha: float = option(2 / 255, EPS)
    eps_curve: tuple[float, ...] = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
    curve_alpha_ratio: float = option(0.25, POSITIVE)
    """Step size of the ε-curve's PGD as a fraction of ε (0.25: 2/255 at ε = 8/255)."""
    cw_steps: int = option(100, Integer(low=1))
    cw_c: float = option(1.0, POSITIVE)
    cw_lr: float = option(0.01, POSITIVE)
    cw_search_steps: int = option(1, Integer(low=1))
    """Rounds of Carlini & Wagner's binary search over c (1: the fixed ``cw_c``, no search)."""
    cw_l2_budgets: tuple[float, ...] = option((0.25, 0.5, 1.0), Each(POSITIVE, min_len=1))
    """L2 budgets at which the C&W suite reports accuracy (samples not fooled within the budget)."""
    autoattack_version: str = option("standard", Choice("standard", "plus", "rand"))
    adaptive_weights: tuple[tuple[float, float], ...] = ADAPTIVE_WEIGHTS
    adaptive_bce_target: float = 0.0
    suite_options: dict[str, Any] = field(default_factory=dict)
    """Each suite's own settings, ``{suite: its Options}`` (declared by the suite, checked and
    completed with defaults by :func:`advfeat.eval.suites.suite_options`, which the runner
    calls); written into the results and part of the fingerprint."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded with the results (e.g. the surrogate's path)."""

    def validate(self) -> EvalConfig:
        """Check every value; raise :class:`AdvfeatError` naming the bad one. Returns ``self``."""
        if self.task not in TASK_NAMES:
            raise unknown_name("evaluation task", str(self.task), TASK_NAMES)
        self.suites = names_of(self.suites, "suite")
        self.attacks = names_of(self.attacks, "attack", ATTACK_NAMES)
        if self.task != "classification":
            self._check_dense()
        check_options("", self, write=True)  # every field declared with option(...)
        curve = tuple(check_eps(e, "ε-curve value") for e in self.eps_curve)
        if not curve:
            raise AdvfeatError("eps_curve needs at least one value, e.g. 0,1,2,4,8 (/255)")
        self.eps_curve = tuple(sorted(set(curve)))
        self.cw_l2_budgets = tuple(sorted(set(self.cw_l2_budgets)))
        self.adaptive_weights = tuple(
            (POSITIVE("", "CE weight", a), POSITIVE("", "BCE weight", b))
            for a, b in self.adaptive_weights
        )
        if float(self.adaptive_bce_target) not in (0.0, 1.0):
            raise AdvfeatError(
                f"adaptive_bce_target is the W_0 label of the BCE term, 0 or 1, got "
                f"{self.adaptive_bce_target!r}"
            )
        return self

    def _check_dense(self) -> None:
        """Detection / segmentation: only the attacks that measure AP or mIoU (the suites are
        checked by :func:`advfeat.eval.suites.chosen_suites`)."""
        wrong = [n for n in self.attacks if n not in DENSE_ATTACK_NAMES]
        if wrong:
            raise AdvfeatError(
                f"attack {', '.join(map(repr, wrong))} does not apply to {self.task} models "
                f"(they report AP / mIoU, not class accuracy); {self.task} attacks: "
                f"{', '.join(DENSE_ATTACK_NAMES)}"
            )

    @classmethod
    def for_task(cls, task: str, **options: Any) -> EvalConfig:
        """A validated config for ``task`` whose unset options take the task's protocol.

        Classification keeps the field defaults (CIFAR protocol). Detection and segmentation
        default to A-FAN's robustness protocol (§5-6): PGD-10 with ε = 2/255, α = 0.3/255
        (detection) or ε = 8/255, α = 1/255 (segmentation), no random start; only the ``pgd``
        attack; batch size :data:`DENSE_BATCH_SIZE`. Options given here win (``eps=4/255``).
        """
        if task not in TASK_NAMES:
            raise unknown_name("evaluation task", str(task), TASK_NAMES)
        given = options.pop("task", task)
        if given != task:
            raise AdvfeatError(f"this is a {task} model; task={given!r} does not fit it")
        if task != "classification":
            from advfeat.tasks.robust import DETECTION_PGD, SEGMENTATION_PGD

            pgd = DETECTION_PGD if task == "detection" else SEGMENTATION_PGD
            defaults: dict[str, Any] = {
                "eps": pgd["eps"],
                "pgd_alpha": pgd["alpha"],
                "pgd_steps": pgd["steps"],
                "attacks": DENSE_ATTACK_NAMES,
                "batch_size": DENSE_BATCH_SIZE,
            }
            options = {**defaults, **options}
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
