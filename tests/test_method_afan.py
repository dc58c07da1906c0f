"""A-FAN (Chen et al. 2021): k rescaled strengths, adversarial feature normalization (Eq. 6),
objective L_clean + λ·Σ_i L_adv^(i) (Eq. 7), tail-only attack, ablation switches, presets."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from advfeat.attacks.feature import FeaturePGD, sample_strengths
from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.afan import AFAN
from advfeat.methods.feature_aug import (
    AdversarialFeatureNormalization,
    adversarial_feature_normalization,
    feature_moments,
)
from advfeat.models import build_model
from advfeat.presets import load_preset, preset_names
from advfeat.sites import SiteSplit
from helpers import count_calls, random_batch

ALPHA = 2 / 255


def tail_of(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The part of TinyBNCNN after ``block1``, written by hand."""
    return lambda f: model.fc(model.pool(model.block2(f)).flatten(1))


def hand_sign_step(model: nn.Module, f: Tensor, y: Tensor, alpha: float) -> Tensor:
    """One unbounded sign step on the feature (A-FAN Eq. 2-3 on a feature, PGD-1)."""
    delta = torch.zeros_like(f, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(tail_of(model)(f.detach() + delta), y), delta)
    return alpha * grad.sign()


# --------------------------------------------------------------------------- Eq. 6
def test_feature_moments_match_a_hand_computation_per_channel_and_position() -> None:
    f = torch.arange(24, dtype=torch.float64).reshape(2, 3, 2, 2).sin() * 3
    mu, sigma = feature_moments(f, "channel", eps=0.0)
    for c in range(3):
        values = [float(v) for v in f[:, c].flatten()]
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / len(values)  # biased, as batch norm
        assert mu[0, c, 0, 0].item() == pytest.approx(m, abs=1e-12)
        assert sigma[0, c, 0, 0].item() == pytest.approx(math.sqrt(var), abs=1e-12)
    mu_p, sigma_p = feature_moments(f, "positional", eps=0.0)
    assert mu_p.shape == (2, 1, 2, 2)
    values = [float(f[1, c, 0, 1]) for c in range(3)]
    m = sum(values) / 3
    assert mu_p[1, 0, 0, 1].item() == pytest.approx(m, abs=1e-12)
    var = sum((v - m) ** 2 for v in values) / 3
    assert sigma_p[1, 0, 0, 1].item() == pytest.approx(math.sqrt(var), abs=1e-12)


def test_eq6_by_hand_and_mixed_feature_carries_adversarial_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    adv = 2.0 * clean + 0.5 * torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) + 1.0
    eps = 1e-5
    mix = adversarial_feature_normalization(clean, adv, "channel", eps)
    for c in range(3):
        fc, fa = clean[:, c], adv[:, c]
        mc, ma = fc.mean(), fa.mean()
        sc = ((fc - mc) ** 2).mean().add(eps).sqrt()
        sa = ((fa - ma) ** 2).mean().add(eps).sqrt()
        torch.testing.assert_close(mix[:, c], sa * (fc - mc) / sc + ma)
        # f_mix has the adversarial per-channel mean, and its std up to BN's eps
        torch.testing.assert_close(mix[:, c].mean(), ma)
        assert mix[:, c].std(correction=0).item() == pytest.approx(sa.item(), rel=1e-4)


@pytest.mark.parametrize("stats", ["channel", "positional"])
def test_shared_clean_statistics_equal_the_literal_eq6_values_and_gradients(stats: str) -> None:
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    delta = 0.3 * torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    afn = AdversarialFeatureNormalization(clean, stats)
    for scale in (1.0, 0.25, 3.0):
        fast = afn(delta, scale)
        literal = adversarial_feature_normalization(clean, clean + scale * delta, stats)
        torch.testing.assert_close(fast, literal)
        (g_fast,) = torch.autograd.grad(fast.sin().sum(), clean, retain_graph=True)
        (g_lit,) = torch.autograd.grad(literal.sin().sum(), clean)
        torch.testing.assert_close(g_fast, g_lit)


