"""Attacks under autocast: δ, ``f + δ`` and the ascent in float32 (bf16 would round δ away),
the fp16 attack-loss scale, and AFA's probe input on the model's device."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.attacks.feature import BNStatsAttack, FeaturePGD
from advfeat.attacks.precision import (
    FP16_ATTACK_LOSS_SCALE,
    add_perturbation,
    attack_loss_scale,
    perturbed_dtype,
)
from advfeat.methods import build_method

ALPHA = 0.5 / 255  # ALFA / A-FAN Table 2, ResNet-20s


class OffsetNet(nn.Module):
    """A feature site whose outputs lie in [1.4, 1.6] (bf16 spacing 2⁻⁷ ≈ 0.008 there, four
    times α), then global average pooling and a linear head, like a ResNet's last block.
    ``logit_offset`` is added to every logit (the loss ignores it; at 4, bf16's spacing is 0.03,
    as for the logits of a trained network)."""

    def __init__(self, width: int = 256, classes: int = 10, logit_offset: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        assert self.body.bias is not None
        with torch.no_grad():
            self.body.weight.uniform_(-0.01, 0.01)
            self.body.bias.fill_(1.5)
            self.fc.bias.add_(logit_offset)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


def _net_and_batch(seed: int = 0, logit_offset: float = 0.0) -> tuple[OffsetNet, Tensor, Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = OffsetNet(logit_offset=logit_offset)
        x = torch.rand(16, 3, 8, 8)
        y = torch.randint(0, 10, (16,))
    return net.train(), x, y


def _bf16() -> AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _gap(
    method: str, autocast: Callable[[], AbstractContextManager[Any]], seeds: int, **options: Any
) -> float:
    """L_adv/n − L_clean of one step of ``method`` at the site ``body`` (n adversarial terms),
    summed over ``seeds`` batches."""
    total = 0.0
    for seed in range(seeds):
        net, x, y = _net_and_batch(seed)
        m = build_method(method, site="body", alpha=ALPHA, steps=1, **options)
        model = m.prepare(net)
        torch.manual_seed(seed)
        with autocast():
            out = m(model, x, y)
        total += out.logs["loss_adv"] / options.get("k", 1) - out.logs["loss_clean"]
    return total


def test_feature_delta_is_float32_under_bf16_autocast() -> None:
    net, x, y = _net_and_batch()
    with _bf16():
        f = net.body(x)
        assert f.dtype == torch.bfloat16
        delta = FeaturePGD(net, "body", alpha=ALPHA, steps=1)(x, y, feature=f.detach())
        assert perturbed_dtype(f) == torch.float32
        assert add_perturbation(f, delta).dtype == torch.float32
    assert delta.dtype == torch.float32
    # every entry moved by exactly ±α: nothing was rounded away
    assert torch.allclose(delta.abs(), torch.full_like(delta, ALPHA))
    # without autocast, f + δ comes back in the feature's own dtype (a half-precision model)
    assert add_perturbation(f.detach(), delta).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("method", "options"),
    [("alfa", {}), ("afan", {"k": 3, "eps": None, "afn": False}), ("afan", {"k": 3})],
    ids=["alfa", "afan-afa", "afan-afn"],
)
def test_bf16_keeps_the_adversarial_loss_gap(method: str, options: dict[str, Any]) -> None:
    """At α = 0.5/255 on features near 1.5, a bf16 ``f + δ`` (or A-FAN's normalized feature
    cast back to bf16) equals ``f``: L_adv = L_clean exactly. Kept in float32, the gap under
    bf16 autocast is float32's within the rounding of the head's bf16 input (unbiased; A-FAN's
    AFN moves only the statistics, a small signal, so the sum runs over several batches)."""
    seeds = 10 if options.get("afn", True) and method == "afan" else 2
    reference = _gap(method, nullcontext, seeds, **options)
    mixed = _gap(method, _bf16, seeds, **options)
    assert reference > 1e-3 * seeds
    assert mixed != 0.0
    assert mixed == pytest.approx(reference, rel=0.2)


@pytest.mark.parametrize("method", ["alfa", "afan"])
def test_adversarial_pass_runs_in_float32_under_bf16_autocast(method: str) -> None:
    """The tail of the adversarial training pass runs in float32 on a perturbed (float32)
    feature: bf16 logits near 4 (spacing 0.03) would round a change of 1e-3 away, as they
    rounded A-FAN's normalized feature away on a GPU (L_adv = L_clean bit for bit)."""
    net, x, y = _net_and_batch(logit_offset=4.0)
    m = build_method(method, site="body", alpha=ALPHA, steps=1)
    model = m.prepare(net)
    with _bf16():
        clean = m.clean_pass(model, x, y, ["body"])
        f = clean.features["body"]
        assert f.dtype == torch.bfloat16
        shift = torch.full_like(f, 1e-3, dtype=torch.float32)
        before = m.adversarial_output(model, clean, "body", add_perturbation(f, 0 * shift))
        after = m.adversarial_output(model, clean, "body", add_perturbation(f, shift))
    assert after.dtype == torch.float32
    expected = 1e-3 * net.fc.weight.detach().sum(dim=1)  # pooling keeps the constant shift
    torch.testing.assert_close(after - before, expected.expand_as(after), rtol=2e-2, atol=2e-5)


