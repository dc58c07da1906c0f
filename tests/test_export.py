"""``advfeat export``: exported weights load into a fresh torchvision / timm / CIFAR model and give
the logits of the evaluated model; normalization is in the weights; aux BNs are gone; the model
card and RobustBench's model_info are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tv_models

from advfeat.cli import main
from advfeat.eval.loading import load_run
from advfeat.export import deployable, load_exported, load_exported_state, save_weights
from advfeat.models import build_model
from advfeat.norm import MultiBatchNorm, convert_multibn

DATA = "dataset_options={n_train: 64, n_test: 16, image_size: 32}"


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
    args = ["train", "--method", "advprop", "--model", "torchvision:resnet18", "--dataset"]
    args += ["shapes", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet"]
    args += ["--out", str(run), "--set", DATA, "--set", "eval_shifted=false"]
    args += ["--set", "method_options.steps=1"]
    assert main(args) == 0
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