def test_afn_errors_are_clear() -> None:
    with pytest.raises(AdvfeatError, match="channel"):
        feature_moments(torch.zeros(2, 3), "chanel")  # type: ignore[arg-type]
    with pytest.raises(AdvfeatError, match="same shape"):
        adversarial_feature_normalization(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(AdvfeatError, match="must match"):
        AdversarialFeatureNormalization(torch.zeros(2, 3))(torch.zeros(2, 4))


# --------------------------------------------------------------------- strengths
def test_strengths_lie_in_the_interval_and_grid_is_even() -> None:
    g = torch.Generator().manual_seed(0)
    s = sample_strengths(1000, ALPHA, g)
    assert s.min() > 0 and s.max() <= ALPHA
    assert s.mean().item() == pytest.approx(ALPHA / 2, rel=0.1)  # uniform on [0, α]
    torch.testing.assert_close(
        sample_strengths(4, ALPHA, spacing="grid"), ALPHA * torch.tensor([0.25, 0.5, 0.75, 1.0])
    )


def test_rescaling_identity_equals_k_separate_pgd1_attacks(tiny_bn_cnn: nn.Module) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch()
    f = model.block1(x).detach()
    alphas = torch.tensor([0.7, 0.2, 1.0]) * ALPHA
    method = AFAN(site="block1", rescale=True, attack_bn_mode="train")
    clean = method.clean_pass(model, x, y, ["block1"])

    def augmented(afan: AFAN) -> list[Tensor]:
        pairs = afan.perturbations(model, clean, "block1", f, y, alphas)
        return [f + s * d for d, s in pairs]

    rescaled = augmented(method)
    for a, f_adv in zip(alphas.tolist(), rescaled, strict=True):
        delta = FeaturePGD(model, "block1", alpha=a, steps=1, bn_mode="train")(x, y, feature=f)
        torch.testing.assert_close(f_adv, f + delta)
        assert (f_adv - f).abs().max().item() == pytest.approx(a, rel=1e-3)  # ‖δ_i‖∞ = α_i
    separate = AFAN(site="block1", rescale=False, attack_bn_mode="train")
    for a_, b_ in zip(rescaled, augmented(separate), strict=True):
        torch.testing.assert_close(a_, b_)
    assert method.uses_rescaling and not separate.uses_rescaling
    assert AFAN().uses_rescaling and not AFAN(steps=5).uses_rescaling  # exact only for PGD-1


# ----------------------------------------------------------------------- objective
@pytest.mark.parametrize("afn", [True, False])
def test_loss_is_clean_plus_lambda_sum_over_k_strengths(tiny_bn_cnn: nn.Module, afn: bool) -> None:
    x, y = random_batch()
    lam, k, alpha = 0.7, 3, 0.3  # a strong α, so that the perturbed losses differ clearly
    hand_model = copy.deepcopy(tiny_bn_cnn).train()
    model = tiny_bn_cnn.train()
    method = AFAN(
        site="block1",
        k=k,
        lam=lam,
        strength_spacing="grid",
        alpha=alpha,
        afn=afn,
        eps=None,
        loss_weighting="sum",  # Eq. 7 as written (the default is the convex combination)
    )
    out = method(model, x, y)

    loss_clean = F.cross_entropy(hand_model(x), y)
    f = hand_model.block1(x)
    alphas = [alpha * (i + 1) / k for i in range(k)]
    delta1 = hand_sign_step(hand_model, f, y, alphas[0])
    losses = []
    for a in alphas:
        f_adv = f + (a / alphas[0]) * delta1
        f_in = adversarial_feature_normalization(f, f_adv) if afn else f_adv
        losses.append(F.cross_entropy(tail_of(hand_model)(f_in), y))
    expected = loss_clean + lam * sum(losses)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.logs["loss_clean"] == pytest.approx(loss_clean.item(), rel=1e-5)
    assert out.logs["loss_adv"] == pytest.approx(sum(v.item() for v in losses), rel=1e-5)
    if not afn:  # the perturbed losses are not the clean one (AFN alone is a per-channel affine
        # map of the clean feature, which the BN of block2 nearly normalises away)
        assert out.logs["loss_adv"] != pytest.approx(k * loss_clean.item(), rel=1e-3)
    # gradients agree with the hand objective for every parameter
    out.loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), hand_model.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_attack_runs_only_the_tail_and_leaves_grads_and_bn_statistics(
    tiny_bn_cnn: nn.Module,
) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch()
    k = 4
    assert SiteSplit(model, "block1").is_fast
    method = AFAN(site="block1", k=k, adv_bn_stats="frozen")
    bn_tail = model.block2[1]
    before = bn_tail.running_mean.clone()
    with count_calls(model.block1, model.block2) as calls:
        out = method(model, x, y)
    assert calls == [1, 1 + 1 + k]  # head: clean pass only; tail: clean, PGD-1, k passes
    assert all(p.grad is None for p in model.parameters())  # the attack accumulated nothing
    assert int(bn_tail.num_batches_tracked) == 8  # 7 before + the clean pass alone
    expected = copy.deepcopy(tiny_bn_cnn)
    expected.block2[1].running_mean.copy_(before)
    expected.block2[1].num_batches_tracked.fill_(7)
    with torch.no_grad():
        expected(x)
    torch.testing.assert_close(bn_tail.running_mean, expected.block2[1].running_mean)
    assert math.isfinite(out.loss.item())
    # "update": the k training passes through the tail count as forward passes, the attack not
    AFAN(site="block1", k=k)(model, x, y)
    assert int(bn_tail.num_batches_tracked) == 8 + 1 + k


