"""``advfeat export``: exported weights load into a fresh torchvision / timm / CIFAR model and give
the logits of the evaluated model; normalization is in the weights; aux BNs are gone; the model
card and RobustBench's model_info are written. Every method's run exports (AFA stage I as a stock
model with one BN branch, stage II as the fused model with its weight generator) and the exported
model gives the run's logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision import models as tv_models

from advfeat.checkpoint import load_checkpoint
from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.eval.loading import load_run, rebuild_model
from advfeat.export import (
    NORMALIZE_KEYS,
    build_exported,
    deployable,
    load_exported,
    load_exported_state,
    save_weights,
)
from advfeat.methods.registry import METHODS
from advfeat.models import build_model
from advfeat.norm import AdaptiveFeatureAlignment, BranchModel, MultiBatchNorm, convert_multibn
from helpers import one_epoch_train_args

DATA = "{n_train: 64, n_test: 16, image_size: 32}"


def _perturb_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, different in every branch (so a wrong branch shows)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            assert m.running_var is not None
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            for aux in getattr(m, "aux", {}).values():
                aux.running_mean.add_(1.0)


@pytest.fixture(scope="module")
def advprop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    args = one_epoch_train_args(run, DATA, 32, method="advprop", model="torchvision:resnet18")
    assert main([*args, "--set", "method_options.steps=1"]) == 0
    return run


def test_exported_torchvision_run_round_trips_into_stock_resnet18(
    advprop_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    code = main(["export", str(advprop_run), "--format", "state_dict,safetensors,torchscript"])
    assert code == 0
    code = main(["export", str(advprop_run), "--out", str(out), "--robustbench"])
    assert code == 0
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    evaluated = load_run(advprop_run / "checkpoint.pt").model.eval()
    with torch.no_grad():
        expected = evaluated(x)
    info = json.loads((out / "export.json").read_text())
    assert info["architecture"]["cifar_stem"] is True
    for name in ("model.pt", "model.safetensors"):
        state = load_exported_state(advprop_run / "export" / name)
        assert not any(".aux." in k for k in state)  # the main branch only
        mean, std = state.pop("normalize.mean"), state.pop("normalize.std")
        assert torch.allclose(mean.flatten(), torch.tensor(info["mean"]))
        stock = tv_models.resnet18(num_classes=8)  # plain torchvision, as the card says
        stock.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        stock.maxpool = nn.Identity()
        stock.load_state_dict(state)  # strict: the architecture's own keys
        with torch.no_grad():
            assert torch.equal(stock.eval()((x - mean) / std), expected)
    scripted = torch.jit.load(str(advprop_run / "export" / "model.torchscript.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(x), expected, atol=1e-5)
    model_info = json.loads((out / "model_info.json").read_text())
    assert model_info["number_forward_passes"] == 1
    assert model_info["architecture"] == "torchvision:resnet18"
    metrics = json.loads((advprop_run / "metrics.json").read_text())
    assert model_info["clean_acc"] == f"{100 * metrics['clean_acc']:.2f}"
    card = (out / "MODEL_CARD.md").read_text()
    assert "normalize.mean" in card and "torch" in card and "advprop" in card


def test_exported_cifar_resnet_loads_with_its_normalization(tmp_path: Path) -> None:
    model = build_model("resnet20", num_classes=5, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    convert_multibn(model, ("clean", "adv"))
    _perturb_bn(model)
    deployed = deployable(model)
    assert not any(isinstance(m, MultiBatchNorm) for m in deployed.modules())
    path = save_weights(deployed, tmp_path / "model.pt", "state_dict")
    fresh = load_exported(build_model("resnet20", num_classes=5), path)  # default mean/std
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    plain = build_model("resnet20", num_classes=5)
    with torch.no_grad():
        plain_state = load_exported_state(path)
        plain_state.pop("normalize.mean"), plain_state.pop("normalize.std")
        plain.load_state_dict(plain_state)
        # without the exported normalization the outputs differ: the buffers matter
        assert not torch.allclose(plain.eval()(x), model(x))


def test_exported_timm_model_loads_into_stock_timm(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm", reason="timm is an optional extra")
    model = build_model("timm:resnet10t", num_classes=4, mean=0.4, std=0.3)
    convert_multibn(model, ("clean", "adv"))
    _perturb_bn(model, seed=3)
    path = save_weights(deployable(model), tmp_path / "model.pt", "state_dict")
    state = load_exported_state(path)
    mean, std = state.pop("normalize.mean"), state.pop("normalize.std")
    stock = timm.create_model("resnet10t", num_classes=4)
    stock.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(stock.eval()((x - mean) / std), model.eval()(x))


def test_robustbench_contract_images_in_unit_range_logits_out(
    advprop_run: Path, tmp_path: Path
) -> None:
    """What ``robustbench.eval.benchmark`` calls: ``model(x)`` on [0, 1] images, logits out."""
    assert (
        main(["export", str(advprop_run), "--format", "torchscript", "--out", str(tmp_path)]) == 0
    )
    scripted = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = scripted(x)
    assert logits.shape == (5, 8)
    assert not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))  # not probabilities


def test_export_errors_are_one_line(advprop_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(advprop_run), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "export format" in err and "state_dict" in err and "\n" not in err
    for args in ([], [str(advprop_run), "--checkpoint", str(advprop_run)]):  # none, or twice
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "give the run to export once" in err and "\n" not in err


def test_export_takes_the_run_as_eval_does(advprop_run: Path, tmp_path: Path) -> None:
    """``--checkpoint RUN`` (eval's spelling) exports what ``RUN`` does."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["export", str(advprop_run / "checkpoint.pt"), "--out", str(a)]) == 0
    assert (
        main(["export", "--checkpoint", str(advprop_run / "checkpoint.pt"), "--out", str(b)]) == 0
    )
    first, second = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------- every method's run
TINY_RUN = ["--model", "resnet20", "--dataset", "shapes", "--epochs", "1", "--batch-size", "16"]
TINY_RUN += ["--device", "cpu", "--quiet", "--set", "eval_shifted=false"]
TINY_RUN += ["--set", "max_steps_per_epoch=1"]
TINY_RUN += ["--set", "dataset_options={n_train: 32, n_test: 16, image_size: 8}"]
# options that keep each method's run tiny; a method not named here trains with its defaults
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "pgd-at": {"steps": 1},
    "trades": {"steps": 1},
    "mart": {"steps": 1},
    "advprop": {"steps": 1},
    "alfa": {"steps": 1},
    "l-alfa": {"steps": 1},
    "afan": {"steps": 1},
    "advbn": {"steps": 1},
    "afa": {"num_branches": 3, "steps": 1},
}
STAGED = {"afa": ("afa-stage1", "afa-stage2")}  # methods whose stages export differently
CASES = [case for name in METHODS.names() for case in STAGED.get(name, (name,))]
FUSED_CASES = {"afa-stage2"}  # not a stock architecture: exported as what it is


