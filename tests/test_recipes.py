"""The common changes of docs/architecture.md, each done here as ONE new piece of code (a method,
an evaluation suite, a BN class, a norm family) and run through the public entry points."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.attacks import FGSM
from advfeat.cli import main
from advfeat.data import build_dataset
from advfeat.errors import AdvfeatError
from advfeat.eval import evaluate, suite_names
from advfeat.eval.context import EvalContext
from advfeat.eval.suites import SUITES, chosen_suites, options_of, register_suite
from advfeat.methods import METHODS, Method, MethodOutput, build_method, register_method
from advfeat.norm import (
    can_have_branches,
    frozen_bn_statistics,
    is_batchnorm_like,
    register_norm_family,
    unregister_norm_family,
)
from advfeat.norm.stats import _BATCHNORM_CLASSES, register_batchnorm_class
from advfeat.options import Number, option
from advfeat.tasks import batchnorm_eval

TINY = "dataset_options={n_train: 32, n_test: 16, image_size: 16}"


# ------------------------------------------------------------------------- recipe 1: a method
@pytest.fixture
def label_noise_method() -> Iterator[type[Method]]:
    @register_method
    class LabelNoise(Method):
        """Cross-entropy against labels smoothed by ``smoothing`` (a toy method)."""

        name = "recipe-label-noise"
        paper = "docs/architecture.md, recipe 1"

        @dataclass
        class Options:
            smoothing: float = option(0.1, Number(low=0, high=1, high_open=True))

        def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.opts.smoothing)
            return MethodOutput(loss=loss, logits=logits, logs=self.detach_logs(loss_clean=loss))

    yield LabelNoise
    METHODS.remove("recipe-label-noise")


def test_recipe_new_method_is_one_class(
    label_noise_method: type[Method], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    method = build_method("recipe-label-noise", smoothing=0.2)
    assert isinstance(method, label_noise_method) and method.opts.smoothing == 0.2
    with pytest.raises(
        AdvfeatError, match=r"recipe-label-noise: smoothing must be a number in \[0, 1\)"
    ):
        build_method("recipe-label-noise", smoothing=1.5)
    args = ["train", "--method", "recipe-label-noise", "--epochs", "1", "--out", str(tmp_path)]
    args += ["--set", TINY, "--set", "eval_shifted=false", "--set", "max_steps_per_epoch=1"]
    args += ["--batch-size", "16", "--model", "resnet20"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "recipe-label-noise" and 0 <= metrics["clean_acc"] <= 1
    assert main(["methods"]) == 0
    assert "recipe-label-noise" in capsys.readouterr().out


# -------------------------------------------------------------------------- recipe 2: a suite
def _margin_section(result: dict[str, Any], _task: str) -> list[str]:
    return [f"Mean logit margin {result['margin']:.4f} on {result['n']} images.", ""]


def _margin_plot(results: dict[str, Any], path: Path) -> Path | None:
    margin = results.get("suites", {}).get("recipe-margin")
    if margin is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"margin {margin['margin']}")  # a stand-in for a figure
    return path


@pytest.fixture
def margin_suite() -> Iterator[str]:
    @register_suite(
        "recipe-margin",
        "mean margin between the true logit and the largest other one",
        order=15,
        title="Logit margin",
        report=_margin_section,
        plots={"recipe_margin": _margin_plot},
    )
    def run(ctx: EvalContext) -> dict[str, Any]:
        dataset = ctx.test_set()
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])  # type: ignore[arg-type]
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]
        with torch.no_grad():
            logits = ctx.model(x.to(ctx.device)).cpu()
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return {"margin": float((true - other).mean()), "n": len(y)}

    yield "recipe-margin"
    SUITES.remove("recipe-margin")


def test_recipe_new_suite_is_one_registration(margin_suite: str, tmp_path: Path) -> None:
    assert suite_names().index("attacks") < suite_names().index(margin_suite)
    assert suite_names().index(margin_suite) < suite_names().index("corruptions")
    assert margin_suite not in suite_names("detection")
    with pytest.raises(AdvfeatError, match="does not apply to detection"):
        chosen_suites([margin_suite], "detection")
    bundle = build_dataset("shapes", n_train=16, n_test=8, image_size=16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, bundle.num_classes))
    out = tmp_path / "eval.json"
    results = evaluate(model, bundle, suites=["clean", margin_suite], out=out)
    margin = results["suites"][margin_suite]
    assert margin["n"] == 8 and margin["margin"] == pytest.approx(margin["margin"])
    saved = json.loads(out.read_text())
    assert saved["suites"][margin_suite] == margin
    report = out.with_suffix(".md").read_text()
    assert f"## Logit margin\n\nMean logit margin {margin['margin']:.4f} on 8 images." in report
    assert report.index("## Clean") < report.index("## Logit margin")
    plot = tmp_path / "eval_plots" / "recipe_margin.png"
    assert plot.read_text() == f"margin {margin['margin']}"
    assert saved["plots"]["recipe_margin"] == "eval_plots/recipe_margin.png"


# ------------------------------------------------------------------ recipe 3: a BN class
class ScaleNorm(nn.Module):
    """A model family's own batch norm (not a torch subclass): per-channel batch statistics in
    training, running ones in evaluation, updated only if ``training and track_running_stats``."""

    def __init__(self, channels: int, momentum: float = 0.5) -> None:
        super().__init__()
        self.momentum = momentum
        self.track_running_stats = True
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            if self.track_running_stats:
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()


@pytest.fixture
def registered_scale_norm() -> Iterator[type[nn.Module]]:
    before = list(_BATCHNORM_CLASSES)
    yield register_batchnorm_class(ScaleNorm)
    _BATCHNORM_CLASSES[:] = before


def _conv_net_with(norm: Callable[[int], nn.Module]) -> nn.Module:
    """conv, ``norm`` of its 4 channels, ReLU, pool, linear; seeded: the same weights each time."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def test_recipe_bn_class_is_one_registration(registered_scale_norm: type[nn.Module]) -> None:
    model = _conv_net_with(ScaleNorm).train()
    norm = model[1]
    assert is_batchnorm_like(norm)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    before = norm.running_mean.clone()
    with frozen_bn_statistics(model):
        model(x)
    assert torch.equal(norm.running_mean, before) and norm.track_running_stats
    FGSM(model, eps=8 / 255, bn_mode="train")(x, y)  # attacks freeze its statistics too
    assert torch.equal(norm.running_mean, before)
    with batchnorm_eval(model):  # dense tasks: BN layers evaluate with running statistics
        assert not norm.training and model[0].training
    assert norm.training
    model(x)  # a plain training forward still updates them
    assert not torch.equal(norm.running_mean, before)


