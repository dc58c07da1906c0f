"""AdvBN Eq. 4-5 feature divergence: closed form on Gaussian data, and the suite end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from advfeat.eval import EvalData, evaluate
from advfeat.eval.divergence import (
    default_layers,
    gaussian_kl,
    layer_moments,
    near_constant_channels,
    symmetric_kl_divergence,
)


def _closed_form(mu_a: float, sd_a: float, mu_b: float, sd_b: float) -> float:
    def kl(m1: float, s1: float, m2: float, s2: float) -> float:
        return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5

    return kl(mu_a, sd_a, mu_b, sd_b) + kl(mu_b, sd_b, mu_a, sd_a)


class FeatureNet(nn.Module):
    """Its ``features`` site outputs the images themselves (a feature map per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# two channels with known normal distributions in each dataset
A = ((0.2, 0.05), (0.5, 0.1))
B = ((0.3, 0.05), (0.5, 0.2))


def _gaussian_images(params: tuple[tuple[float, float], ...], n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    chans = [m + s * torch.randn(n, 1, 16, 16, generator=g, dtype=torch.float64) for m, s in params]
    return torch.cat(chans, dim=1).float()


def test_gaussian_kl_is_eq5_and_zero_on_equal_distributions() -> None:
    mu, sd = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])
    assert torch.allclose(gaussian_kl(mu, sd, mu, sd), torch.zeros(2))
    value = float(
        gaussian_kl(
            torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2.0])
        )[0]
    )
    assert value == pytest.approx(math.log(2) + 2 / 8 - 0.5)


def test_divergence_matches_the_closed_form_on_gaussian_data() -> None:
    model = FeatureNet().eval()
    xa, xb = _gaussian_images(A, 200, 0), _gaussian_images(B, 200, 1)
    moments = [
        layer_moments(model, (x[i : i + 64] for i in range(0, 200, 64)), ["features"])["features"]
        for x in (xa, xb)
    ]
    (mu_a, sd_a), (mu_b, sd_b) = (m.mean_std() for m in moments)
    assert torch.allclose(mu_a, torch.tensor([0.2, 0.5], dtype=torch.float64), atol=2e-3)
    assert torch.allclose(sd_b, torch.tensor([0.05, 0.2], dtype=torch.float64), rtol=1e-2)
    got = symmetric_kl_divergence((mu_a, sd_a), (mu_b, sd_b))
    expected = sum(_closed_form(*a, *b) for a, b in zip(A, B, strict=True)) / 2
    assert got == pytest.approx(expected, rel=0.03)
    assert symmetric_kl_divergence((mu_b, sd_b), (mu_a, sd_a)) == pytest.approx(got)  # symmetric


def test_near_constant_channels_are_left_out_and_counted() -> None:
    a = (torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1e-7]))  # channel 2: dead on A
    b = (torch.tensor([0.0, 1.0, 5.0]), torch.tensor([1.0, 2.0, 1.0]))
    expected = _closed_form(1.0, 1.0, 1.0, 2.0) / 2  # mean of channels 0 (zero) and 1
    assert symmetric_kl_divergence(a, b) == pytest.approx(expected)
    assert near_constant_channels(a, b).tolist() == [False, False, True]
    assert symmetric_kl_divergence(a, b, rel_min_std=0.0) > 1e12  # the channel swamps the mean
    assert math.isnan(symmetric_kl_divergence(a, a, rel_min_std=1e9))  # nothing left


def test_divergence_suite_per_layer_against_closed_form() -> None:
    model = FeatureNet()
    xa, xb = _gaussian_images(A, 160, 2), _gaussian_images(B, 160, 3)
    y = torch.zeros(160, dtype=torch.long)
    data = EvalData(
        test=TensorDataset(xa, y), num_classes=2, shifted={"other": TensorDataset(xb, y)}
    )
    res = evaluate(model, data, ["divergence"], batch_size=64)["suites"]["divergence"]
    assert res["layers"] == ["features", "head.0"]  # the 2-D outputs of head.1, head.2 are not
    pair = res["pairs"]["test|other"]
    expected = sum(_closed_form(*a, *b) for a, b in zip(A, B, strict=True)) / 2
    assert pair["per_layer"]["features"] == pytest.approx(expected, rel=0.03)
    assert pair["excluded_channels"]["features"] == 0
    no_shift = evaluate(model, EvalData(test=TensorDataset(xa, y), num_classes=2), ["divergence"])
    assert "skipped" in no_shift["suites"]["divergence"]


def test_default_layers_are_blocks_in_execution_order(make_tiny_bn_cnn) -> None:  # type: ignore[no-untyped-def]
    model = make_tiny_bn_cnn().eval()
    layers = default_layers(model, torch.rand(2, 3, 8, 8))
    assert layers == [
        "block1.0",
        "block1.1",
        "block1.2",
        "block2.0",
        "block2.1",
        "block2.2",
        "pool",
    ]
