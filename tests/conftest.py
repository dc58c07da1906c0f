"""Shared tiny fixtures: a BN CNN, a synthetic separable task and a model trained on it.

Everything is seeded with private generators (the global RNG is left as it was) and small
enough to build in well under a second on one CPU core.

* ``make_tiny_bn_cnn(num_classes=3, width=8, seed=0)`` — builder of a fresh :class:`TinyBNCNN`.
* ``tiny_bn_cnn`` — a fresh, untrained TinyBNCNN (per test, free to mutate) whose BN running
  statistics are non-trivial, so eval-mode and train-mode BN give different outputs.
* ``tiny_task`` — the synthetic 3-class colour task (8×8 RGB images in [0, 1]).
* ``trained_tiny_model`` — a TinyBNCNN trained on ``tiny_task`` (≈97 % clean test accuracy,
  breakable at ε = 8/255), in eval mode. Shared by the session: ``copy.deepcopy`` it before
  changing anything.
* ``tiny_batch`` — ``(x, y)``: 32 test images of ``tiny_task`` (shared: do not modify).
* ``plain_loop(method, model, batches, lr=0.1)`` — the loop a user writes around a method (SGD
  with momentum over ``method.parameter_groups``, ``method(model, x, y).loss`` backward, step),
  asserting every loss finite; returns the method's outputs.
* ``no_autoattack`` — every AutoAttack backend looks uninstalled (``importlib.util.find_spec``
  answers ``None`` for them), whatever this environment has.

Plain helpers that several modules import (tiny training configurations, random batches, the
attack state check, a test task's tensor plumbing) live in ``helpers.py`` beside this file.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The suite's models are tiny: one intra-op thread is fastest, and several threads per process
# spin against each other when the machine is busy (measured: 2.6 s vs 86 s for the same run).
torch.set_num_threads(1)


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class TinyBNCNN(nn.Module):
    """conv-BN-ReLU ×2, global average pool, linear head. Feature sites: ``block1``, ``block2``."""

    def __init__(self, num_classes: int = 3, width: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        self.block1 = conv_bn_relu(in_channels, width, 1)
        self.block2 = conv_bn_relu(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.block2(self.block1(x))).flatten(1))


def build_tiny_bn_cnn(num_classes: int = 3, width: int = 8, seed: int = 0) -> TinyBNCNN:
    """A TinyBNCNN initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyBNCNN(num_classes, width)


@dataclass(frozen=True)
class TinyTask:
    """A synthetic classification task: class k is a slightly brighter colour channel k."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 3


def colour_images(
    n: int, generator: torch.Generator, *, size: int = 8, shift: float = 0.06, noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, 3, (n,), generator=generator)
    colour = F.one_hot(y, 3).float() - 1 / 3
    x = (
        0.5
        + shift * colour.view(n, 3, 1, 1)
        + noise * torch.randn(n, 3, size, size, generator=generator)
    )
    return x.clamp(0, 1), y


@pytest.fixture(scope="session")
def make_tiny_bn_cnn() -> Callable[..., TinyBNCNN]:
    return build_tiny_bn_cnn


@pytest.fixture
def tiny_bn_cnn() -> TinyBNCNN:
    model = build_tiny_bn_cnn(seed=0)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="session")
def tiny_task() -> TinyTask:
    g = torch.Generator().manual_seed(0)
    x_train, y_train = colour_images(512, g)
    x_test, y_test = colour_images(128, g)
    return TinyTask(x_train, y_train, x_test, y_test)


@pytest.fixture(scope="session")
def trained_tiny_model(tiny_task: TinyTask) -> TinyBNCNN:
    model = build_tiny_bn_cnn(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    n = tiny_task.x_train.shape[0]
    for _ in range(5):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(tiny_task.x_train[idx]), tiny_task.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_batch(tiny_task: TinyTask) -> tuple[Tensor, Tensor]:
    return tiny_task.x_test[:32], tiny_task.y_test[:32]


PlainLoop = Callable[..., list[Any]]


def _plain_loop(
    method: nn.Module, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], lr: float = 0.1
) -> list[Any]:
    opt = torch.optim.SGD(method.parameter_groups(model, lr=lr), lr=lr, momentum=0.9)  # type: ignore[operator]
    outputs = []
    for x, y in batches:
        out = method(model, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss).all()
        outputs.append(out)
    return outputs


@pytest.fixture(scope="session")
def plain_loop() -> PlainLoop:
    return _plain_loop


@pytest.fixture
def no_autoattack(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from advfeat.eval.autoattack import BACKENDS

    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name.split(".")[0] in BACKENDS else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield
