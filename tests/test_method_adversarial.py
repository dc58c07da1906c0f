"""Pixel adversarial training: PGD-AT (Madry 2018), TRADES (Zhang 2019), MART (Wang 2020)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import advfeat.methods.adversarial as adversarial
from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.adversarial import (
    boosted_cross_entropy,
    mart_loss,
    pgd_at_loss,
    pixel_attack,
    trades_kl,
    trades_loss,
)

LOGITS_CLEAN = [[2.0, 1.0, 0.0], [0.5, -1.0, 3.0]]
LOGITS_ADV = [[0.0, 1.5, -0.5], [1.0, 0.0, 0.2]]
LABELS = [0, 2]
FAST = {"steps": 2}


# --------------------------------------------------------------------------- hand formulas
def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def hand_ce(z: list[float], y: int) -> float:
    return -math.log(softmax(z)[y])


def hand_kl(clean: list[float], adv: list[float]) -> float:
    p, q = softmax(clean), softmax(adv)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def hand_bce(adv: list[float], y: int) -> float:
    q = softmax(adv)
    runner_up = max(v for k, v in enumerate(q) if k != y)
    return -math.log(q[y]) - math.log(1 - runner_up)


def fixed() -> tuple[Tensor, Tensor, Tensor]:
    return torch.tensor(LOGITS_CLEAN), torch.tensor(LOGITS_ADV), torch.tensor(LABELS)


# --------------------------------------------------------------------------- loss values
def test_pgd_at_loss_is_the_mean_adversarial_cross_entropy() -> None:
    _, adv, y = fixed()
    expected = sum(hand_ce(a, t) for a, t in zip(LOGITS_ADV, LABELS, strict=True)) / 2
    assert pgd_at_loss(adv, y).item() == pytest.approx(expected, rel=1e-6)


def test_trades_kl_and_loss_match_the_hand_formula() -> None:
    clean, adv, y = fixed()
    kls = [hand_kl(c, a) for c, a in zip(LOGITS_CLEAN, LOGITS_ADV, strict=True)]
    assert trades_kl(clean, adv).tolist() == pytest.approx(kls, rel=1e-5)
    ce = sum(hand_ce(c, t) for c, t in zip(LOGITS_CLEAN, LABELS, strict=True)) / 2
    for beta in (0.0, 1.0, 6.0):
        expected = ce + beta * sum(kls) / 2
        assert trades_loss(clean, adv, y, beta).item() == pytest.approx(expected, rel=1e-6)
    assert trades_kl(clean, clean).abs().max().item() < 1e-6  # KL(p ‖ p) = 0


def test_mart_loss_matches_the_hand_formula() -> None:
    clean, adv, y = fixed()
    bces = [hand_bce(a, t) for a, t in zip(LOGITS_ADV, LABELS, strict=True)]
    assert boosted_cross_entropy(adv, y).tolist() == pytest.approx(bces, rel=1e-5)
    for lam in (0.0, 5.0, 6.0):
        per_sample = [
            bce + lam * hand_kl(c, a) * (1 - softmax(c)[t])
            for bce, c, a, t in zip(bces, LOGITS_CLEAN, LOGITS_ADV, LABELS, strict=True)
        ]
        expected = sum(per_sample) / 2
        assert mart_loss(clean, adv, y, lam).item() == pytest.approx(expected, rel=1e-6)


def test_boosted_cross_entropy_stays_finite_where_the_naive_log_breaks() -> None:
    adv = torch.tensor([[0.0, 100.0, -100.0]])  # runner-up probability rounds to 1 in float32
    y = torch.tensor([0])
    naive = -torch.log(1 - F.softmax(adv, 1)[0, 1])
    assert torch.isinf(naive)
    value = boosted_cross_entropy(adv, y).item()
    # −log p_0 ≈ 100 and −log(1 − p_1) = −log(p_0 + p_2) ≈ 100
    assert value == pytest.approx(200.0, rel=1e-4)


def test_nothing_is_detached_in_the_trades_and_mart_objectives() -> None:
    """Autograd matches finite differences in both logits (incl. MART's weight 1 − p_y(x))."""
    clean, adv, y = fixed()
    clean64 = clean.double().requires_grad_()
    adv64 = adv.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda c, a: mart_loss(c, a, y, 6.0), (clean64, adv64))
    assert torch.autograd.gradcheck(lambda c, a: trades_loss(c, a, y, 6.0), (clean64, adv64))
    (grad_clean,) = torch.autograd.grad(mart_loss(clean64, adv64, y, 6.0), clean64)
    assert grad_clean.abs().sum() > 0


