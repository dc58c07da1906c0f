"""Plain helpers shared by several test modules (the fixtures live in ``conftest.py``).

* ``tiny_train_config(n_train, n_test, image_size=16, **fields)`` — a quiet CPU
  :class:`TrainConfig` on the synthetic shapes set; each caller states its own sizes and schedule.
* ``random_batch(n=8, size=8, seed=0)`` — ``n`` uniform random RGB images and labels of 3 classes.
* ``InputBNNet`` / ``input_bn_net(seed=0)`` — a net whose first layer is BN on the images.
* ``count_calls(*modules)`` — counts the forward calls of each module inside a ``with``.
* ``model_state(model)`` / ``assert_same_state(model, before)`` — what an attack must leave as it
  found it.
* ``interrupt_after_epoch(monkeypatch, epoch)`` — the next fit is killed when ``epoch`` starts.
* ``one_epoch_train_args(out, data, batch_size, method="standard", model="resnet20")`` — the
  ``advfeat train`` arguments of one quiet CPU epoch on the synthetic shapes set.
* ``TensorPairTask`` — the tensor plumbing of a test's own task (collate, device, clean pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.data.bundle import DatasetBundle
from advfeat.errors import AdvfeatError
from advfeat.tasks import TaskPass
from advfeat.tasks.base import ForwardPass
from advfeat.train import TrainConfig, Trainer


# ---------------------------------------------------------------------------- training runs
def tiny_train_config(
    n_train: int, n_test: int, image_size: int = 16, **fields: object
) -> TrainConfig:
    """A run on ``n_train`` / ``n_test`` synthetic shapes images of ``image_size`` pixels, on the
    CPU, without a progress bar or the shifted test sets; ``fields`` set any other field."""
    cfg = TrainConfig(
        dataset_options={"n_train": n_train, "n_test": n_test, "image_size": image_size},
        device="cpu",
        progress=False,
        eval_shifted=False,
    )
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def one_epoch_train_args(
    out: Path, data: str, batch_size: int, method: str = "standard", model: str = "resnet20"
) -> list[str]:
    """``advfeat train`` arguments of one quiet epoch on the CPU, on the synthetic shapes set with
    ``data`` as its ``dataset_options`` (YAML flow mapping), without the shifted test sets."""
    args = ["train", "--method", method, "--model", model, "--dataset", "shapes"]
    args += ["--epochs", "1", "--batch-size", str(batch_size), "--device", "cpu", "--quiet"]
    args += ["--out", str(out), "--set", f"dataset_options={data}", "--set", "eval_shifted=false"]
    return args


def interrupt_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make the next fit raise KeyboardInterrupt when ``epoch`` (0-based) starts."""
    original = Trainer.train_epoch

    def crash(self: Trainer, e: int) -> dict:
        if e == epoch:
            raise KeyboardInterrupt
        return original(self, e)

    monkeypatch.setattr(Trainer, "train_epoch", crash)


# ---------------------------------------------------------------------------- data and models
def random_batch(n: int = 8, size: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images uniform in [0, 1) of ``size`` × ``size`` pixels and labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


class InputBNNet(nn.Module):
    """BN on the images first (its batch mean is the image mean), then conv-BN-ReLU, pool, fc."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.bn(self.conv(self.bn_in(x)))).mean(dim=(2, 3)))


def input_bn_net(seed: int = 0) -> InputBNNet:
    """An InputBNNet initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InputBNNet()


@contextmanager
def count_calls(*modules: nn.Module) -> Iterator[list[int]]:
    """``counts[i]``: how many times ``modules[i]`` ran forward inside the ``with`` block."""
    counts = [0] * len(modules)

    def make(i: int) -> Callable[..., None]:
        def hook(*_: object) -> None:
            counts[i] += 1

        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------- attacks
def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything an attack must leave untouched: train / eval flags, requires_grad, .grad,
    buffers, BN statistics tracking and the parameters."""
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "tracking": {n: getattr(m, "track_running_stats", None) for n, m in model.named_modules()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def assert_same_state(model: nn.Module, before: dict[str, Any]) -> None:
    """``model`` is as :func:`model_state` recorded it in ``before``."""
    after = model_state(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["tracking"] == before["tracking"]
    for name, grad in before["grad"].items():
        if grad is None:
            assert after["grad"][name] is None, name
        else:
            assert torch.equal(after["grad"][name], grad), name
    for key in ("buffers", "params"):
        assert before[key].keys() == after[key].keys()
        for name, value in before[key].items():
            assert torch.equal(after[key][name], value), name


# ---------------------------------------------------------------------------- tasks
class TensorPairTask:
    """Mixin (before the Task base class) for a test's own task whose images and targets are
    tensors: stacks them into batches, moves them to the device, runs the plain clean pass and
    builds no model."""

    name: str

    def collate(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])

    def to_device(self, x: Any, y: Any, device: torch.device) -> tuple[Any, Any]:
        return x.to(device), y.to(device)

    def clean_pass(self, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> TaskPass:
        return ForwardPass(self, model, x, y, sites, replay=False)  # type: ignore[arg-type]

    def build_model(self, name: str, data: DatasetBundle, **options: Any) -> nn.Module:
        raise AdvfeatError(f"the {self.name} task builds no model")
