"""The ``advfeat`` command line: arguments, config files, overrides and every user error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advfeat.cli import main

TINY = [
    "--set",
    "dataset_options={n_train: 128, n_test: 64, image_size: 16}",
    "--set",
    "eval_shifted=false",
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def train_args(out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--method",
        "standard",
        "--model",
        "resnet20",
        "--dataset",
        "shapes",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
        *TINY,
        *extra,
    ]


def test_train_writes_the_run_folder_and_prints_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(train_args(tmp_path / "run"), capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "standard" and metrics["epochs"] == 1 and metrics["seed"] == 0
    assert "| standard | resnet20 |" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["dataset_options"] == {"n_train": 128, "n_test": 64, "image_size": 16}


def test_config_file_then_flags_then_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "lr: 0.3\nweight_decay: 0.001\nepochs: 7\nmethod_options: {label_smoothing: 0.1}\n"
    )
    code, out, _ = run_cli(
        ["train", "--config", str(cfg), "--epochs", "2", "--set", "lr=0.05", "--show-config"],
        capsys,
    )
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["lr"] == 0.05 and resolved["weight_decay"] == 0.001 and resolved["epochs"] == 2
    assert resolved["method_options"] == {"label_smoothing": 0.1}


def test_default_preset_resolves_offline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["train", "--show-config"], capsys)
    assert code == 0
    docs = [yaml.safe_load(d) for d in out.split("\n\n") if d.strip()]
    from advfeat.commands.train import DEFAULT_METHODS

    assert [d["method"] for d in docs] == list(DEFAULT_METHODS)
    assert all(d["dataset"] == "shapes" for d in docs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "resnet2O"], "unknown model 'resnet2O'; did you mean"),
        (["train", "--dataset", "cifar-10"], "unknown dataset 'cifar-10'; did you mean 'cifar10'"),
        (["train", "--method", "advprp"], "unknown method 'advprp'; did you mean 'advprop'"),
        (["train", "--epochs", "0"], "epochs must be an integer >= 1"),
        (["train", "--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
        (["train", "--set", "lr"], "--set expects key=value"),
        (["train", "--set", "epochs=two"], "epochs must be a number"),
        (
            ["train", "--dataset", "imagefolder", "--data-dir", "/nonexistent/imagenet"],
            "does not exist",
        ),
        (
            ["train", "--config", "/nonexistent.yaml"],
            "config file '/nonexistent.yaml' does not exist",
        ),
        (
            ["train", "--set", "method_options={alpah: 1}"],
            "unknown option of method 'standard' 'alpah'",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        [*args, "--out", str(tmp_path / "x"), "--device", "cpu", "--quiet", *TINY], capsys
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("advfeat: error:"), err
    assert message in err, err


def test_resume_with_a_foreign_checkpoint_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli([*train_args(run), "--resume"], capsys)
    assert code == 2 and "could not be read as an advfeat checkpoint" in err


def test_finished_run_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(train_args(tmp_path / "run"), capsys)[0] == 0
    code, _, err = run_cli(train_args(tmp_path / "run"), capsys)
    assert code == 2 and "--force" in err
    assert run_cli([*train_args(tmp_path / "run"), "--force"], capsys)[0] == 0


def test_methods_lists_paper_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["methods", "--json"], capsys)
    assert code == 0
    table = json.loads(out)["methods"]
    assert "standard" in table and "defaults" in table["standard"]


def test_console_script_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "advfeat.cli", "train", "--epochs", "-3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "epochs must be an integer >= 1" in proc.stderr


def test_checkpoint_options_are_recorded_as_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage1.pt").write_bytes(b"")
    args = ["train", "--method", "afa", "--set", "method_options.stage1_checkpoint=stage1.pt"]
    assert main([*args, "--show-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method_options"]["stage1_checkpoint"] == str(tmp_path / "stage1.pt")


def test_default_run_compares_the_default_methods_over_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from advfeat.commands.train import DEFAULT_METHODS, DEFAULT_SEEDS

    assert len(DEFAULT_SEEDS) >= 3 and DEFAULT_METHODS[0] == "standard"
    tiny = "dataset_options={n_train: 64, n_test: 32, image_size: 16}"
    args = ["train", "--epochs", "1", "--seed", "0", "--set", tiny, "--out", str(tmp_path)]
    assert main([*args, "--quiet"]) == 0
    table = capsys.readouterr().out
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["arms"] == list(DEFAULT_METHODS) and summary["seeds"] == [0]
    for method in DEFAULT_METHODS:
        metrics = json.loads((tmp_path / "runs" / f"{method}-s0" / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["config"]["batch_size"] == 32
        assert set(metrics["shifted_acc"]) == {"colour", "fog", "noise", "style"}
        assert f"| {method} | 1 | {100 * metrics['clean_acc']:.2f} |" in table
    assert "no spread, no verdict" in table  # one seed is a hint, not a result
