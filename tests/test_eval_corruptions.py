"""Corruptions suite: on-the-fly corruption, severity checks, accuracy table and mCE."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from advfeat.errors import AdvfeatError
from advfeat.eval import evaluate
from advfeat.eval.corruption import corrupt_batch, corrupted_size, corruption_errors
from advfeat.eval.suites import suite_options

pytest.importorskip("imagecorruptions", reason="the corruptions extra is not installed")


def _images(n: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_corrupt_batch_is_seeded_per_image_and_keeps_shape_and_range() -> None:
    x = _images()
    state = torch.random.get_rng_state()
    a = corrupt_batch(x, "gaussian_noise", 3, [10, 11, 12])
    b = corrupt_batch(x[1:], "gaussian_noise", 3, [11, 12])  # another batch composition
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a[1:], b)
    assert not torch.equal(a, corrupt_batch(x, "gaussian_noise", 3, [20, 21, 22]))
    assert not torch.allclose(a, x, atol=1e-2)  # it did corrupt
    assert torch.equal(torch.random.get_rng_state(), state)
    assert corrupted_size(8, 8) == (32, 32) and corrupted_size(40, 64) == (40, 64)


def test_higher_severity_corrupts_more() -> None:
    x = _images(4, 32)
    change = [
        float((corrupt_batch(x, "contrast", s, [0, 1, 2, 3]) - x).abs().mean()) for s in (1, 5)
    ]
    assert change[1] > change[0] > 0


@pytest.mark.parametrize("severity", [0, 6, 2.5, True])
def test_severity_outside_1_to_5_is_a_clear_error(severity: Any) -> None:
    with pytest.raises(AdvfeatError, match="1 to 5"):
        corrupt_batch(_images(1), "fog", severity, [0])
    with pytest.raises(AdvfeatError, match="1 to 5"):
        suite_options({"corruptions": {"severities": (1, severity)}})


def test_unknown_corruption_lists_close_matches() -> None:
    with pytest.raises(AdvfeatError, match="did you mean 'gaussian_noise'"):
        suite_options({"corruptions": {"types": ("gausian_noise",)}})
    with pytest.raises(AdvfeatError, match="did you mean"):
        corrupt_batch(_images(1), "snowy", 1, [0])


def test_corruption_errors_follow_hendrycks_definition() -> None:
    acc = {"fog": {"1": 0.8, "2": 0.6}, "snow": {"1": 0.5, "2": 0.5}}
    base = {"fog": {"1": 0.6, "2": 0.4}, "snow": {"1": 0.5, "2": 0.0}}
    out = corruption_errors(acc, base, clean_accuracy=0.9, baseline_clean_accuracy=0.8)
    assert out["ce"]["fog"] == pytest.approx((0.2 + 0.4) / (0.4 + 0.6))
    assert out["ce"]["snow"] == pytest.approx(1.0 / 1.5)
    assert out["mce"] == pytest.approx((0.6 + 1.0 / 1.5) / 2)
    assert out["relative_ce"]["fog"] == pytest.approx((0.1 + 0.3) / (0.2 + 0.4))
    perfect = corruption_errors({"fog": {"1": 0.5}, "snow": {"1": 0.5}}, {**base, "fog": {"1": 1}})
    assert perfect["ce"]["fog"] is None and perfect["ce_undefined"] == ["fog"]
    assert perfect["mce"] == pytest.approx(1.0)  # snow only
    with pytest.raises(AdvfeatError, match="baseline has no result for fog@3"):
        corruption_errors({"fog": {"3": 0.5}}, base)


def test_suite_table_and_mce_against_the_model_itself(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    model = copy.deepcopy(trained_tiny_model)
    data = TensorDataset(tiny_task.x_test[:24], tiny_task.y_test[:24])
    opts: dict[str, Any] = {"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5]}
    res = evaluate(model, data, ["corruptions"], **opts)["suites"]["corruptions"]
    assert set(res["accuracy"]) == {"gaussian_noise", "contrast"}
    assert set(res["accuracy"]["contrast"]) == {"1", "5"}
    assert res["mean_accuracy"]["contrast"] == pytest.approx(
        (res["accuracy"]["contrast"]["1"] + res["accuracy"]["contrast"]["5"]) / 2
    )
    assert res["mce"] is None and res["corrupted_at"] == [32, 32]
    # normalised by itself (same seeds, same images): every CE is exactly 1
    own = evaluate(model, data, ["corruptions"], baseline=copy.deepcopy(model), **opts)
    ce = own["suites"]["corruptions"]["ce"]
    # (a CE is undefined, None, where the baseline makes no error at all)
    assert all(v is None or v == pytest.approx(1.0) for v in ce.values())
    assert own["suites"]["corruptions"]["mce"] == pytest.approx(1.0)
    # normalised by an earlier result JSON
    prior = evaluate(model, data, ["corruptions"], **opts)
    again = evaluate(model, data, ["corruptions"], baseline=prior, **opts)
    assert again["suites"]["corruptions"]["ce"] == pytest.approx(own["suites"]["corruptions"]["ce"])
