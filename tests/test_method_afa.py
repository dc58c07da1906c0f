"""AFA (Wang et al., Adaptive Feature Alignment for Adversarial Training): stages I and II."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import yaml
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import advfeat.methods.afa as afa_module
from advfeat.checkpoint import load_checkpoint, save_checkpoint
from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.afa import AFA, strength_grid
from advfeat.norm import (
    AdaptiveFeatureAlignment,
    FusedDualBN,
    MultiBatchNorm,
    afa_branches,
    convert_multibn,
    use_branch,
)
from helpers import input_bn_net

BRANCHES = afa_branches(3)
GRID_255 = (0.0, 4.0, 8.0)  # K = 3, doubling grid up to 8/255
STATS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- helpers
def pattern(like: Tensor) -> Tensor:
    """A fixed perturbation direction in [0, 1) of one image's shape (not a constant shift,
    which train-mode BN would normalise away)."""
    return torch.rand(like.shape[1:], generator=torch.Generator().manual_seed(7))


def perturbed(x: Tensor, eps_255: float) -> Tensor:
    return x + eps_255 / 255 * pattern(x)


class FakeAttack:
    """Stands in for ``pixel_attack``: records its arguments, returns x + ε_i·P (per sample)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, net: nn.Module, x: Tensor, y: Tensor, **kw: Any) -> Tensor:
        self.calls.append({"x": x.clone(), **kw})
        return x + kw["eps"].view(-1, 1, 1, 1) * pattern(x)


@pytest.fixture
def fake_attack(monkeypatch: pytest.MonkeyPatch) -> FakeAttack:
    fake = FakeAttack()
    monkeypatch.setattr(afa_module, "pixel_attack", fake)
    return fake


@pytest.fixture
def seeded() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def branch_layer(layer: nn.Module, branch: str) -> _BatchNorm:
    """Branch ``branch`` of a converted BN layer (the layer itself holds the main branch)."""
    assert isinstance(layer, MultiBatchNorm)
    return cast(_BatchNorm, layer if branch == BRANCHES[0] else layer.aux[branch])


def branch_stats(model: nn.Module, branch: str) -> dict[str, Tensor]:
    return {
        f"{name}.{key}": getattr(branch_layer(m, branch), key).clone()
        for name, m in model.named_modules()
        if isinstance(m, MultiBatchNorm)
        for key in STATS
    }


