"""A protocol that cannot run is refused before its first run starts: one line, exit 2, nothing
written (``advfeat train`` single run and default run, ``advfeat compare`` on every arm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.train.build import check_config
from advfeat.train.config import TrainConfig

SMALL_DATA = ["--set", "dataset_options={n_train: 64, n_test: 32, image_size: 16}"]
TINY = ["--epochs", "1", *SMALL_DATA]
"""A protocol that trains in seconds, should a run start (on code that checks too late)."""


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no CUDA, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def refused(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, at: Path
) -> str:
    """Run ``advfeat ARGS`` in folder ``at``; assert exit 2, one line on stderr, nothing written
    there; return the line."""
    monkeypatch.chdir(at)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("advfeat: error: "), err
    assert list(at.iterdir()) == [], "a refused protocol wrote into the working folder"
    return err


def test_default_run_on_a_machine_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    err = refused(["train", "--device", "cuda", *TINY], capsys, monkeypatch, tmp_path)
    assert "device 'cuda'" in err and "CUDA is not available" in err


def test_default_run_with_a_bad_dataset_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    err = refused(
        ["train", "--epochs", "1", "--set", "dataset_options.n_train=-5"],
        capsys,
        monkeypatch,
        tmp_path,
    )
    assert "n_train must be an integer >= 1, got -5" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "method_options.bogus=1"], "unknown option of method 'standard' 'bogus'"),
        (["--model", "resnet2000"], "unknown model 'resnet2000'; did you mean 'resnet20'"),
        (["--set", "dataset_options.seed=3"], "dataset_options.seed"),
    ],
)
def test_default_run_with_a_bad_method_model_or_dataset_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    assert message in refused(["train", *TINY, *extra], capsys, monkeypatch, tmp_path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([*SMALL_DATA, "--device", "cuda"], "CUDA is not available"),
        ([*SMALL_DATA, "--set", "dataset_options.n_train=-5"], "n_train must be an integer >= 1"),
        ([*SMALL_DATA, "--set", "dataset_options.image_size=4"], "image_size must be an integer"),
        ([*SMALL_DATA, "--set", "method_options.bogus=1"], "'bogus'"),
        ([*SMALL_DATA, "--set", "dataset_options.seed=3"], "dataset_options.seed"),
        (["--dataset", "cifar10", "--data-dir", "."], "CIFAR-10 not found"),
    ],
)
def test_single_run_is_refused_before_it_announces_itself(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    args = ["train", "--method", "standard", "--epochs", "1", *extra]
    assert message in refused(args, capsys, monkeypatch, tmp_path)


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ("gpu: method=afan device=cuda", "CUDA is not available"),
        ("small: dataset_options.image_size=4", "image_size must be an integer >= 8"),
        ("typo: method=afan method_options.bogus=1", "'bogus'"),
    ],
)
def test_compare_checks_every_arm_before_any_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    arm: str,
    message: str,
) -> None:
    args = ["compare", "--methods", "standard", "--arm", arm, "--seeds", "0", "--out", "cmp"]
    assert message in refused([*args, *TINY], capsys, monkeypatch, tmp_path)


def test_report_only_tabulates_without_the_training_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--methods", "standard", "--seeds", "0", "--out", "cmp", "--device", "cuda"]
    assert main([*args, *TINY, "--report-only"]) == 0
    assert "not finished: standard-s0" in capsys.readouterr().err


def test_the_checks_build_no_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import advfeat.data.shapes as shapes

    def no_rendering(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checks rendered the shapes dataset")

    monkeypatch.setattr(shapes, "render_scenes", no_rendering)
    check_config(TrainConfig(device="cpu", dataset_options={"n_train": 10**6}))
    with pytest.raises(AdvfeatError, match="n_test must be an integer >= 1, got 0"):
        check_config(TrainConfig(dataset_options={"n_test": 0}))
    with pytest.raises(AdvfeatError, match="CIFAR-100 not found"):
        check_config(TrainConfig(dataset="cifar100", data_dir=str(tmp_path)))
    with pytest.raises(AdvfeatError, match="device 'cuda:0' asked for"):
        check_config(TrainConfig(device="cuda:0"))
