"""``advfeat train`` on detection and segmentation: run folder, dense metrics, resume, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from advfeat.cli import main
from advfeat.data import build_dataset
from advfeat.data.dense import PadTo, SegmentationCrop
from advfeat.errors import AdvfeatError
from advfeat.train import TrainConfig, load_checkpoint
from advfeat.train.schedule import lr_factor
from helpers import interrupt_after_epoch

DETECTION = {
    "dataset": "shapes-det",
    "model": "fasterrcnn_tiny",
    "data": "{n_train: 16, n_test: 8, image_size: 48, max_objects: 1}",
}
SEGMENTATION = {
    "dataset": "shapes-seg",
    "model": "deeplabv3plus_tiny",
    "data": "{n_train: 32, n_test: 16, image_size: 32, max_objects: 1}",
}
METRICS = {"shapes-det": ("ap", "ap50", "ap75"), "shapes-seg": ("miou", "pixel_acc")}


def train_args(setup: dict[str, str], method: str, out: Path, *extra: str) -> list[str]:
    args = [
        "train", "--method", method, "--model", setup["model"], "--dataset", setup["dataset"],
        "--epochs", "2", "--batch-size", "8", "--lr", "0.02", "--seed", "0", "--device", "cpu",
        "--out", str(out), "--quiet",
        "--set", f"dataset_options={setup['data']}",
        "--set", "eval_batch_size=16",
        "--set", "eval_shifted=false",
    ]  # fmt: skip
    if method == "afan":
        args += ["--set", "method_options={k: 2, alpha: 0.05}"]
    return [*args, *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


# ------------------------------------------------------------------------------- schedule
def test_poly_schedule_is_one_minus_progress_to_the_power() -> None:
    def poly(p: float, power: float = 0.9, warmup_epochs: float = 0.0) -> float:
        return lr_factor(
            p, total_epochs=10, schedule="poly", power=power, warmup_epochs=warmup_epochs
        )

    assert poly(0.0) == 1.0
    assert poly(5.0) == pytest.approx(0.5**0.9)
    assert poly(7.5, power=2.0) == pytest.approx(0.25**2)
    assert poly(10.0) == 0.0
    # after a 2-epoch warm-up, t counts the remaining 8 epochs
    assert poly(6.0, warmup_epochs=2.0) == pytest.approx(0.5**0.9)
    assert poly(1.0, warmup_epochs=2.0) == pytest.approx((1.0 + 1e-3) / 2.0)


def test_poly_power_is_validated() -> None:
    TrainConfig(schedule="poly", poly_power=1.0).validate()
    with pytest.raises(AdvfeatError, match="poly_power"):
        TrainConfig(schedule="poly", poly_power=0.0).validate()
    with pytest.raises(AdvfeatError, match="poly"):
        TrainConfig(schedule="polynomial").validate()


def test_segmentation_preset_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "afan-deeplab-voc12", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "schedule: poly" in shown and "poly_power: 0.9" in shown and "dataset: voc-seg" in shown


# --------------------------------------------------------------------------- train + metrics
@pytest.mark.parametrize("setup", [DETECTION, SEGMENTATION], ids=["det", "seg"])
@pytest.mark.parametrize("method", ["standard", "afan"])
def test_train_writes_dense_metrics(
    setup: dict[str, str], method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(train_args(setup, method, run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("method", "model", "dataset", "epochs", "seed")} == {
        "method": method,
        "model": setup["model"],
        "dataset": setup["dataset"],
        "epochs": 2,
        "seed": 0,
    }
    assert "clean_acc" not in metrics and metrics["train_time_s"] > 0
    for key in METRICS[setup["dataset"]]:
        assert 0.0 <= metrics[f"clean_{key}"] <= 1.0, key
    history = metrics["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        assert "train_acc" not in row
        for key in METRICS[setup["dataset"]]:
            assert 0.0 <= row[f"test_{key}"] <= 1.0
        if method == "afan":  # default: Eq. 7's sum, L_clean + λ·Σ L_adv (2 sites × k = 2)
            assert row["loss_adv"] > 0 and row["delta_l2"] > 0
            total = row["loss_clean"] + row["loss_adv"]
            assert row["train_loss"] == pytest.approx(total, rel=1e-4)
    # the last epoch's test metrics are those of the final model
    primary = "ap50" if setup["dataset"] == "shapes-det" else "miou"
    assert history[-1][f"test_{primary}"] == pytest.approx(metrics[f"clean_{primary}"])
    with (run / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and f"test_{primary}" in rows[0]
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert not list(run.glob("*.tmp"))


def test_segmentation_loss_goes_down_and_shifted_domains_are_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = train_args(SEGMENTATION, "standard", run, "--epochs", "4", "--set", "eval_shifted=true")
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [row["train_loss"] for row in metrics["history"]]
    assert losses[-1] < losses[0]
    assert set(metrics["shifted_miou"]) == {"colour", "fog", "noise", "style"}
    assert all(0.0 <= v <= 1.0 for v in metrics["shifted_miou"].values())


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("setup", [DETECTION, SEGMENTATION], ids=["det", "seg"])
def test_resume_after_a_kill_ends_with_the_same_weights(
    setup: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(train_args(setup, "afan", tmp_path / "straight")) == 0

    interrupt_after_epoch(monkeypatch, 1)  # killed as epoch two starts
    assert main(train_args(setup, "afan", tmp_path / "killed")) != 0
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 0
    assert not (tmp_path / "killed" / "metrics.json").exists()
    monkeypatch.undo()  # no longer killed

    assert main(train_args(setup, "afan", tmp_path / "killed", "--resume")) == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    h1, h2 = (
        json.loads((tmp_path / n / "metrics.json").read_text())["history"]
        for n in ("straight", "killed")
    )
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]


# ------------------------------------------------------------------------------------ errors
def test_a_classification_only_method_on_detection_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train_args(DETECTION, "advprop", tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "advprop" in err and "detection trains with: afan, alfa, standard" in err


def test_a_classifier_on_segmentation_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = train_args(SEGMENTATION, "standard", tmp_path / "run", "--model", "resnet20")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "segmentation model 'resnet20'" in err and "deeplabv3plus_tiny" in err


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("voc-det", "download=True"),
        ("voc-seg", "download=True"),
        ("coco", "cocodataset.org"),
        ("cityscapes", "cityscapes-dataset.com"),
    ],
)
def test_missing_real_data_says_where_and_how(name: str, hint: str, tmp_path: Path) -> None:
    with pytest.raises(AdvfeatError, match="not found") as err:
        build_dataset(name, tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(err.value) and hint in str(err.value)


# -------------------------------------------------------------------------- seg transforms
def test_segmentation_crop_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    h, w = 20, 30
    # pixel value = column index / w in every channel; the mask holds the column index too
    image = (torch.arange(w) / w).expand(3, h, w).clone()
    mask = torch.arange(w).expand(h, w).clone()
    for _ in range(10):
        x, m = SegmentationCrop(24, scale=(1.0, 1.0))(image, mask)
        assert x.shape == (3, 24, 24) and m.shape == (24, 24)
        inside = m != 255
        assert inside.any()
        assert torch.allclose(x[0][inside], m[inside].float() / w)
        assert (x[:, ~inside] == 0).all()  # padding: black image, ignored mask


def test_pad_to_keeps_pixels_and_ignores_the_padding() -> None:
    image, mask = torch.rand(3, 5, 7), torch.randint(0, 3, (5, 7))
    x, m = PadTo(8)(image, mask)
    assert x.shape == (3, 8, 8) and torch.equal(x[:, :5, :7], image)
    assert torch.equal(m[:5, :7], mask) and (m[5:] == 255).all() and (m[:, 7:] == 255).all()
    with pytest.raises(AdvfeatError, match="eval_size"):
        PadTo(6)(image, mask)