def _method_options(case: str, train: Callable[..., Path]) -> tuple[str, dict[str, Any]]:
    """The method and tiny options of ``case`` (``afa-stage2`` reads a stage-I run, ``advbn``
    fine-tunes a standard one)."""
    method, _, stage = case.partition("-stage")
    options = dict(TINY_OPTIONS.get(method, {}))
    if stage:
        options["stage"] = int(stage)
    if stage == "2":
        options["stage1_checkpoint"] = str(train("afa-stage1") / "checkpoint.pt")
    if method == "advbn":
        options["init_checkpoint"] = str(train("standard") / "checkpoint.pt")
    return method, options


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_run(case, **options)``: the folder of a one-step resnet20 run of ``case`` (a method
    name, or ``afa-stage1`` / ``afa-stage2``), trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def train(case: str, **extra: Any) -> Path:
        key = case + (json.dumps(extra, sort_keys=True) if extra else "")
        if key not in done:
            method, options = _method_options(case, train)
            folder = root / f"{case}-{len(done)}"
            args = ["train", "--method", method, "--out", str(folder), *TINY_RUN]
            args += ["--set", f"method_options={json.dumps({**options, **extra})}"]
            assert main(args) == 0
            done[key] = folder
        return done[key]

    return train


def _run_logits(run: Path, x: torch.Tensor) -> torch.Tensor:
    """The logits of the run's evaluated model (``advfeat eval``'s), in eval mode."""
    with torch.no_grad():
        return rebuild_model(run / "checkpoint.pt").model.eval()(x)