def randomise_branches(model: nn.Module) -> None:
    """Give every branch of every BN layer its own statistics and affine parameters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiBatchNorm):
                for branch in BRANCHES:
                    bn = branch_layer(m, branch)
                    n = bn.num_features
                    bn.load_state_dict(
                        {
                            "running_mean": 0.3 * torch.randn(n, generator=g),
                            "running_var": 0.5 + torch.rand(n, generator=g),
                            "weight": 1 + 0.3 * torch.randn(n, generator=g),
                            "bias": 0.3 * torch.randn(n, generator=g),
                        },
                        strict=False,
                    )


def write_stage1(path: Path, model: nn.Module, **options: Any) -> str:
    config = {"method": "afa", "method_options": {"num_branches": 3, **options}}
    save_checkpoint(path, {"config": config, "model": model.state_dict()})
    return str(path)


def stage1_model(seed: int = 0) -> nn.Module:
    model = input_bn_net(seed)
    convert_multibn(model, BRANCHES)
    randomise_branches(model)
    return model


def stage2(tmp_path: Path, **options: Any) -> tuple[AFA, AdaptiveFeatureAlignment, nn.Module]:
    """Stage-II method and model built from a stage-I checkpoint, and that stage-I model."""
    first = stage1_model()
    path = write_stage1(tmp_path / "stage1.pt", first)
    method = build_method("afa", stage=2, num_branches=3, stage1_checkpoint=path, **options)
    fused = method.prepare(input_bn_net(seed=1))  # other init: the weights come from the file
    assert isinstance(method, AFA) and isinstance(fused, AdaptiveFeatureAlignment)
    return method, fused, first.eval()


# hand formulas of the base objectives (Madry Eq. 2.1, TRADES §4, MART §3.3)
def log_softmax(z: Tensor) -> Tensor:
    return z - z.logsumexp(dim=1, keepdim=True)


def hand_ce(z: Tensor, y: Tensor) -> Tensor:
    return -log_softmax(z).gather(1, y[:, None]).mean()


def hand_kl(clean: Tensor, adv: Tensor) -> Tensor:
    lp, lq = log_softmax(clean), log_softmax(adv)
    return (lp.exp() * (lp - lq)).sum(dim=1)


def hand_bce(z: Tensor, y: Tensor) -> Tensor:
    q = log_softmax(z).exp()
    runner_up = q.scatter(1, y[:, None], 0.0).max(dim=1).values
    return -q.gather(1, y[:, None]).squeeze(1).log() - (1 - runner_up).log()


def hand_term(base: str, clean: Tensor, adv: Tensor, y: Tensor) -> Tensor:
    if base == "pgd-at":
        return hand_ce(adv, y)
    if base == "trades":
        return 2.0 * hand_kl(clean, adv).mean()
    p_true = log_softmax(clean).exp().gather(1, y[:, None]).squeeze(1)
    return (hand_bce(adv, y) + 3.0 * hand_kl(clean, adv) * (1 - p_true)).mean()


# --------------------------------------------------------------------------- strength grid
def test_strength_grid_defaults_to_the_papers_strengths() -> None:
    assert strength_grid(5, 8.0) == (0.0, 1.0, 2.0, 4.0, 8.0)  # Tables 1-4, K = 5
    assert strength_grid(5, 8.0, "linear") == (0.0, 2.0, 4.0, 6.0, 8.0)
    assert build_method("afa").grid_255 == (0.0, 1.0, 2.0, 4.0, 8.0)
    grid = build_method("afa", num_branches=3, eps_grid_255=[0, 3, 5]).grid_255
    assert grid == (0.0, 3.0, 5.0)


# --------------------------------------------------------------------------- stage I
@pytest.mark.parametrize(
    ("base", "options", "clean_in_adv_branches"),
    [
        ("pgd-at", {}, None),
        ("mart", {}, None),
        ("trades", {}, None),
        ("trades", {"clean_reference": "own-branch"}, "after"),  # eval-mode attack: ref later
        ("trades", {"clean_reference": "own-branch", "attack_bn_mode": "train"}, "before"),
    ],
)
def test_stage1_routes_each_strength_to_its_own_branch(
    base: str,
    options: dict[str, Any],
    clean_in_adv_branches: str | None,
    fake_attack: FakeAttack,
    tiny_batch: tuple[Tensor, Tensor],
) -> None:
    x, y = tiny_batch
    method = build_method("afa", base=base, num_branches=3, routing="split", **options)
    model = method.prepare(input_bn_net())
    initial = copy.deepcopy(model)
    model.train()
    method(model, x, y)

    (call,) = fake_attack.calls  # one attack for all branches, chunk k at strength ε_k
    eps = torch.tensor([GRID_255[1]] * 32 + [GRID_255[2]] * 32) / 255
    assert torch.allclose(call["eps"], eps) and torch.allclose(call["alpha"], eps / 4)
    assert torch.equal(call["x"], x.repeat(2, 1, 1, 1))
    for k, branch in enumerate(BRANCHES):
        expected = copy.deepcopy(initial).train()  # branch k alone, on its own samples only
        with use_branch(expected, branch), torch.no_grad():
            inputs = [perturbed(x, GRID_255[k])]
            if k > 0 and clean_in_adv_branches == "after":
                inputs = [inputs[0], x]
            elif k > 0 and clean_in_adv_branches == "before":
                inputs = [x, inputs[0]]
            for batch in inputs:
                expected(batch)
        got, want = branch_stats(model, branch), branch_stats(expected, branch)
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-6), (branch, key)
        # the first BN sees the images: its running mean is 0.9·0 + 0.1·mean(x + ε_k·P)
        if clean_in_adv_branches is None:
            mean = 0.1 * (x.mean(dim=(0, 2, 3)) + GRID_255[k] / 255 * pattern(x).mean(dim=(1, 2)))
            assert torch.allclose(got["bn_in.running_mean"], mean, atol=1e-6)
            assert int(got["bn_in.num_batches_tracked"]) == 1


@pytest.mark.parametrize("base", ["pgd-at", "trades", "mart"])
def test_stage1_split_and_separate_routing_are_the_same_step(
    base: str, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    """One split pass over the K−1 strengths = one pass per branch: loss, gradients, statistics."""
    x, y = tiny_batch
    start = input_bn_net()
    runs = []
    for routing in ("split", "separate"):
        method = build_method(
            "afa", base=base, num_branches=3, steps=2, random_start="none", routing=routing
        )
        model = method.prepare(copy.deepcopy(start)).train()
        out = method(model, x, y)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out.loss.detach(), grads, copy.deepcopy(model.state_dict())))
    (loss, grads, state), (loss2, grads2, state2) = runs
    torch.testing.assert_close(loss2, loss)
    assert grads.keys() == grads2.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, rtol=1e-4, atol=1e-6, msg=name)
    for key, value in state.items():
        torch.testing.assert_close(state2[key].float(), value.float(), msg=key)


def test_stage1_real_attack_stays_within_each_branchs_strength(
    tiny_batch: tuple[Tensor, Tensor],
) -> None:
    x, y = tiny_batch
    method = build_method("afa", num_branches=3, steps=2)
    model = method.prepare(input_bn_net()).train()
    method(model, x, y)
    clean_mean = 0.1 * x.mean(dim=(0, 2, 3))
    for k, branch in enumerate(BRANCHES):
        moved = branch_stats(model, branch)["bn_in.running_mean"] - clean_mean
        assert moved.abs().max() <= 0.1 * GRID_255[k] / 255 + 1e-6  # x′_k in the ε_k-ball
        assert (k == 0) == bool(moved.abs().max() < 1e-7)  # and really perturbed for k ≥ 1


@pytest.mark.parametrize("base", ["pgd-at", "trades", "mart"])
def test_stage1_loss_is_clean_ce_plus_each_branchs_base_term(
    base: str, fake_attack: FakeAttack, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    grid = [0.0, 64.0, 128.0]  # strong enough for a KL far above float round-off
    method = build_method(
        "afa", base=base, num_branches=3, eps_grid_255=grid, trades_beta=2.0, mart_lambda=3.0
    )
    model = method.prepare(input_bn_net())
    reference = copy.deepcopy(model).train()
    out = method(model.train(), x, y)

    with use_branch(reference, BRANCHES[0]):
        clean = reference(x)
    expected = hand_ce(clean, y)
    terms = {}
    for k in (1, 2):
        with use_branch(reference, BRANCHES[k]):
            terms[k] = hand_term(base, clean, reference(perturbed(x, grid[k])), y)
        expected = expected + terms[k]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["loss_clean"] == pytest.approx(hand_ce(clean, y).item(), rel=1e-5)
    assert out.logs["loss_adv_eps2"] == pytest.approx(terms[2].item(), rel=1e-4)
    assert terms[2].item() > 1e-4  # a real adversarial term, not round-off
    assert out.logits is not None and torch.allclose(out.logits, clean, atol=1e-6)


def test_base_objective_selection_changes_the_loss(
    fake_attack: FakeAttack, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    losses = {}
    for base in ("pgd-at", "trades", "mart"):
        method = build_method("afa", base=base, num_branches=3)
        losses[base] = method(method.prepare(input_bn_net()).train(), x, y)
    assert len({round(o.loss.item(), 6) for o in losses.values()}) == 3
    assert len({round(o.logs["loss_clean"], 6) for o in losses.values()}) == 1  # same clean CE
    no_kl = build_method("afa", base="trades", num_branches=3, trades_beta=0.0)
    out = no_kl(no_kl.prepare(input_bn_net()).train(), x, y)
    assert out.loss.item() == pytest.approx(out.logs["loss_clean"], rel=1e-6)  # β = 0: CE only


def test_stage1_evaluates_through_the_chosen_branch(tiny_batch: tuple[Tensor, Tensor]) -> None:
    x, _ = tiny_batch
    model = stage1_model().eval()
    for eval_branch, branch in ((0, "eps0"), (-1, "eps2")):
        method = build_method("afa", num_branches=3, eval_branch=eval_branch)
        with use_branch(model, branch):
            expected = model(x)
        assert torch.allclose(method.eval_model(model)(x), expected)


# --------------------------------------------------------------------------- stage II
class Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return x.new_full((x.shape[0], 1), self.value)


def test_stage2_fuses_the_outer_branches_as_in_eq_2(
    tmp_path: Path, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, _ = tiny_batch
    _, fused, first = stage2(tmp_path)
    assert not any("eps1" in key for key in fused.state_dict())  # middle branch dropped
    layer = fused.model.get_submodule("bn_in")
    assert isinstance(layer, FusedDualBN)
    seen: list[Tensor] = []
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    fused.eval()
    _, w0 = fused(x, return_weight=True)
    assert w0.shape == (32,) and bool(((w0 > 0) & (w0 < 1)).all())
    assert torch.allclose(w0, fused.generator(x)[:, 0])  # W_0 = WG(x), Eq. 1

    def bn_by_hand(branch: str) -> Tensor:
        state = branch_layer(first.get_submodule("bn_in"), branch).state_dict()
        mu, var, gamma, beta = (
            state[key].view(1, 3, 1, 1) for key in ("running_mean", "running_var", "weight", "bias")
        )
        return (x - mu) / (var + 1e-5).sqrt() * gamma + beta

    w = w0.view(-1, 1, 1, 1)
    expected = w * bn_by_hand("eps0") + (1 - w) * bn_by_hand("eps2")
    assert torch.allclose(seen[0], expected, atol=1e-5)

    for value, branch in ((1.0, "eps0"), (0.0, "eps2")):  # W_0 = 1 → BN_0, W_0 = 0 → BN_K-1
        fused.generator = Constant(value)
        with use_branch(first, branch):
            assert torch.allclose(fused(x), first(x), atol=1e-5)


def test_stage2_updates_only_the_weight_generator(
    tmp_path: Path, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    method, fused, _ = stage2(tmp_path, steps=2)
    frozen = {k: v.clone() for k, v in fused.model.state_dict().items()}
    generator = [p.detach().clone() for p in fused.generator.parameters()]
    groups = method.parameter_groups(fused, lr=0.5)
    trainable = {id(p) for group in groups for p in group["params"]}
    assert trainable == {id(p) for p in fused.generator.parameters()}
    opt = torch.optim.SGD(groups, lr=0.5, momentum=0.9, weight_decay=5e-4)
    fused.train()
    assert not fused.model.training  # the frozen network stays in eval mode
    for _ in range(2):
        out = method(fused, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    for key, value in fused.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key  # weights and every BN statistic
    after = list(fused.generator.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(generator, after, strict=True))
    assert 0 < out.logs["w0_mean"] < 1 and set(out.logs) >= {"loss_adv", "eps_mean_255"}


@pytest.mark.parametrize("strengths", ["uniform", "grid"])
def test_stage2_trains_on_random_unknown_strengths_with_the_classification_loss(
    strengths: str, tmp_path: Path, fake_attack: FakeAttack, seeded: None
) -> None:
    method, fused, _ = stage2(tmp_path, stage2_strengths=strengths)
    g = torch.Generator().manual_seed(5)
    x, y = (
        0.2 + 0.6 * torch.rand(256, 3, 4, 4, generator=g),
        torch.randint(0, 3, (256,), generator=g),
    )
    reference = copy.deepcopy(fused).train()
    seen: list[Tensor] = []
    fused.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = method(fused.train(), x, y)

    (call,) = fake_attack.calls
    eps, x_in = call["eps"], seen[-1]  # the model only ever sees the perturbed images
    assert torch.allclose(call["alpha"], eps / 4) and call["loss"] == "ce"
    delta, direction = (x_in - x).flatten(1), pattern(x).flatten()
    row_eps = delta @ direction / (direction @ direction)  # x_in = x + ε_i·P row by row
    assert torch.allclose(delta, row_eps[:, None] * direction, atol=1e-6)
    attacked = row_eps > 1e-9
    assert torch.allclose(row_eps[attacked], eps, atol=1e-6)
    assert torch.equal(call["x"], x[attacked])
    eps_255 = eps * 255
    if strengths == "uniform":  # ε ~ U[0, ε_K-1] per sample
        assert bool(attacked.all()) and float(eps_255.max()) <= 8.0 + 1e-5
        assert float(eps_255.min()) < 0.5 and float(eps_255.max()) > 7.5
        assert float(eps_255.mean()) == pytest.approx(4.0, abs=0.6)
    else:  # ε drawn from the stage-I grid, clean samples pass unattacked
        assert 0 < int(attacked.sum()) < 256
        assert sorted({round(float(v)) for v in eps_255}) == [4, 8]
    assert out.logs["eps_mean_255"] == pytest.approx(float(row_eps.mean()) * 255, rel=1e-4)
    expected = hand_ce(reference(x_in), y)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_stage2_checkpoint_problems_raise_clear_errors(tmp_path: Path) -> None:
    model = stage1_model()
    other = tmp_path / "standard.pt"
    save_checkpoint(other, {"config": {"method": "standard"}, "model": model.state_dict()})
    cases: list[tuple[str, dict[str, Any], str]] = [
        (str(other), {}, "trained with method 'standard'"),
        (write_stage1(tmp_path / "k3.pt", model), {"num_branches": 5}, "K=3"),
        (write_stage1(tmp_path / "s2.pt", model, stage=2), {}, "stage-2 run"),
        (
            write_stage1(tmp_path / "g.pt", model, eps_max_255=16.0),
            {},
            "pass the stage-1 run's num_branches",
        ),
    ]
    for path, options, message in cases:
        options = {"num_branches": 3, **options}
        method = build_method("afa", stage=2, stage1_checkpoint=path, **options)
        with pytest.raises(AdvfeatError, match=message):
            method.prepare(input_bn_net())
    wide = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5))
    fit = build_method("afa", stage=2, num_branches=3, stage1_checkpoint=cases[1][0])
    with pytest.raises(AdvfeatError, match="does not fit this run's model"):
        fit.prepare(wide)
    source = build_method(
        "afa", stage=2, num_branches=3, stage1_checkpoint=cases[1][0], generator_source="con"
    )
    with pytest.raises(AdvfeatError, match="did you mean 'conv'"):
        source.prepare(input_bn_net())


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_branch": 3}, "did you mean 'num_branches'"),
        ({"stage": 3}, r"stage must be an integer in \[1, 2\]"),
        ({"base": "trade"}, "did you mean 'trades'"),
        ({"num_branches": 1}, "num_branches"),
        ({"eps_grid_255": [0, 4]}, "one strength per BN branch"),
        ({"num_branches": 3, "eps_grid_255": [1, 2, 4]}, "must start at 0"),
        ({"num_branches": 3, "eps_grid_255": [0, 4, 4]}, "increase strictly"),
        ({"eps_max_255": 0}, "eps_max_255"),
        ({"grid_spacing": "log"}, "doubling"),
        ({"alpha_ratio": 0}, "alpha_ratio"),
        ({"steps": 0}, "steps"),
        ({"trades_beta": -1}, "trades_beta"),
        ({"clean_reference": "own"}, "own-branch"),
        ({"stage2_strengths": "random"}, "uniform"),
        ({"eval_branch": 5}, "eval_branch"),
        ({"attack_bn_mode": "keep"}, "eval"),
        ({"prefix_weight": 2}, "prefix_weight"),
        ({"stage1_checkpoint": "run/checkpoint.pt"}, "read in stage 2 only"),
        ({"stage": 2}, "stage 2 needs stage1_checkpoint=PATH"),
        ({"stage": 2, "stage1_checkpoint": "/no/such/checkpoint.pt"}, "does not exist"),
    ],
)
def test_bad_options_raise_clear_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(AdvfeatError, match=message):
        build_method("afa", **options)


# --------------------------------------------------------------------------- CLI, presets
def train(out: Path, options: str) -> int:
    return main(
        [
            "train", "--method", "afa", "--model", "resnet20", "--dataset", "shapes",
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet",
            "--out", str(out),
            "--set", "dataset_options={n_train: 32, n_test: 16, image_size: 8}",
            "--set", "eval_shifted=false",
            "--set", f"method_options={{num_branches: 3, steps: 1, {options}}}",
        ]
    )  # fmt: skip


def test_cli_trains_stage1_then_stage2_from_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path / "s2-alone", "stage: 2") == 2
    assert "stage 2 needs stage1_checkpoint=PATH" in capsys.readouterr().err

    assert train(tmp_path / "s1", "stage: 1") == 0
    row = json.loads((tmp_path / "s1" / "metrics.json").read_text())["history"][0]
    assert {"loss_clean", "loss_adv", "loss_adv_eps1", "loss_adv_eps2"} <= set(row)
    assert row["loss_adv"] == pytest.approx(row["loss_adv_eps1"] + row["loss_adv_eps2"], rel=1e-4)

    stage1 = tmp_path / "s1" / "checkpoint.pt"
    assert train(tmp_path / "s2", f"stage: 2, stage1_checkpoint: {stage1}") == 0
    metrics = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert metrics["method"] == "afa" and 0 <= metrics["clean_acc"] <= 1
    row = metrics["history"][0]
    assert 0 < row["w0_mean"] < 1 and 0 < row["eps_mean_255"] <= 8
    assert math.isfinite(row["train_loss"])

    before = load_checkpoint(stage1)["model"]
    after = load_checkpoint(tmp_path / "s2" / "checkpoint.pt")["model"]
    assert any(key.startswith("generator.") for key in after)
    checked = 0
    for key, value in after.items():  # the network is the stage-I one, untouched by stage II
        if not key.startswith("model."):
            continue
        name = key.removeprefix("model.")
        for part, branch_key in ((".first.", "."), (".last.", ".aux.eps2.")):
            name = name.replace(part, branch_key)
        assert torch.equal(value, before[name]), key
        checked += 1
    assert checked == sum(not k.startswith("generator.") for k in after)


@pytest.mark.parametrize(
    ("preset", "stage", "lr"), [("afa-wrn-stage1", 1, 0.1), ("afa-wrn-stage2", 2, 0.01)]
)
def test_presets_show_config(
    preset: str, stage: int, lr: float, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--preset", preset, "--show-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"] == "afa" and cfg["model"] == "wrn28_10" and cfg["dataset"] == "cifar10"
    assert cfg["method_options"]["stage"] == stage and cfg["lr"] == lr
    if stage == 1:
        assert build_method("afa", **cfg["method_options"]).grid_255 == (0, 1, 2, 4, 8)
    else:  # the stage-II preset needs the stage-I run's checkpoint
        with pytest.raises(AdvfeatError, match="stage1_checkpoint"):
            build_method("afa", **cfg["method_options"])


def test_stage2_generator_reads_the_end_of_the_first_stage_by_default(tmp_path: Path) -> None:
    """§4.3: the generator sits "to the end of an intermediate layer" (``layer1`` of a ResNet);
    the BN layers before it fuse with the fixed W_0 = 0.5, those after it with WG's weight."""
    from advfeat.methods.base import PrepareContext
    from advfeat.models import build_model

    first = build_model("resnet20", num_classes=3, image_size=16)
    convert_multibn(first, BRANCHES)
    randomise_branches(first)
    path = write_stage1(tmp_path / "stage1.pt", first)
    method = build_method("afa", stage=2, num_branches=3, stage1_checkpoint=path)
    resnet = build_model("resnet20", num_classes=3, image_size=16)
    fused = method.prepare_with(resnet, PrepareContext(input_shape=(3, 16, 16)))
    assert isinstance(fused, AdaptiveFeatureAlignment) and fused.source == "layer1"
    assert fused.weights.prefix_weight == 0.5
    fused.generator = Constant(0.9)  # WG's weight, once layer1 has run
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    for name in ("bn1", "layer3.2.bn2"):  # the stem's BN runs before layer1, the last one after
        layer = fused.model.get_submodule(name)
        assert isinstance(layer, FusedDualBN)
        layer.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o)}))
    fused.eval()
    x = torch.rand(4, 3, 16, 16)
    fused(x)
    for name, w in (("bn1", 0.5), ("layer3.2.bn2", 0.9)):
        given, out = seen[name]
        bn0 = branch_layer(first.get_submodule(name), "eps0").eval()(given)
        bn_last = branch_layer(first.get_submodule(name), "eps2").eval()(given)
        torch.testing.assert_close(out, w * bn0 + (1 - w) * bn_last)
    none = build_method(
        "afa", stage=2, num_branches=3, stage1_checkpoint=path, generator_source=None
    )
    assert none.prepare(build_model("resnet20", num_classes=3, image_size=16)).source is None


def test_stage2_generator_probe_runs_on_the_models_device(tmp_path: Path) -> None:
    """Sizing the generator at ``generator_source`` runs the model once on a probe input made on
    the model's device (a model on ``meta`` refuses a CPU input)."""
    from advfeat.methods.base import PrepareContext
    from advfeat.models import build_model

    first = build_model("resnet20", num_classes=3, image_size=16)
    convert_multibn(first, BRANCHES)
    path = write_stage1(tmp_path / "stage1.pt", first)
    with torch.device("meta"):
        model = build_model("resnet20", num_classes=3, image_size=16)
    method = build_method("afa", stage=2, num_branches=3, stage1_checkpoint=path)
    method.context = PrepareContext(input_shape=(3, 16, 16))
    assert method._generator_in_channels(model, "layer1") == 16  # layer1 of a ResNet-20
