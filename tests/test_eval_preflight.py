"""First contact with ``advfeat eval``: missing optional packages are reported before anything is
computed, the CPU default evaluates a stated sample, and the suite's cost is announced."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from advfeat.cli import main
from advfeat.eval.config import EvalConfig
from advfeat.eval.preflight import gradient_passes_per_image, missing_packages
from advfeat.eval.suites import options_of
from helpers import one_epoch_train_args

DATA = "{n_train: 32, n_test: 24, image_size: 16}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert main(one_epoch_train_args(run, DATA, batch_size=16)) == 0
    return run / "checkpoint.pt"


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_matplotlib_stops_before_computing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    _hide(monkeypatch, "matplotlib")
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--quiet"]
    assert main([*args, "--suite", "clean"]) == 2
    err = capsys.readouterr().err
    assert "advfeat[plot]" in err and "--no-plots" in err
    assert not out.exists() and not any(tmp_path.iterdir())
    assert main([*args, "--suite", "clean", "--no-plots"]) == 0


def test_preflight_lists_every_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(
        monkeypatch, "matplotlib", "imagecorruptions", "autoattack", "pyautoattack", "torchattacks"
    )
    cfg = EvalConfig(
        suites=("attacks", "corruptions"),
        suite_options={"attacks": {"names": ("pgd", "autoattack")}},
    )
    missing = missing_packages(cfg, plots=True)
    assert len(missing) == 3
    cifar_only = EvalConfig(
        suites=("corruptions",),
        suite_options={"corruptions": {"types": ("gaussian_noise",), "scale": "cifar"}},
    )
    assert missing_packages(cifar_only, plots=False) == []  # CIFAR severities need no package


def test_cpu_default_sample_is_stated_and_recorded(
    checkpoint: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--no-plots"]
    args += ["--suite", "attacks", "--attacks", "pgd", "--pgd-steps", "2", "--device", "cpu"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "all 24 test images (at most 500: --max-images N or --all-images" in err
    assert "2 gradient passes per image" in err and "min here" in err
    assert json.loads(out.read_text())["config"]["max_images"] == 500
    assert main([*args, "--force", "--all-images", "--max-images", "8"]) == 2


def test_gradient_passes_count_the_attacks() -> None:
    cfg = EvalConfig(
        suites=("attacks",), suite_options={"attacks": {"names": ("pgd", "fgsm", "cw", "curve")}}
    )
    opts = options_of(cfg, "attacks")
    nonzero = sum(1 for e in opts.eps_curve if e > 0)
    assert gradient_passes_per_image(cfg) == opts.pgd_steps * (1 + nonzero) + 1 + opts.cw_steps
