"""Trainer options users expect: AdamW, an EMA of the weights (evaluated and saved), fp16 with a
GradScaler (CUDA only), a determinism switch, SyncBN per branch under DDP, and ``--import`` for a
user's own registered model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from advfeat.checkpoint import load_checkpoint
from advfeat.cli import main
from advfeat.eval.loading import load_run
from advfeat.norm import MultiBatchNorm, convert_multibn, use_branch
from advfeat.plugins import ENV_VAR
from advfeat.train.ema import ModelEMA
from advfeat.train.optim import build_optimizer
from advfeat.train.runtime import set_deterministic, sync_batchnorm

QUICK = ["--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet"]
QUICK += ["--set", "dataset_options={n_train: 48, n_test: 16, image_size: 16}"]
QUICK += ["--set", "eval_shifted=false", "--set", "max_steps_per_epoch=2"]


def _train(out: Path, *extra: str, model: str = "resnet20") -> int:
    args = ["train", "--method", "standard", "--model", model, "--dataset", "shapes"]
    return main([*args, *QUICK, "--out", str(out), *extra])


def test_adamw_is_built_with_its_betas_and_decoupled_decay(tmp_path: Path) -> None:
    p = nn.Parameter(torch.ones(3))
    opt = build_optimizer("adamw", [p], lr=0.1, weight_decay=0.5, betas=[0.8, 0.9])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    p.grad = torch.zeros(3)
    opt.step()  # zero gradient: only the decoupled decay acts, p ← p·(1 − lr·wd)
    assert torch.allclose(p.detach(), torch.full((3,), 0.95))
    assert _train(tmp_path / "run", "--set", "optimizer=adamw") == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert "exp_avg_sq" in next(iter(state["optimizer"]["state"].values()))


def test_an_sgd_only_group_option_under_adamw_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = nn.Parameter(torch.ones(3))
    build_optimizer("sgd", [{"params": [p], "momentum": 0.0}], lr=0.1, weight_decay=0.0)
    eta_without_momentum = ["--set", "method_options.eta_momentum=0"]
    assert _train(tmp_path / "run", "--method", "l-alfa", "--set", "optimizer=adamw",
                  *eta_without_momentum) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "sets momentum" in err and "optimizer=sgd" in err and "\n" not in err


def test_ema_update_and_the_run_evaluates_the_average(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    ema = ModelEMA(model, 0.9)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * model.weight)
    assert _train(tmp_path / "run", "--set", "ema_decay=0.5") == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert set(state["ema"]) == set(state["model"])
    key = "fc.weight"
    assert not torch.equal(state["ema"][key], state["model"][key])
    loaded = load_run(tmp_path / "run" / "checkpoint.pt")
    assert torch.equal(loaded.model.state_dict()[key], state["ema"][key])
    assert "moving average" in loaded.info["weights"]


def test_ema_averages_every_float_tensor_and_copies_integer_buffers() -> None:
    """Three steps of the fused update equal decay·ema + (1 − decay)·value tensor by tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEMA(model, 0.8)
    expected = {k: v.clone() for k, v in ema.model.state_dict().items()}
    for _ in range(3):
        model.train()(torch.randn(2, 3, 5, 5))  # moves the BN buffers
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.update(model)
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[key] = 0.8 * expected[key] + 0.2 * value
            else:
                expected[key] = value.clone()
    for key, value in ema.model.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert int(ema.model[1].num_batches_tracked) == 3


def test_fp16_needs_cuda_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is allowed")
    assert _train(tmp_path / "run", "--set", "amp_dtype=float16") == 2
    err = capsys.readouterr().err.strip()
    assert "float16" in err and "CUDA" in err and "\n" not in err
    assert _train(tmp_path / "run2", "--set", "optimizer=lion") == 2
    assert "adamw" in capsys.readouterr().err


def test_deterministic_switch_sets_torch_flags() -> None:
    was = torch.are_deterministic_algorithms_enabled()
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.deterministic = False


def test_sync_bn_converts_every_branch_and_keeps_routing(make_tiny_bn_cnn) -> None:  # type: ignore[no-untyped-def]
    model = convert_multibn(make_tiny_bn_cnn(), ("clean", "adv")).eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad(), use_branch(model, "adv"):
        expected = model(x)
    synced = sync_batchnorm(model)
    layers = [m for m in synced.modules() if isinstance(m, MultiBatchNorm)]
    assert layers and all(isinstance(m, nn.SyncBatchNorm) for m in layers)
    assert all(isinstance(a, nn.SyncBatchNorm) for m in layers for a in m.aux.values())
    with torch.no_grad(), use_branch(synced, "adv"):
        assert torch.equal(synced(x), expected)
    plain = sync_batchnorm(make_tiny_bn_cnn())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())


USER_MODULE = """
from torch import nn
from advfeat.models import MODELS, Normalize


def user_tiny_net(num_classes, *, mean, std):
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


if "user-tiny-net" not in MODELS:
    MODELS.add("user-tiny-net", user_tiny_net)
"""


def test_import_makes_a_user_model_work_in_train_and_eval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_VAR, "")  # restored after the test
    user = tmp_path / "my_models.py"
    user.write_text(USER_MODULE)
    run = tmp_path / "run"
    assert _train(run, "--import", str(user), model="user-tiny-net") == 0
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--suite", "clean", "--quiet"]
    args += ["--no-plots", "--out", str(out)]
    assert main(["--import", str(user), *args]) == 0
    assert out.is_file()
    assert main(["--import", str(tmp_path / "missing.py"), *args]) == 2
    assert "no such file" in capsys.readouterr().err
