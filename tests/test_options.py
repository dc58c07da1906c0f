"""advfeat.options: constraints declared once, checked generically with one-line messages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from advfeat.errors import AdvfeatError
from advfeat.options import Choice, Each, Flag, Integer, Number, Text, check_options, option


@pytest.mark.parametrize(
    ("check", "good", "bad", "message"),
    [
        (Number(low=0, high=1, low_open=True), [1e-9, 1, 0.5], [0, 1.5, True, "1", math.nan],
         r"x must be a number in \(0, 1\]"),
        (Number(low=0), [0, 3.5, 10**6], [-1e-9, math.inf], "x must be a number >= 0"),
        (Number(high=1, high_open=True), [-5, 0.99], [1], "x must be a number < 1"),
        (Number(low=0, optional=True), [None, 0], [-1], "x must be a number >= 0 or null"),
        (Integer(low=1), [1, 7], [0, 1.0, True, None], "x must be an integer >= 1"),
        (Integer(1, 2), [1, 2], [3, 0], r"x must be an integer in \[1, 2\]"),
        (Integer(low=0, optional=True), [None, 0], [-1], "x must be an integer >= 0 or null"),
        (Flag(), [True, False], [1, "true", None], "x must be true or false"),
        (Text(), ["layer1"], ["", None, 3], "x must be a non-empty string"),
        (Text(optional=True), [None, "a"], [""], "x must be a non-empty string"),
    ],
)  # fmt: skip
def test_checks_accept_and_refuse_with_one_line(check, good, bad, message) -> None:  # type: ignore[no-untyped-def]
    for value in good:
        check("owner", "x", value)
    for value in bad:
        with pytest.raises(AdvfeatError, match=f"^owner: {message}") as info:
            check("owner", "x", value)
        assert "\n" not in str(info.value) and repr(value) in str(info.value)


def test_choice_lists_close_matches_and_allows_none_when_optional() -> None:
    modes = Choice("train", "eval")
    assert modes("m", "bn_mode", "eval") == "eval"
    with pytest.raises(AdvfeatError, match=r"unknown m bn_mode 'trian'; did you mean 'train'\?"):
        modes("m", "bn_mode", "trian")
    with pytest.raises(AdvfeatError, match="unknown m bn_mode 'None'"):
        modes("m", "bn_mode", None)
    assert Choice("a", optional=True)("m", "x", None) is None


def test_number_and_integer_normalise_and_each_checks_items() -> None:
    assert Number(low=0)("", "x", 3) == 3.0 and isinstance(Number()("", "x", 3), float)
    assert Integer()("", "x", 4) == 4 and isinstance(Integer()("", "x", 4), int)
    assert Each(Number(low=0))("", "xs", [1, 2]) == (1.0, 2.0)
    with pytest.raises(AdvfeatError, match=r"^xs value must be a number >= 0, got -1$"):
        Each(Number(low=0))("", "xs", [1, -1])
    with pytest.raises(AdvfeatError, match="xs must be a list"):
        Each(Number())("", "xs", "1,2")
    with pytest.raises(AdvfeatError, match="at least 1 value"):
        Each(Number(), min_len=1)("", "xs", [])


@dataclass
class Settings:
    steps: int = option(10, Integer(low=1))
    eps: float = option(8, Number(low=0, high=255))
    free: str = "anything"  # not declared: not checked
    sizes: list[int] = field(default_factory=lambda: [1, 2])


def test_check_options_checks_declared_fields_in_order_and_writes_back_on_request() -> None:
    check_options("demo", Settings(free=None))  # type: ignore[arg-type]
    with pytest.raises(AdvfeatError, match=r"^demo: steps must be an integer >= 1, got 0$"):
        check_options("demo", Settings(steps=0, eps=-1))
    kept = Settings(eps=4)
    check_options("demo", kept)
    assert kept.eps == 4 and isinstance(kept.eps, int)
    check_options("demo", kept, write=True)
    assert isinstance(kept.eps, float)
