"""The C&W figures say what they measure: accuracy within stated L2 budgets, the median L2 of the
successful attacks, and the share not fooled — which Carlini & Wagner's binary search over c
lowers where a fixed c is too small."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from torch import nn
from torch.utils.data import TensorDataset

from advfeat.eval import evaluate
from advfeat.eval.report import summary_rows
from advfeat.eval.robust import Outcome, accuracy_within_l2


def test_accuracy_within_l2_counts_only_fools_inside_the_budget() -> None:
    outcome = Outcome(
        clean=[True, True, True, False],
        adv=[False, False, True, False],
        l2=[0.3, 1.2, 0.0, 0.1],
        linf=[0.0] * 4,
    )
    assert accuracy_within_l2(outcome, [0.1, 0.5, 2.0]) == [0.75, 0.5, 0.25]


def test_binary_search_over_c_fools_where_a_small_fixed_c_does_not(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    data = TensorDataset(tiny_task.x_test[:24], tiny_task.y_test[:24])
    opts: dict[str, Any] = {"attacks": ["cw"], "cw_steps": 30, "cw_c": 1e-3, "cw_lr": 0.05}
    fixed = evaluate(copy.deepcopy(trained_tiny_model), data, ["attacks"], **opts)
    searched = evaluate(
        copy.deepcopy(trained_tiny_model), data, ["attacks"], cw_search_steps=5, **opts
    )
    f, s = fixed["suites"]["attacks"]["cw"], searched["suites"]["attacks"]["cw"]
    assert s["accuracy"] < f["accuracy"]
    assert "fixed c = 0.001" in f["label"] and "binary search" in s["label"]
    within = s["accuracy_within_l2"]
    assert within == sorted(within, reverse=True)  # larger budgets fool more
    assert all(s["accuracy"] <= w <= s["clean_accuracy"] for w in within)
    rows = dict(summary_rows(searched))
    assert any(k.startswith("C&W-L2 accuracy at ‖δ‖₂ ≤ 0.5") for k in rows)
    assert not any("unbounded" in k for k in rows)
    assert s["median_l2_fooled"] == pytest.approx(s["median_l2_fooled"])  # present and finite