def _export(run: Path, out: Path, *extra: str) -> None:
    """``advfeat export`` of ``run`` into ``out`` in every format."""
    args = ["export", str(run), "--out", str(out), "--format", "state_dict,safetensors,torchscript"]
    assert main([*args, *extra]) == 0


IMAGES = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("case", CASES)
def test_every_method_exports_a_model_giving_its_runs_logits(
    case: str, tiny_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tiny_run(case)
    expected = _run_logits(run, IMAGES)
    capsys.readouterr()
    _export(run, tmp_path)
    printed = capsys.readouterr().out
    info = json.loads((tmp_path / "export.json").read_text())
    assert f"contents: {info['contents']['summary']}" in printed  # it says what it exported
    with torch.no_grad():
        loaded = build_exported(tmp_path)  # export.json's architecture + model.pt
        assert torch.allclose(loaded(IMAGES), expected, atol=1e-6)
        scripted = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
        assert torch.allclose(scripted(IMAGES), expected, atol=1e-5)
    state = load_exported_state(tmp_path / "model.pt")
    safetensors_state = load_exported_state(tmp_path / "model.safetensors")
    assert state.keys() == safetensors_state.keys()
    assert all(torch.equal(state[k], safetensors_state[k]) for k in state)
    if case in FUSED_CASES:
        assert info["contents"]["kind"] == "afa-stage2"
        assert isinstance(loaded, AdaptiveFeatureAlignment)
        normalize_keys = {f"model.{k}" for k in NORMALIZE_KEYS}
        assert normalize_keys <= state.keys()
        assert state.keys() - normalize_keys == loaded.state_dict().keys()
        return
    assert info["contents"]["kind"] == "stock"
    stock = build_model("resnet20", num_classes=info["architecture"]["num_classes"])
    assert state.keys() - set(NORMALIZE_KEYS) == stock.state_dict().keys()  # its own keys
    load_exported(stock, tmp_path / "model.pt")  # as the model card says: strict
    with torch.no_grad():
        assert torch.allclose(stock.eval()(IMAGES), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("eval_branch", "kept", "dropped"), [(0, "eps0", "eps2"), (-1, "eps2", "eps0")]
)
def test_afa_stage1_exports_the_stock_model_of_its_evaluated_branch_and_names_it(
    eval_branch: int,
    kept: str,
    dropped: str,
    tiny_run: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tiny_run("afa-stage1", eval_branch=eval_branch) if eval_branch else tiny_run("afa-stage1")
    capsys.readouterr()
    _export(run, tmp_path)
    printed = capsys.readouterr().out
    contents = json.loads((tmp_path / "export.json").read_text())["contents"]
    assert contents["bn_branch"] == kept
    assert contents["bn_branches"] == ["eps0", "eps1", "eps2"]
    assert f"BN branch {kept}" in contents["summary"] and contents["summary"] in printed
    assert contents["summary"] in (tmp_path / "MODEL_CARD.md").read_text()
    raw = rebuild_model(run / "checkpoint.pt").raw_model.eval()
    with torch.no_grad():
        exported = build_exported(tmp_path)(IMAGES)
        assert torch.allclose(exported, BranchModel(raw, kept)(IMAGES), atol=1e-6)
        assert not torch.allclose(exported, BranchModel(raw, dropped)(IMAGES), atol=1e-4)


def test_afa_stage2_exports_the_fused_model_and_says_what_it_holds(
    tiny_run: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tiny_run("afa-stage2")
    capsys.readouterr()
    _export(run, tmp_path, "--robustbench")
    printed = capsys.readouterr().out
    info = json.loads((tmp_path / "export.json").read_text())
    contents = info["contents"]
    summary = contents["summary"]
    assert summary in printed and summary in (tmp_path / "MODEL_CARD.md").read_text()
    assert "not a stock" in summary and "weight generator" in summary
    assert "BN_0 = branch eps0" in summary and "BN_K-1 = branch eps2" in summary
    afa = contents["afa"]
    assert {k: afa[k] for k in ("first", "last", "source", "per_layer")} == {
        "first": "eps0",
        "last": "eps2",
        "source": "layer1",  # §4.3: the end of the first stage, the default
        "per_layer": False,
    }
    assert afa["prefix_weight"] == 0.5  # the stem's BN runs before layer1
    assert afa["generator"]["in_channels"] == 16 and afa["generator"]["out_features"] == 1
    model_info = json.loads((tmp_path / "model_info.json").read_text())
    assert "weight generator" in model_info["architecture"]
    # the stock backbone's keys, each BN layer as BN_0 (first) and BN_K-1 (last), and the generator
    state = load_exported_state(tmp_path / "model.pt")
    stock = build_model("resnet20", num_classes=info["architecture"]["num_classes"])
    backbone = {k.removeprefix("model.") for k in state if k.startswith("model.")}
    merged = {k.replace(".first.", ".").replace(".last.", ".") for k in backbone}
    assert merged == stock.state_dict().keys() | set(NORMALIZE_KEYS)
    assert any(k.startswith("generator.") for k in state)
    assert all(k.startswith(("model.", "generator.")) for k in state)
    stage1 = load_checkpoint(tiny_run("afa-stage1") / "checkpoint.pt")["model"]
    fused = [k for k in backbone if ".first." in k or ".last." in k]
    assert fused
    for key in fused:
        branch_key = key.replace(".first.", ".").replace(".last.", ".aux.eps2.")
        assert torch.equal(state[f"model.{key}"], stage1[branch_key]), key


def test_afa_stage2_export_rebuilds_a_per_layer_generator_reading_an_intermediate_module(
    tiny_run: Callable[..., Path], tmp_path: Path
) -> None:
    options = {"generator_source": "layer1", "generator_per_layer": True, "prefix_weight": 0.25}
    run = tiny_run("afa-stage2", generator_channels=8, **options)
    assert main(["export", str(run), "--out", str(tmp_path)]) == 0
    contents = json.loads((tmp_path / "export.json").read_text())["contents"]
    afa = contents["afa"]
    assert (afa["source"], afa["per_layer"], afa["prefix_weight"]) == ("layer1", True, 0.25)
    assert afa["generator"]["in_channels"] == 16 and afa["generator"]["channels"] == 8
    assert afa["generator"]["out_features"] == afa["fused_layers"] > 1
    assert "the output of module 'layer1'" in contents["summary"]
    with torch.no_grad():
        assert torch.allclose(build_exported(tmp_path)(IMAGES), _run_logits(run, IMAGES), atol=1e-6)


def test_build_exported_without_weights_says_which_formats_it_reads(
    tiny_run: Callable[..., Path], tmp_path: Path
) -> None:
    args = ["export", str(tiny_run("standard")), "--out", str(tmp_path), "--format", "torchscript"]
    assert main(args) == 0
    with pytest.raises(AdvfeatError, match="state_dict or safetensors") as err:
        build_exported(tmp_path)
    assert "\n" not in str(err.value)