def test_an_unregistered_bn_class_is_not_recognised() -> None:
    model = _conv_net_with(ScaleNorm).train()
    assert not is_batchnorm_like(model[1])
    before = model[1].running_mean.clone()
    with frozen_bn_statistics(model):
        model(torch.rand(8, 3, 8, 8))
    assert not torch.equal(model[1].running_mean, before)  # why the registration is needed


# ------------------------------------------------------- recipe 4: a new norm family, one call
class GainOnlyNorm(nn.Module):
    """A toy per-sample norm over the channels of (N, C, H, W): x / RMS_C(x) · gain."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        scale = x.pow(2).mean(1, keepdim=True).add(1e-6).rsqrt()
        return x * scale * self.gain[:, None, None]


@pytest.fixture
def registered_gain_norm() -> Iterator[type[nn.Module]]:
    yield register_norm_family(GainOnlyNorm, owned=("affine",))
    unregister_norm_family("GainOnlyNorm")


def test_recipe_norm_family_is_one_registration(registered_gain_norm: type[nn.Module]) -> None:
    stock = _conv_net_with(GainOnlyNorm).eval()
    assert can_have_branches(stock[1]) and not is_batchnorm_like(stock[1])
    method = build_method("advprop", steps=1, eps=2.0)
    model = method.prepare(copy.deepcopy(stock)).train()
    assert "1.aux.adv.gain" in model.state_dict()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(method.parameter_groups(model, lr=0.1), lr=0.1)
    out = method(model, x, y)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(model[1].gain, model[1].aux["adv"].gain)  # each branch its own gain
    exported = method.eval_model(model)
    assert list(exported.state_dict()) == list(stock.state_dict())


def test_an_unregistered_norm_class_gets_no_branches() -> None:
    assert not can_have_branches(_conv_net_with(GainOnlyNorm)[1])
    with pytest.raises(AdvfeatError, match="register_norm_family"):
        build_method("advprop").prepare(_conv_net_with(GainOnlyNorm))


# ------------------------------------------------------------ recipe: a feature-space method
@pytest.fixture
def two_scales_method() -> Iterator[type[Method]]:
    from advfeat.attacks.precision import add_perturbation
    from advfeat.methods.feature_aug import (
        AdversarialFeature,
        FeatureAugmentation,
        SiteOptions,
        perturbation_size,
    )
    from advfeat.tasks import TaskPass

    @register_method
    class TwoScales(FeatureAugmentation):
        """ALFA's perturbation δ and ``scale``·δ, two adversarial features per site (a toy)."""

        name = "recipe-two-scales"
        paper = "docs/architecture.md, recipe: a feature-space method"

        @dataclass
        class Options(SiteOptions):
            scale: float = option(0.5, Number(low=0, low_open=True))

        def perturb(
            self, model: nn.Module, clean: TaskPass, site: str, feature: Tensor, y: Any
        ) -> list[AdversarialFeature]:
            opts = self.opts
            delta = self.feature_attack(model, clean, site, feature, y, opts.alpha, opts.eps)
            size = perturbation_size(delta)
            return [
                AdversarialFeature(add_perturbation(feature, delta, s), s * size)
                for s in (1.0, opts.scale)
            ]

    yield TwoScales
    METHODS.remove("recipe-two-scales")


