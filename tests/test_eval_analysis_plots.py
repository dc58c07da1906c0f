"""L-ALFA η trajectories (ALFA Fig. 4) and per-branch behaviour (AdvProp Fig. 4-5, AFA W₀ vs ε):
the data the plots draw equals the run's history / the results, and the plots are written."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from torch import nn
from torch.utils.data import TensorDataset

from advfeat.eval import EvalData, evaluate
from advfeat.eval.analysis_plots import branch_accuracies, plot_branches
from advfeat.eval.plots import load_history, plot_all, plot_eta
from advfeat.eval.report import markdown_report
from advfeat.eval.suites import ordered_suites
from advfeat.eval.trajectories import eta_trajectories

pytest.importorskip("matplotlib", reason="the plot extra is not installed")

SITES = ["layer1", "layer2", "layer10"]  # "layer10" sorts before "layer2": order must be kept


def _history() -> list[dict[str, Any]]:
    rows = []
    for e in range(1, 6):
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "eta_layer1": 0.4 - 0.08 * e,
                "eta_layer2": 0.3 - 0.05 * e,
                "eta_layer10": 0.3 + 0.13 * e,
            }
        )
    rows.append({"epoch": 6, "train_loss": 0.3})  # an epoch without η (e.g. resumed) is dropped
    return rows


def test_eta_trajectories_equal_the_history(tmp_path: Path) -> None:
    history = _history()
    traj = eta_trajectories(history)
    assert traj["sites"] == SITES
    assert traj["epoch"] == [1, 2, 3, 4, 5]
    for s in SITES:
        assert traj["eta"][s] == [row[f"eta_{s}"] for row in history[:5]]
    assert traj["final"] == {s: history[4][f"eta_{s}"] for s in SITES}
    assert traj["dominant_site"] == "layer10"
    assert traj["final_share"] == pytest.approx(0.95 / (0.0 + 0.05 + 0.95))
    assert eta_trajectories([{"epoch": 1, "train_loss": 1.0}]) == {}
    path = plot_eta(history, tmp_path / "eta.png", "l-alfa / resnet20")
    assert path is not None and path.stat().st_size > 10_000
    assert plot_eta([{"epoch": 1}], tmp_path / "none.png") is None


def test_evaluate_with_a_run_folder_records_eta_in_the_json_and_report(
    trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"history": _history()}))
    data = EvalData(TensorDataset(tiny_task.x_test[:16], tiny_task.y_test[:16]), num_classes=3)
    out = tmp_path / "eval.json"
    res = evaluate(copy.deepcopy(trained_tiny_model), data, ["clean"], out=out, run_dir=run)
    saved = json.loads(out.read_text())
    assert saved["training"]["eta"] == eta_trajectories(_history()) == res["training"]["eta"]
    assert (tmp_path / "eval_plots" / "eta.png").is_file()
    md = out.with_suffix(".md").read_text()
    assert "## L-ALFA strengths η over training (ALFA Fig. 4)" in md
    assert "| layer10 | 0.430 | 0.690 | 0.950 |" in md  # epochs 1, 3, 5


def _branch_results() -> dict[str, Any]:
    def branch(clean: float, pgd: float, curve: list[float]) -> dict[str, Any]:
        return {
            "clean": {"top1": clean, "n": 64},
            "attacks": {
                "pgd": {"accuracy": pgd},
                "curve": {"eps_255": [0, 2, 8], "accuracy": curve},
            },
            "shift": {"mean_accuracy": clean - 0.1},
        }

    return {
        "run": {"method": "advprop", "model": "resnet20", "dataset": "shapes"},
        "suites": {
            "attacks": {
                "curve": {
                    "eps_255": [0, 2, 8],
                    "accuracy": [0.9, 0.6, 0.2],
                    "pointwise_accuracy": [0.9, 0.6, 0.2],
                    "fusion_weight_w0": [0.8, 0.5, 0.1],
                    "fusion_weight_w1": [0.2, 0.5, 0.9],
                }
            },
            "bn": {
                "branches": {
                    "main": branch(0.9, 0.2, [0.9, 0.6, 0.2]),
                    "aux": branch(0.7, 0.4, [0.7, 0.6, 0.4]),
                }
            },
        },
    }


def test_branch_plot_draws_the_bn_suite_numbers(tmp_path: Path) -> None:
    res = _branch_results()
    table = branch_accuracies(res)
    assert table == {
        "main": {"clean": 0.9, "PGD": 0.2, "shifted (mean)": pytest.approx(0.8)},
        "aux": {"clean": 0.7, "PGD": 0.4, "shifted (mean)": pytest.approx(0.6)},
    }
    path = plot_branches(res, tmp_path / "b.png")
    assert path is not None and path.stat().st_size > 10_000
    assert "bn_branches" in plot_all(res, tmp_path / "all", ordered_suites())
    assert plot_branches({"suites": {}}, tmp_path / "none.png") is None
    # an AFA model without a bn suite still gets W₀ vs ε
    res["suites"].pop("bn")
    assert branch_accuracies(res) == {}
    assert plot_branches(res, tmp_path / "afa.png") is not None


def test_bn_suite_of_a_two_branch_model_feeds_the_branch_plot(
    trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path
) -> None:
    from advfeat.norm import convert_multibn

    model = convert_multibn(copy.deepcopy(trained_tiny_model), ["clean", "adv"])
    data = EvalData(TensorDataset(tiny_task.x_test[:24], tiny_task.y_test[:24]), num_classes=3)
    res = evaluate(
        model,
        data,
        ["bn"],
        out=tmp_path / "e.json",
        bn_suites=["clean", "attacks"],
        attacks=["pgd"],
        pgd_steps=2,
    )
    table = branch_accuracies(res)
    assert set(table) == {"clean", "adv"}
    for name in table:
        b = res["suites"]["bn"]["branches"][name]
        assert table[name] == {"clean": b["clean"]["top1"], "PGD": b["attacks"]["pgd"]["accuracy"]}
    assert (tmp_path / "e_plots" / "bn_branches.png").is_file()


def test_report_lists_branch_and_landscape_sections_from_saved_results() -> None:
    res = _branch_results()
    res.update(
        data={"test_size": 64},
        config={"seed": 0},
        environment={"device": "cpu"},
        timing_s={"total": 1.0},
    )
    assert "# Evaluation report: advprop / resnet20 / shapes" in markdown_report(
        res, ordered_suites()
    )
    assert load_history("/nonexistent") == []