def test_advbn_multipliers_and_feature_are_float32_under_bf16_autocast() -> None:
    net, x, y = _net_and_batch()
    with _bf16():
        f = net.body(x).detach()
        attack = BNStatsAttack(net, "body", eps=0.01, alpha=0.004, steps=2)
        f_adv = attack(x, y, feature=f)
    assert f_adv.dtype == torch.float32
    assert attack.last_multipliers is not None
    mu, sigma = attack.last_multipliers
    assert mu.dtype == sigma.dtype == torch.float32
    # two sign steps of 0.004 (bf16 has no 1.004: its spacing at 1 is 0.0078)
    moved = (sigma - 1).abs()
    assert bool(((moved - 0.008).abs() < 1e-6).any())
    assert bool((((moved - 0.008).abs() < 1e-6) | (moved < 1e-6)).all())


# ------------------------------------------------------------------------------------- fp16


class TinyGradient(nn.Module):
    """A linear head; with the loss below, its input gradient flushes to zero in float16."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def test_fp16_attack_scales_its_loss_so_small_gradients_keep_their_sign(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    net = TinyGradient().train()
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])

    def loss(out: Tensor, target: Tensor) -> Tensor:  # logit gradients of about 1e-7
        return 1e-7 * F.cross_entropy(out.float(), target, reduction="sum")

    def attack() -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return FeaturePGD(net, "body", alpha=0.01, steps=1, loss_fn=loss)(x, y, feature=x)

    assert attack_loss_scale("cpu") == 1.0
    with torch.autocast("cpu", dtype=torch.float16):
        assert attack_loss_scale("cpu") == FP16_ATTACK_LOSS_SCALE
    delta = attack()
    assert delta.dtype == torch.float32
    assert bool((delta.abs() == 0.01).all()), "a gradient flushed to zero left δ unmoved"
    reference = FeaturePGD(net, "body", alpha=0.01, steps=1, loss_fn=loss)(x, y, feature=x)
    assert torch.equal(delta.sign(), reference.sign())
    # unscaled, the float16 gradient flushes to zero and δ stays at 0
    monkeypatch.setattr("advfeat.attacks.engine.attack_loss_scale", lambda _device: 1.0)
    assert bool((attack() == 0).any())


def test_fp16_attack_scale_backs_off_on_overflow() -> None:
    """A loss whose scaled gradient overflows float16 is differentiated again at scale 1."""
    torch.manual_seed(0)
    net = TinyGradient().train()
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])

    def loss(out: Tensor, target: Tensor) -> Tensor:  # logit gradients of about 100
        return 100.0 * F.cross_entropy(out.float(), target, reduction="sum")

    with torch.autocast("cpu", dtype=torch.float16):
        delta = FeaturePGD(net, "body", alpha=0.01, steps=1, loss_fn=loss)(x, y, feature=x)
    reference = FeaturePGD(net, "body", alpha=0.01, steps=1, loss_fn=loss)(x, y, feature=x)
    assert bool(torch.isfinite(delta).all())
    assert torch.equal(delta.sign(), reference.sign())
