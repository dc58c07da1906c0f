"""The readings that the evidence chooses between: loss weighting, the gradient path of L_adv,
L-ALFA's exact skipping of zero-strength sites, its default sites, method training recipes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from advfeat.attacks.feature import MultiSiteFeaturePGD
from advfeat.cli import main
from advfeat.data.transforms import random_crop_flip
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.feature_aug import (
    combine_losses,
    multi_site_outputs,
    spread_blocks,
    stage_blocks,
)
from advfeat.methods.l_alfa import LALFA
from advfeat.models import build_model
from advfeat.tasks import ClassificationTask
from helpers import random_batch

ALPHA = 0.05
SITES = ["block1", "block2"]


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------- loss weighting
def test_combine_losses_sum_and_mean_are_the_stated_formulas() -> None:
    clean = torch.tensor(1.0)
    adv = [torch.tensor(2.0), torch.tensor(4.0), torch.tensor(6.0)]
    total, adv_sum = combine_losses(clean, adv, lam=0.5, weighting="sum")
    assert total.item() == pytest.approx(1.0 + 0.5 * 12.0) and adv_sum.item() == 12.0
    total, _ = combine_losses(clean, adv, lam=1.0, weighting="mean")
    assert total.item() == pytest.approx((1.0 + 12.0) / 4)  # (L_clean + Σ L_adv) / (1 + n)
    total, _ = combine_losses(clean, adv, lam=0.5, weighting="mean")
    assert total.item() == pytest.approx((1.0 + 6.0) / 2.5)  # weights sum to one
    with pytest.raises(AdvfeatError, match="loss_weighting"):
        combine_losses(clean, adv, lam=1.0, weighting="average")


@pytest.mark.parametrize("name", ["alfa", "afan"])
def test_mean_weighting_divides_the_papers_sum(tiny_bn_cnn: nn.Module, name: str) -> None:
    x, y = random_batch()
    k = {"afan": {"k": 3}, "alfa": {}}[name]
    n_adv = 3 if name == "afan" else 1
    torch.manual_seed(0)
    summed = build_method(name, site="block2", alpha=ALPHA, loss_weighting="sum", **k)(
        copy.deepcopy(tiny_bn_cnn), x, y
    )
    torch.manual_seed(0)
    method = build_method(name, site="block2", alpha=ALPHA, loss_weighting="mean", **k)
    mean = method(copy.deepcopy(tiny_bn_cnn), x, y)
    assert summed.loss.item() == pytest.approx(
        summed.logs["loss_clean"] + summed.logs["loss_adv"], rel=1e-6
    )
    assert mean.loss.item() == pytest.approx(summed.loss.item() / (1 + n_adv), rel=1e-5)


# ------------------------------------------------------------------------ gradient path
@pytest.mark.parametrize("name", ["alfa", "afan", "l-alfa"])
def test_tail_only_reading_gives_the_prefix_exactly_the_clean_gradient(
    tiny_bn_cnn: nn.Module, name: str
) -> None:
    """adv_grad="tail": L_adv trains only the layers after the site (released ALFA code)."""
    x, y = random_batch()
    opts = {"sites": ["block2"]} if name == "l-alfa" else {"site": "block2"}
    model = copy.deepcopy(tiny_bn_cnn).train()
    method = build_method(name, alpha=ALPHA, adv_grad="tail", loss_weighting="sum", **opts)
    method.prepare(model)
    out = method(model, x, y)
    out.loss.backward()
    got = grads(model)
    reference = copy.deepcopy(tiny_bn_cnn).train()
    F.cross_entropy(reference(x), y).backward()
    want = grads(reference)
    prefix = [n for n in want if n.startswith("block1")]
    assert prefix
    for n in prefix:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    # the layers after the site do get L_adv's gradient
    assert not torch.allclose(got["fc.weight"], want["fc.weight"])
    # and the papers' reading sends L_adv into the prefix too
    full_model = copy.deepcopy(tiny_bn_cnn).train()
    full = build_method(name, alpha=ALPHA, loss_weighting="sum", **opts)
    full.prepare(full_model)
    full(full_model, x, y).loss.backward()
    assert not torch.allclose(grads(full_model)["block1.0.weight"], want["block1.0.weight"])


# ---------------------------------------------------------------- L-ALFA zero-η skipping
@pytest.mark.parametrize("mode", ["joint", "separate"])
@pytest.mark.parametrize("weighting", ["sum", "mean"])
def test_zero_strength_sites_are_skipped_with_the_same_loss_and_gradients(
    tiny_bn_cnn: nn.Module, mode: str, weighting: str
) -> None:
    x, y = random_batch()
    eta = torch.tensor([0.0, 1.0])
    model = copy.deepcopy(tiny_bn_cnn).train()
    method = LALFA(
        sites=SITES,
        alpha=ALPHA,
        steps=2,
        gamma=0.5,
        multi_site=mode,
        loss_weighting=weighting,
        projection="simplex",  # γ‖η‖₁ taken as γ·1ᵀη, as the reference below writes it
    )
    with torch.no_grad():
        method.eta.copy_(eta)
    out = method(model, x, y)
    out.loss.backward()

    # the same objective computed without skipping: every site attacked and passed
    ref = copy.deepcopy(tiny_bn_cnn).train()
    eta_ref = eta.clone().requires_grad_(True)
    clean = ClassificationTask().clean_pass(ref, x, y, SITES)
    logits, feats = clean.logits, clean.features
    atk = MultiSiteFeaturePGD(ref, SITES, alpha=ALPHA, steps=2, mode=mode, bn_mode="train")
    deltas = atk(x, y, features={s: f.detach() for s, f in feats.items()}, strengths=eta)
    assert float(deltas["block1"].abs().max()) == 0.0  # η = 0: the attack does not move δ
    outputs = multi_site_outputs(atk, clean, deltas, features=feats, strengths=eta_ref)
    expected = F.cross_entropy(logits, y) + sum(F.cross_entropy(o, y) for o in outputs)
    if weighting == "mean":  # the skipped site still counts in 1 + n
        expected = expected / (1 + len(outputs))
    expected = expected + 0.5 * eta_ref.sum()
    expected.backward()

    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert method.eta.grad is not None and eta_ref.grad is not None
    torch.testing.assert_close(method.eta.grad, eta_ref.grad, rtol=1e-5, atol=1e-6)
    got, want = grads(model), grads(ref)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


def test_gamma_does_not_densify_eta_on_the_simplex(tiny_bn_cnn: nn.Module) -> None:
    """With the true simplex γ‖η‖₁ is constant: a zero strength stays zero under γ alone."""
    model = copy.deepcopy(tiny_bn_cnn).train()
    method = LALFA(sites=SITES, alpha=ALPHA, steps=1, lam=0.0, gamma=1.0, projection="simplex")
    with torch.no_grad():
        method.eta.copy_(torch.tensor([0.0, 1.0]))
    opt = torch.optim.SGD(method.parameter_groups(model, lr=0.1), lr=0.1)
    x, y = random_batch()
    out = method(model, x, y)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    method.project_strengths_()
    torch.testing.assert_close(method.eta.detach(), torch.tensor([0.0, 1.0]))


def test_l_alfa_default_sites_are_nine_spread_blocks() -> None:
    r20 = build_model("resnet20", num_classes=3, image_size=8)
    assert spread_blocks(r20, 9) == stage_blocks(r20)  # ResNet-20 has exactly 9 blocks
    r56 = build_model("resnet56", num_classes=3, image_size=8)
    assert len(stage_blocks(r56)) == 27
    expected = [f"layer{s}.{b}" for s in (1, 2, 3) for b in (2, 5, 8)]
    assert spread_blocks(r56, 9) == expected  # dim(η) = 9 (ALFA Table 8), each stage's last kept
    method = build_method("l-alfa")
    method.prepare(r56)
    assert method.eta_sites == expected and method.opts.multi_site == "joint"
    every = build_method("l-alfa", num_sites=None)
    every.prepare(build_model("resnet56", num_classes=3, image_size=8))
    assert every.eta_sites is not None and len(every.eta_sites) == 27


# --------------------------------------------------------------------------- recipes
def _config(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["train", *args, "--show-config"]) == 0
    return dict(yaml.safe_load(capsys.readouterr().out))


def test_every_method_trains_under_one_schedule_unless_a_recipe_is_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No recipe mixes into a preset's schedule: ``--method afan`` and ``--method standard`` get
    the same schedule, and ``--recipe`` replaces every schedule key at once."""
    schedule = ("schedule", "milestones", "gamma", "warmup_epochs", "warmup_steps")
    for base in ((), ("--preset", "default")):
        afan = _config(capsys, *base, "--method", "afan")
        standard = _config(capsys, *base, "--method", "standard")
        assert {k: afan[k] for k in schedule} == {k: standard[k] for k in schedule}
    # the recipe is whole: the default preset's 0.5-epoch warm-up does not survive beside it
    for method in ("afan", "standard"):
        cfg = _config(capsys, "--preset", "default", "--method", method, "--recipe", "afan")
        assert cfg["schedule"] == "multistep" and cfg["milestones"] == [0.25, 0.75]
        assert cfg["warmup_steps"] == 200 and cfg["warmup_epochs"] == 0  # ALFA §4.1 / A-FAN S2.1
    assert _config(capsys, "--method", "alfa", "--recipe", "paper")["warmup_steps"] == 200
    preset = _config(capsys, "--preset", "afan-resnet20-cifar10")  # a paper preset is whole too
    assert preset["warmup_epochs"] == 0.57 and preset["warmup_steps"] == 0  # 200 of 352 steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "afan", "--recipe", "afan", "--set", "schedule=cosine"), "cannot be mixed"),
        (("--method", "standard", "--recipe", "paper"), "standard declares no paper recipe"),
        (("--method", "standard", "--recipe", "afn"), "unknown --recipe method 'afn'"),
        (
            ("--method", "afan", "--recipe", "afan", "--dataset", "shapes-det", "--model",
             "fasterrcnn_mobilenet_v3_large_fpn"),
            "no paper recipe",
        ),
    ],
)  # fmt: skip
def test_recipe_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    assert main(["train", *args, "--show-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_warmup_past_the_first_step_decay_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """200 warm-up steps at 2 steps per epoch end at epoch 100, after the first decay at 1/4 of
    8 epochs: the rate would jump from the ramp to lr/10. Refused before anything is written."""
    args = [
        "train", "--method", "standard", "--epochs", "8", "--batch-size", "32",
        "--set", "schedule=multistep", "--set", "milestones=[0.25, 0.75]",
        "--set", "warmup_steps=200",
        "--set", "dataset_options={n_train: 64, n_test: 32, image_size: 16}",
        "--out", str(tmp_path / "run"), "--quiet",
    ]  # fmt: skip
    assert main(args) == 2
    assert not (tmp_path / "run").exists()


def test_the_schedule_a_run_trained_with_is_printed_and_recorded(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import json

    args = [
        "train", "--method", "standard", "--epochs", "2", "--batch-size", "32",
        "--set", "dataset_options={n_train: 64, n_test: 32, image_size: 16}",
        "--set", "schedule=multistep", "--set", "milestones=[0.5]", "--set", "warmup_steps=1",
        "--set", "eval_shifted=false", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(args) == 0
    said = "lr 0.1, multistep ×0.1 at epochs 1 of 2, linear warm-up over 1 steps (0.5 epochs)"
    assert f"schedule: {said}" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["schedule"] == said


def test_afan_default_is_a_setting_the_paper_ran() -> None:
    opts = build_method("afan").opts
    assert opts.steps == 1 and opts.alpha == pytest.approx(1.0 / 255)  # Fig. S5: PGD-1, 1/255
    assert opts.k == 3 and opts.loss_weighting == "sum"  # Eq. 7; docs/results.md §10


# ------------------------------------------------------------------- reflect padding
def test_reflect_padding_crop_mirrors_the_border() -> None:
    image = torch.arange(1, 3 * 6 * 6 + 1, dtype=torch.float32).reshape(3, 6, 6)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out = random_crop_flip(image, padding=2, flip=False, padding_mode="reflect", generator=g)
        g = torch.Generator().manual_seed(seed)
        dy = int(torch.randint(-2, 3, (), generator=g))
        dx = int(torch.randint(-2, 3, (), generator=g))
        padded = F.pad(image[None], (2, 2, 2, 2), mode="reflect")[0]
        torch.testing.assert_close(out, padded[:, 2 + dy : 8 + dy, 2 + dx : 8 + dx])
        assert out.min() > 0  # no zero fill
    with pytest.raises(AdvfeatError, match="padding_mode"):
        random_crop_flip(image, padding_mode="wrap")


def test_warmup_steps_are_optimiser_steps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """warmup_steps=4 with 2 steps per epoch warms up over the first 2 epochs."""
    import json

    args = [
        "train", "--method", "standard", "--epochs", "3", "--batch-size", "32", "--lr", "0.1",
        "--set", "dataset_options={n_train: 64, n_test: 32, image_size: 16}",
        "--set", "schedule=constant", "--set", "warmup_steps=4", "--set", "eval_shifted=false",
        "--out", str(tmp_path / "run"), "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    lrs = [row["lr"] for row in history]
    assert lrs[0] < lrs[1] < 0.1 and lrs[2] == pytest.approx(0.1)


def test_l_alfa_projects_onto_the_papers_written_set() -> None:
    """Eq. 5: P = {η | 1ᵀη = 1}; the simplex (the "bisection" reading) is the option."""
    method = build_method("l-alfa", sites=["a", "b"])
    assert method.opts.projection == "hyperplane"
    with torch.no_grad():
        method.eta.copy_(torch.tensor([1.5, -0.1]))
    method.project_strengths_()
    torch.testing.assert_close(method.eta.detach(), torch.tensor([1.3, -0.3]))


@pytest.mark.parametrize(("name", "n_adv"), [("afan", 3), ("alfa", 1)])
def test_the_convex_combination_is_the_sum_at_a_scaled_learning_rate(
    tiny_bn_cnn: nn.Module, name: str, n_adv: int
) -> None:
    """With SGD (momentum, coupled weight decay), (L_clean + λΣL_adv)/(1 + λn) at (lr, wd) takes
    the same steps as the sum at (lr/(1 + λn), wd·(1 + λn)): the two readings differ only by the
    learning rate, which is why docs/results.md compares them at matched rates."""
    scale = 1.0 + n_adv
    runs = {}
    for weighting, lr, wd in (("mean", 0.1, 5e-4), ("sum", 0.1 / scale, 5e-4 * scale)):
        model = copy.deepcopy(tiny_bn_cnn).train()
        method = build_method(name, site="block2", loss_weighting=weighting, alpha=ALPHA)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        torch.manual_seed(0)  # the same random strengths in both runs
        for step in range(3):
            x, y = random_batch(seed=step)
            opt.zero_grad()
            method(model, x, y).loss.backward()
            opt.step()
        runs[weighting] = model.state_dict()
    for key, value in runs["mean"].items():
        torch.testing.assert_close(runs["sum"][key], value, rtol=1e-4, atol=1e-6)
