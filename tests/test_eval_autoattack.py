"""AutoAttack is the standard version: its parameters, read back from the backend's attack
objects, are those of Croce & Hein's standard version; the cheaper variant has its own name;
every figure carries backend, version and parameters; a constant classifier is flagged."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from advfeat.eval import evaluate
from advfeat.eval.autoattack import (
    FAST,
    STANDARD,
    autoattack_backend,
    describe_parameters,
    make_autoattack,
    model_checks,
)
from advfeat.eval.report import summary_rows

CPU = torch.device("cpu")
needs_backend = pytest.mark.skipif(
    autoattack_backend() is None, reason="no AutoAttack package (pip install 'advfeat[autoattack]')"
)


def _linear(num_classes: int, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes)).eval()


def test_standard_parameters_are_croce_and_hein_standard_version() -> None:
    assert STANDARD == {
        "apgd-ce": {"n_iter": 100, "n_restarts": 1},
        "apgd-t": {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9},
        "fab-t": {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9},
        "square": {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8},
    }
    text = describe_parameters(STANDARD)
    assert (
        text
        == "APGD-CE 100 it; APGD-T 100 it × 9 targets; FAB-T 100 it × 9 targets; SQUARE 5000 queries"
    )


@needs_backend
def test_backend_runs_the_standard_parameters() -> None:
    runner = make_autoattack(
        _linear(10), eps=8 / 255, version="standard", seed=0, num_classes=10, device=CPU
    )
    assert runner.version == "standard"
    assert runner.parameters == STANDARD  # read back from the backend's own attack objects
    assert runner.backend in runner.describe() and runner.backend_version in runner.describe()
    fast = make_autoattack(
        _linear(10), eps=8 / 255, version="fast", seed=0, num_classes=10, device=CPU
    )
    assert fast.parameters == FAST and "fab-t" not in fast.parameters


@needs_backend
def test_fewer_classes_fewer_targets_and_no_targeted_dlr_below_four() -> None:
    eight = make_autoattack(
        _linear(8), eps=0.03, version="standard", seed=0, num_classes=8, device=CPU
    )
    assert eight.parameters["apgd-t"]["n_target_classes"] == 7
    assert eight.parameters["fab-t"]["n_target_classes"] == 7
    three = make_autoattack(
        _linear(3), eps=0.03, version="standard", seed=0, num_classes=3, device=CPU
    )
    assert "skipped" in three.parameters["apgd-t"]
    assert three.parameters["fab-t"]["n_target_classes"] == 2


@needs_backend
def test_standard_autoattack_breaks_a_linear_model_within_the_budget() -> None:
    model = _linear(10, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correct before the attack
    eps = 0.25
    runner = make_autoattack(model, eps=eps, version="standard", seed=0, num_classes=10, device=CPU)
    x_adv = runner(x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()


def test_constant_classifier_is_flagged() -> None:
    linear = nn.Linear(3 * 8 * 8, 4)
    nn.init.zeros_(linear.weight)
    constant = nn.Sequential(nn.Flatten(), linear).eval()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not model_checks(constant, x)["not_constant"]["passed"]
    assert model_checks(_linear(4), x)["not_constant"]["passed"]


@needs_backend
def test_suite_reports_backend_version_and_parameters_next_to_the_figure(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    data = TensorDataset(tiny_task.x_test[:8], tiny_task.y_test[:8])
    res = evaluate(
        copy.deepcopy(trained_tiny_model),
        data,
        ["attacks"],
        attacks=["pgd", "autoattack-fast"],
        pgd_steps=2,
    )
    fast = res["suites"]["attacks"]["autoattack_fast"]
    assert fast["version"] == "fast" and fast["backend"] == autoattack_backend()
    assert fast["parameters"]["apgd-ce"] == {"n_iter": 20, "n_restarts": 1}
    assert "autoattack" not in res["suites"]["attacks"]  # the fast one never stands in for it
    rows = dict(summary_rows(res))
    label = next(k for k in rows if k.startswith("AutoAttack-fast"))
    assert fast["backend_version"] in label and "APGD-CE 20 it" in label
