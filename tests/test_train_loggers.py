"""Loggers: TensorBoard and Weights & Biases receive every epoch's row (as history.csv does); an
unknown or missing logger is refused before training."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from advfeat.cli import main

QUICK = ["train", "--method", "standard", "--model", "resnet20", "--dataset", "shapes"]
QUICK += ["--epochs", "2", "--batch-size", "16", "--device", "cpu", "--quiet"]
QUICK += ["--set", "dataset_options={n_train: 32, n_test: 16, image_size: 16}"]
QUICK += ["--set", "eval_shifted=false", "--set", "max_steps_per_epoch=1"]


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is an optional extra"
)
def test_tensorboard_gets_every_epoch(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main([*QUICK, "--out", str(run), "--set", "loggers=[tensorboard]"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2]
    rows = _history(run)
    assert [e.value for e in loss] == pytest.approx([float(r["train_loss"]) for r in rows])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is an optional extra")
def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    assert main([*QUICK, "--out", str(run), "--set", "loggers=[wandb]"]) == 0
    assert any((run / "wandb").glob("offline-run-*"))


def test_unknown_logger_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*QUICK, "--out", str(tmp_path / "run"), "--set", "loggers=[mlflow]"]) == 2
    err = capsys.readouterr().err
    assert "logger" in err and "tensorboard" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