def test_multistep_without_rescaling_runs_k_attacks_on_the_tail(tiny_bn_cnn: nn.Module) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch()
    method = AFAN(site="block1", k=2, steps=3)
    with count_calls(model.block1, model.block2) as calls:
        method(model, x, y)
    assert calls == [1, 1 + 2 * 3 + 2]


def test_head_runs_once_on_resnet20_and_all_parameters_get_gradients() -> None:
    model = build_model("resnet20", num_classes=3, image_size=8).train()
    x, y = random_batch(4, 8)
    method = build_method("afan")
    assert method.resolve_sites(model) == ["layer3"]
    assert SiteSplit(model, "layer3").is_fast
    with count_calls(model.conv1, model.layer3, model.fc) as calls:
        out = method(model, x, y)
    assert calls == [1, 1, 1 + 1 + 3]
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_random_noise_ablation_runs_no_attack(tiny_bn_cnn: nn.Module) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch(16)
    method = AFAN(site="block1", random_noise="gaussian", noise_std=0.1)
    with count_calls(model.block2) as calls:
        out = method(model, x, y)
    assert calls == [1 + 3]  # no attack pass
    per_sample = 8 * 8 * 8  # channels × H × W of block1
    assert out.logs["delta_l2"] == pytest.approx(0.1 * math.sqrt(per_sample), rel=0.1)


# ------------------------------------------------------------------------ end to end
def test_cli_trains_end_to_end(tmp_path: Path) -> None:
    code = main(
        ["train", "--method", "afan", "--model", "resnet20", "--dataset", "shapes",
         "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet",
         "--out", str(tmp_path), "--set", "dataset_options={n_train: 32, n_test: 16, image_size: 16}",
         "--set", "eval_shifted=false", "--set", "method_options={afn_stats: positional}"]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "afan" and 0 <= metrics["clean_acc"] <= 1
    row = metrics["history"][0]
    assert math.isfinite(row["loss_adv"]) and row["loss_adv"] > 0 and row["delta_l2"] > 0


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"alpah": 0.1}, "alpha"),
        ({"k": 0}, "k"),
        ({"afn_stats": "chanel"}, "channel"),
        ({"strength_spacing": "grd"}, "grid"),
        ({"random_noise": "gauss"}, "gaussian"),
        ({"eps": -1.0}, "eps"),
        ({"steps": 0}, "steps"),
        ({"afn": "yes"}, "afn"),
        ({"site": "block1", "sites": ["block2"]}, "not both"),
    ],
)
def test_bad_options_raise_clear_errors(options: dict[str, object], match: str) -> None:
    with pytest.raises(AdvfeatError, match=match):
        build_method("afan", **options)


def test_missing_site_lists_close_matches(tiny_bn_cnn: nn.Module) -> None:
    x, y = random_batch()
    with pytest.raises(AdvfeatError, match="block1"):
        AFAN(site="blok1")(tiny_bn_cnn, x, y)


AFAN_PRESETS = [n for n in preset_names() if n.startswith("afan-resnet")]


def test_table2_presets_exist() -> None:
    assert set(AFAN_PRESETS) >= {
        "afan-resnet20-cifar10", "afan-resnet56-cifar10",
        "afan-resnet20-cifar100", "afan-resnet56-cifar100",
    }  # fmt: skip


@pytest.mark.parametrize("name", AFAN_PRESETS)
def test_preset_show_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", name, "--show-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"] == "afan" and cfg == {**cfg, **load_preset(name)}
    method = build_method("afan", **cfg["method_options"])  # the options validate
    assert method.opts.k == 3 and method.opts.alpha == pytest.approx(0.5 / 255)  # §4, Table 2
    assert method.opts.steps == 5 and not method.uses_rescaling  # §4: PGD-5 on CIFAR
