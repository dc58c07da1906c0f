"""Options declared once, with their constraints, and validated generically.

An options dataclass (a method's ``Options``, :class:`~advfeat.eval.EvalConfig`,
:class:`~advfeat.train.TrainConfig`) declares each constrained field with :func:`option`; one call
of :func:`check_options` then validates every field and raises :class:`AdvfeatError` with one
line naming the owner, the option, what is accepted and what was given::

    @dataclass
    class Options:
        eps: float = option(8 / 255, Number(low=0, high=1, low_open=True, hint="8/255 ≈ 0.0314"))
        steps: int = option(10, Integer(low=1))
        random_start: str = option("uniform", Choice("none", "uniform", "normal"))
        log_clean: bool = option(True, Flag())

    check_options("pgd-at", Options(eps=2))
    # AdvfeatError: pgd-at: eps must be a number in (0, 1] (8/255 ≈ 0.0314), got 2

Checks are small frozen objects (:class:`Number`, :class:`Integer`, :class:`Choice`,
:class:`Flag`, :class:`Text`, :class:`Each`); ``optional=True`` also accepts ``None``. A check
returns the normalised value (``float`` / ``int`` / ``tuple``); ``check_options(..., write=True)``
stores it back (configuration objects do, methods keep the values as given). Rules that tie two
options together stay in the owner's own ``validate`` / ``validate_options``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from advfeat.errors import AdvfeatError, unknown_name

__all__ = [
    "Check",
    "Choice",
    "Each",
    "Flag",
    "Integer",
    "Number",
    "Text",
    "check_options",
    "check_value",
    "option",
]

T = TypeVar("T")


class Check(Protocol):
    """A constraint on one option: returns the normalised value or raises AdvfeatError."""

    def __call__(self, owner: str, name: str, value: Any) -> Any: ...


def _where(owner: str, name: str) -> str:
    return f"{owner}: {name}" if owner else name


def _suffix(hint: str) -> str:
    return f" ({hint})" if hint else ""


def _refusal(owner: str, name: str, accepted: str, value: Any, hint: str = "") -> AdvfeatError:
    """The one line for a refused value: the owner, the option, what it accepts (with the
    ``hint``) and what it was given."""
    return AdvfeatError(f"{_where(owner, name)} must be {accepted}{_suffix(hint)}, got {value!r}")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


@dataclass(frozen=True)
class Number:
    """A finite real number in ``[low, high]`` (``low_open`` / ``high_open``: strict bounds)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    hint: str = ""

    def describe(self) -> str:
        has_low, has_high = math.isfinite(self.low), math.isfinite(self.high)
        if has_low and has_high:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"a number in {left}{self.low:g}, {self.high:g}{right}"
        elif has_low:
            text = f"a number {'>' if self.low_open else '>='} {self.low:g}"
        elif has_high:
            text = f"a number {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "a finite number"
        return text + (" or null" if self.optional else "")

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        ok = _is_real(value) and math.isfinite(float(value))
        if ok:
            v = float(value)
            ok = (v > self.low if self.low_open else v >= self.low) and (
                v < self.high if self.high_open else v <= self.high
            )
        if not ok:
            raise _refusal(owner, name, self.describe(), value, self.hint)
        return float(value)


@dataclass(frozen=True)
class Integer:
    """An integer (not a bool) in ``[low, high]``."""

    low: int | None = None
    high: int | None = None
    optional: bool = False
    hint: str = ""

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"an integer in [{self.low}, {self.high}]"
        elif self.low is not None:
            text = f"an integer >= {self.low}"
        elif self.high is not None:
            text = f"an integer <= {self.high}"
        else:
            text = "an integer"
        return text + (" or null" if self.optional else "")

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        ok = not isinstance(value, bool) and isinstance(value, numbers.Integral)
        if ok and (
            (self.low is not None and value < self.low)
            or (self.high is not None and value > self.high)
        ):
            ok = False
        if not ok:
            raise _refusal(owner, name, self.describe(), value, self.hint)
        return int(value)


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of names (an unknown name lists the close matches)."""

    choices: tuple[str, ...]
    optional: bool = False

    def __init__(self, *choices: str, optional: bool = False) -> None:
        object.__setattr__(self, "choices", tuple(choices))
        object.__setattr__(self, "optional", optional)

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or value not in self.choices:
            raise unknown_name(f"{owner} {name}".strip(), str(value), self.choices)
        return value


@dataclass(frozen=True)
class Flag:
    """``true`` or ``false`` (a bool, not 0/1)."""

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise _refusal(owner, name, "true or false", value)
        return value


@dataclass(frozen=True)
class Text:
    """A string (non-empty unless ``empty``)."""

    optional: bool = False
    empty: bool = False
    hint: str = ""

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or (not value and not self.empty):
            what = "a string" if self.empty else "a non-empty string"
            raise _refusal(owner, name, what, value, self.hint)
        return value


@dataclass(frozen=True)
class Each:
    """A list (or tuple) whose every item passes ``item``; returned as a tuple."""

    item: Check
    min_len: int = 0
    optional: bool = False

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise _refusal(owner, name, "a list", value)
        if len(value) < self.min_len:
            raise AdvfeatError(
                f"{_where(owner, name)} needs at least {self.min_len} value(s), got {list(value)!r}"
            )
        return tuple(self.item(owner, f"{name} value", v) for v in value)


def option(default: T, check: Check, *, doc: str = "") -> T:
    """A dataclass field with default ``default`` and constraint ``check`` (see the module)."""
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})  # type: ignore[no-any-return]


def check_value(options: Any, name: str, owner: str = "") -> Any:
    """Check one declared field of ``options`` and return its normalised value."""
    f = {f.name: f for f in dataclasses.fields(options)}[name]
    return f.metadata["check"](owner, name, getattr(options, name))


def check_options(owner: str, options: Any, *, write: bool = False) -> None:
    """Check every field of the dataclass instance ``options`` declared with :func:`option`,
    in declaration order; with ``write``, store the normalised values back."""
    for f in dataclasses.fields(options):
        check = f.metadata.get("check")
        if check is None:
            continue
        value = check(owner, f.name, getattr(options, f.name))
        if write:
            setattr(options, f.name, value)