def test_recipe_new_feature_method_is_one_hook(
    two_scales_method: type[Method], tmp_path: Path
) -> None:
    with pytest.raises(AdvfeatError, match="recipe-two-scales: scale must be a number > 0"):
        build_method("recipe-two-scales", scale=0)
    with pytest.raises(AdvfeatError, match="recipe-two-scales: steps must be"):
        build_method("recipe-two-scales", steps=0)  # a shared option, checked as declared once
    # scale 1 trains twice on ALFA's adversarial feature: twice ALFA's L_adv, the same δ
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).train()  # fmt: skip
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    options = {"site": "2", "alpha": 0.1, "steps": 2, "lam": 0.5}
    toy = build_method("recipe-two-scales", scale=1.0, **options)(copy.deepcopy(model), x, y)
    alfa = build_method("alfa", **options)(copy.deepcopy(model), x, y)
    assert alfa.logs["loss_adv"] > alfa.logs["loss_clean"]  # the attack raised the loss
    assert toy.logs["loss_adv"] == pytest.approx(2 * alfa.logs["loss_adv"], rel=1e-6)
    assert toy.logs["delta_l2"] == pytest.approx(alfa.logs["delta_l2"], rel=1e-6)
    torch.testing.assert_close(toy.loss, alfa.loss + 0.5 * alfa.logs["loss_adv"])
    # trained through the public entry point, with the shared options set by name
    args = ["train", "--method", "recipe-two-scales", "--epochs", "1", "--out", str(tmp_path)]
    args += ["--set", TINY, "--set", "eval_shifted=false", "--set", "max_steps_per_epoch=2"]
    args += ["--set", "method_options={scale: 0.25, steps: 1}"]
    args += ["--batch-size", "16", "--model", "resnet20"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "recipe-two-scales" and 0 <= metrics["clean_acc"] <= 1
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert {"loss_adv", "delta_l2"} <= set(history[0].split(","))


# ------------------------------------------------------- recipe 2b: a suite with its own options
@pytest.fixture
def contrast_suite() -> Iterator[str]:
    @dataclass
    class ContrastOptions:
        factor: float = option(0.5, Number(low=0, low_open=True))

    @register_suite(
        "recipe-contrast",
        "accuracy on test images whose contrast is scaled by `factor`",
        order=16,
        title="Low contrast",
        options=ContrastOptions,
    )
    def run(ctx: EvalContext) -> dict[str, Any]:
        opts = options_of(ctx.config, "recipe-contrast")
        right = n = 0
        for x, y in ctx.batches(ctx.test_set()):
            x = 0.5 + opts.factor * (x - 0.5)
            with torch.no_grad():
                right += int((ctx.model(x).argmax(1) == y).sum())
            n += int(y.shape[0])
        return {"factor": opts.factor, "accuracy": right / n, "n": n}

    yield "recipe-contrast"
    SUITES.remove("recipe-contrast")


def test_recipe_suite_with_options_is_one_file(
    contrast_suite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = build_dataset("shapes", n_train=16, n_test=8, image_size=16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, bundle.num_classes))
    default = evaluate(model, bundle, suites=[contrast_suite])
    dotted = evaluate(model, bundle, suites=[contrast_suite], **{f"{contrast_suite}.factor": 0.25})
    section = evaluate(model, bundle, suites=[contrast_suite], **{contrast_suite: {"factor": 0.25}})
    assert default["suites"][contrast_suite]["factor"] == 0.5
    assert dotted["suites"] == section["suites"] and dotted["resume_key"] == section["resume_key"]
    assert dotted["suites"][contrast_suite]["factor"] == 0.25
    assert dotted["config"]["suite_options"][contrast_suite] == {"factor": 0.25}
    assert default["resume_key"] != dotted["resume_key"]  # --resume never mixes the two
    with pytest.raises(AdvfeatError, match="recipe-contrast: factor must be a number"):
        evaluate(model, bundle, suites=[contrast_suite], **{f"{contrast_suite}.factor": -1})
    with pytest.raises(AdvfeatError, match="did you mean 'factor'"):
        evaluate(model, bundle, suites=[contrast_suite], **{f"{contrast_suite}.factr": 1})
    run_dir = tmp_path / "run"
    args = ["train", "--method", "standard", "--epochs", "1", "--out", str(run_dir)]
    args += ["--set", TINY, "--set", "eval_shifted=false", "--set", "max_steps_per_epoch=1"]
    assert main([*args, "--batch-size", "16", "--model", "resnet20", "--quiet"]) == 0
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out)]
    args += ["--suite", contrast_suite, "--set", f"{contrast_suite}.factor=0.25"]
    assert main([*args, "--no-plots", "--quiet", "--device", "cpu"]) == 0
    saved = json.loads(out.read_text())
    assert saved["suites"][contrast_suite]["factor"] == 0.25
    assert saved["suites"][contrast_suite]["n"] == 16
    assert main([*args, "--force", "--set", f"{contrast_suite}.factor=0"]) == 2
    assert "recipe-contrast: factor must be a number" in capsys.readouterr().err
