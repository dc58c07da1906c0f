"""The loop a user writes around a method (conftest's ``plain_loop``: SGD over the method's
parameter groups, ``method(model, x, y).loss`` backward, step) trains every layer of every
method's model, with finite losses; some methods add a check of their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from advfeat.methods import build_method
from helpers import input_bn_net, random_batch

Batch = tuple[Tensor, Tensor]


def same_random_batch_thrice(tiny_batch: Batch) -> list[Batch]:
    return [random_batch(16)] * 3


def two_random_batches(tiny_batch: Batch) -> list[Batch]:
    return [random_batch(16, seed=seed) for seed in range(2)]


def tiny_batch_twice(tiny_batch: Batch) -> list[Batch]:
    return [tiny_batch] * 2


def advprop_checks(method: Any, model: nn.Module, outputs: list[Any], stock: nn.Module) -> None:
    """Every step reports its clean logits, and the model kept for evaluation is the stock
    network with the main BN only (AdvProp Sec. 4.3)."""
    assert all(out.logits is not None and out.logits.shape == (16, 3) for out in outputs)
    assert set(method.eval_model(model).state_dict()) == set(stock.state_dict())


@dataclass(frozen=True)
class LoopCase:
    """A method with tiny options, the batches its loop runs and any check of its own."""

    method: str
    options: dict[str, Any]
    batches: Callable[[Batch], list[Batch]]
    model: Callable[[], nn.Module] | None = None  # None: conftest's TinyBNCNN
    check: Callable[[Any, nn.Module, list[Any], nn.Module], None] | None = None


def case(method: str, options: dict[str, Any], batches: Callable[..., Any], **more: Any) -> Any:
    return pytest.param(LoopCase(method, options, batches, **more), id=method)


CASES = [
    case("alfa", {"site": "block2", "alpha": 0.05, "steps": 2}, same_random_batch_thrice),
    case("afan", {"site": "block2", "alpha": 2 / 255}, same_random_batch_thrice),
    *(case(name, {"steps": 2}, tiny_batch_twice) for name in ("pgd-at", "trades", "mart")),
    case("afa", {"num_branches": 3, "steps": 1}, tiny_batch_twice, model=input_bn_net),
    *(
        case(name, {"eps": 1}, two_random_batches, check=advprop_checks)
        for name in ("advprop", "fast-advprop")
    ),
]


@pytest.mark.parametrize("loop", CASES)
def test_plain_user_loop_trains(
    loop: LoopCase,
    make_tiny_bn_cnn: Callable[..., nn.Module],
    tiny_batch: Batch,
    plain_loop: Callable[..., list[Any]],
) -> None:
    build = loop.model or make_tiny_bn_cnn
    method = build_method(loop.method, **loop.options)
    model = method.prepare(build()).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    outputs = plain_loop(method, model, loop.batches(tiny_batch))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    # parameters, not BN buffers: every layer was trained (with AFA: the shared weights and
    # every branch's affine parameters)
    assert moved == set(start)
    if loop.check is not None:
        loop.check(method, model, outputs, build())
