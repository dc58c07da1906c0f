"""Plots and the Markdown report, drawn from result dictionaries and run-folder histories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from advfeat.eval.plots import (
    load_history,
    plot_eps_curve,
    plot_eta,
    plot_fusion_weight,
    plot_training,
)
from advfeat.eval.report import markdown_report
from advfeat.eval.suites import ordered_suites

pytest.importorskip("matplotlib", reason="the plot extra is not installed")

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _results() -> dict[str, Any]:
    eps = [0.0, 1.0, 2.0, 4.0, 8.0]
    return {
        "run": {"method": "afa", "model": "resnet20", "dataset": "shapes"},
        "data": {"num_classes": 10, "test_size": 64, "shifted_domains": []},
        "config": {"seed": 0, "max_images": None},
        "environment": {"device": "cpu", "torch": "x"},
        "timing_s": {"total": 1.0},
        "suites": {
            "clean": {"top1": 0.9, "top5": 1.0, "n": 64},
            "attacks": {
                "eps": 8 / 255,
                "curve": {
                    "eps_255": eps,
                    "accuracy": [0.9, 0.8, 0.7, 0.5, 0.3],
                    "pointwise_accuracy": [0.9, 0.8, 0.72, 0.5, 0.31],
                    "alpha_ratio": 0.25,
                    "steps": 20,
                    "fusion_weight_w0": [0.9, 0.7, 0.5, 0.3, 0.2],
                    "fusion_weight_w1": [0.1, 0.3, 0.5, 0.7, 0.8],
                },
                "adaptive": {
                    "accuracy": 0.25,
                    "best_single_weighting": 0.27,
                    "per_weighting": {"1:1": 0.27, "1:10": 0.3},
                    "non_adaptive_w0_detached": {"accuracy": 0.31},
                    "bce_target": 0.0,
                },
                "transfer": {"eps_255": eps, "accuracy": [0.9, 0.88, 0.85, 0.8, 0.7]},
            },
        },
    }


def test_eps_curve_and_fusion_weight_plots(tmp_path: Path) -> None:
    res = _results()
    curve = plot_eps_curve(res, tmp_path / "eps.png")
    fusion = plot_fusion_weight(res, tmp_path / "w.png")
    assert curve is not None and fusion is not None
    assert min(_png_size(curve)) > 300 and min(_png_size(fusion)) > 300
    res["suites"]["attacks"]["curve"].pop("fusion_weight_w1")
    assert plot_fusion_weight(res, tmp_path / "none.png") is None  # not an AFA model
    assert not (tmp_path / "none.png").exists()


def test_training_and_eta_plots_from_a_run_folder(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 2 / e, "train_acc": 0.2 * e, "test_acc": 0.18 * e,
         "lr": 0.1 / e, "eta_layer2": 0.5 - 0.1 * e, "eta_layer3": 0.5 + 0.1 * e}
        for e in range(1, 5)
    ]  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps({"history": history}))
    loaded = load_history(tmp_path)
    assert loaded == history
    assert plot_training(loaded, tmp_path / "t.png", "l-alfa") is not None
    eta = plot_eta(loaded, tmp_path / "eta.png", "l-alfa")
    assert eta is not None and _png_size(eta)[0] > 300
    assert plot_eta([{"epoch": 1, "lr": 0.1}], tmp_path / "x.png") is None
    csv_run = tmp_path / "csv"
    csv_run.mkdir()
    (csv_run / "history.csv").write_text("epoch,train_loss,lr\n1,2.5,0.1\n2,2.0,0.05\n")
    assert load_history(csv_run) == [
        {"epoch": 1.0, "train_loss": 2.5, "lr": 0.1},
        {"epoch": 2.0, "train_loss": 2.0, "lr": 0.05},
    ]


def test_report_reads_the_numbers() -> None:
    md = markdown_report(_results(), ordered_suites())
    assert md.startswith("# Evaluation report: afa / resnet20 / shapes")
    assert "| clean top-1 | 90.0 % |" in md
    assert "| AFA adaptive PGD (ε = 8/255) | 25.0 % |" in md
    assert "black-box transfer (ε = 8/255) | 70.0 %" in md
    assert "never exceeds clean accuracy" in md