# --------------------------------------------------------------------------- attacks
def test_trades_attack_maximises_the_kl_to_the_clean_prediction(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model = copy.deepcopy(trained_tiny_model).eval()
    x, y = tiny_batch
    clean = model(x).detach()
    eps = 8 / 255
    torch.manual_seed(0)
    x_adv = pixel_attack(
        model,
        x,
        y,
        eps=eps,
        alpha=2 / 255,
        steps=5,
        loss="kl",
        clean_logits=clean,
        random_start="normal",
    )
    start = x + 0.001 * torch.randn_like(x)
    with torch.no_grad():
        kl_adv = trades_kl(clean, model(x_adv)).mean().item()
        kl_start = trades_kl(clean, model(start.clamp(0, 1))).mean().item()
    assert kl_adv > 20 * max(kl_start, 1e-8)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    with pytest.raises(AdvfeatError, match="clean logits"):
        pixel_attack(model, x, y, eps=eps, alpha=eps, steps=1, loss="kl")


def test_normal_random_start_is_a_small_gaussian(trained_tiny_model: nn.Module) -> None:
    x = torch.full((16, 3, 8, 8), 0.5)
    y = torch.zeros(16, dtype=torch.long)
    torch.manual_seed(0)
    x0 = pixel_attack(
        trained_tiny_model, x, y, eps=8 / 255, alpha=1 / 255, steps=0, random_start="normal"
    )
    assert (x0 - x).std().item() == pytest.approx(0.001, rel=0.05)
    uniform = pixel_attack(trained_tiny_model, x, y, eps=8 / 255, alpha=1 / 255, steps=0)
    assert (uniform - x).abs().max().item() > 0.9 * 8 / 255


class AttackSpy:
    """Records every call of ``pixel_attack`` and the BN mode the network ran in meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.bn_training: list[bool] = []
        real = adversarial.pixel_attack

        def spy(net: nn.Module, x: Tensor, y: Tensor, **kw: Any) -> Tensor:
            bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
            hook = bns[0].register_forward_hook(lambda m, i, o: self.bn_training.append(m.training))
            try:
                out = real(net, x, y, **kw)
            finally:
                hook.remove()
            self.calls.append({"x_adv": out, **kw})
            return out

        monkeypatch.setattr(module, "pixel_attack", spy)


@pytest.mark.parametrize(
    ("name", "loss", "start", "bn_mode", "stat_updates"),
    [
        ("pgd-at", "ce", "uniform", "train", 1),
        ("trades", "kl", "normal", "eval", 2),
        ("mart", "ce", "normal", "eval", 2),
    ],
)
def test_each_method_uses_its_papers_attack_and_loss(
    name: str,
    loss: str,
    start: str,
    bn_mode: str,
    stat_updates: int,
    make_tiny_bn_cnn: Callable[..., nn.Module],
    tiny_batch: tuple[Tensor, Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = AttackSpy(monkeypatch, adversarial)
    x, y = tiny_batch
    model = make_tiny_bn_cnn().train()
    method = build_method(name, **FAST)
    bn = model.block1[1]
    tracked = int(bn.num_batches_tracked)
    eval_logits = copy.deepcopy(model).eval()(x).detach()
    torch.manual_seed(0)
    out = method(model, x, y)

    (call,) = spy.calls
    assert (call["loss"], call["random_start"], call["bn_mode"]) == (loss, start, bn_mode)
    assert call["eps"] == pytest.approx(8 / 255 if name == "pgd-at" else 0.031)
    assert set(spy.bn_training) == {bn_mode == "train"}
    if name == "trades":  # the KL target is f(x) in the attack's (eval) BN mode
        torch.testing.assert_close(call["clean_logits"], eval_logits)
    # only the training forwards move BN statistics, never the attack
    assert int(bn.num_batches_tracked) == tracked + stat_updates

    x_adv = call["x_adv"]
    assert (x_adv - x).abs().max().item() <= call["eps"] + 1e-6
    logits_clean, logits_adv = model(x), model(x_adv)  # train mode: batch statistics
    expected = {
        "pgd-at": lambda: pgd_at_loss(logits_adv, y),
        "trades": lambda: trades_loss(logits_clean, logits_adv, y, 6.0),
        "mart": lambda: mart_loss(logits_clean, logits_adv, y, 6.0),
    }[name]()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, logits_clean.detach(), rtol=1e-5, atol=1e-6)
    assert {"loss_clean", "loss_adv"} <= set(out.logs)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.logs.values())


def test_trades_in_train_mode_reuses_the_training_clean_logits_as_target(
    make_tiny_bn_cnn: Callable[..., nn.Module],
    tiny_batch: tuple[Tensor, Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = AttackSpy(monkeypatch, adversarial)
    x, y = tiny_batch
    model = make_tiny_bn_cnn().train()
    out = build_method("trades", attack_bn_mode="train", **FAST)(model, x, y)
    assert set(spy.bn_training) == {True}
    assert out.logits is not None
    torch.testing.assert_close(spy.calls[0]["clean_logits"], out.logits.detach())


def test_pgd_at_without_clean_logging_runs_no_clean_pass(
    make_tiny_bn_cnn: Callable[..., nn.Module], tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    model = make_tiny_bn_cnn().train()
    calls: list[int] = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = build_method("pgd-at", log_clean=False, **FAST)(model, x, y)
    assert out.logits is None and set(out.logs) == {"loss_adv"}
    assert len(calls) == FAST["steps"] + 1  # attack steps + the adversarial training forward


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["pgd-at", "trades", "mart"])
def test_cli_trains_end_to_end(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    code = main(
        [
            "train", "--method", name, "--model", "resnet20", "--dataset", "shapes",
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet",
            "--out", str(out),
            "--set", "dataset_options={n_train: 16, n_test: 16, image_size: 8}",
            "--set", "eval_shifted=false",
            "--set", "method_options.steps=1",
        ]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == name and 0 <= metrics["clean_acc"] <= 1
    row = metrics["history"][0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["loss_adv"])


# --------------------------------------------------------------------------- options, presets
@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("trades", {"bta": 1.0}, "did you mean 'beta'"),
        ("mart", {"lamda": 1.0}, "did you mean 'lam'"),
        ("pgd-at", {"eps": 8}, r"eps must be a number in \(0, 1\]"),
        ("pgd-at", {"alpha": 0}, "alpha"),
        ("pgd-at", {"steps": 0}, "steps"),
        ("trades", {"beta": -1}, "beta"),
        ("mart", {"lam": -1}, "lam"),
        ("mart", {"random_start": "gaussian"}, "uniform"),
        ("trades", {"attack_bn_mode": "keep"}, "eval"),
    ],
)
def test_bad_options_raise_clear_errors(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(AdvfeatError, match=message):
        build_method(name, **options)


@pytest.mark.parametrize(
    ("preset", "method"),
    [("pgd-at-cifar", "pgd-at"), ("trades-cifar", "trades"), ("mart-cifar", "mart")],
)
def test_presets_show_config_and_build(
    preset: str, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--preset", preset, "--show-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"] == method and cfg["dataset"] == "cifar10"
    built = build_method(method, **cfg["method_options"])
    assert built.opts.eps == pytest.approx(8 / 255, abs=1e-3)
