"""Loss landscapes (A-FAN Fig. 3, Li et al. 2018): filter-normalised directions, the surface's
values against losses computed directly, and the ``landscape`` suite with a reference model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from advfeat.errors import AdvfeatError
from advfeat.eval import EvalData, evaluate
from advfeat.eval.landscape import (
    filter_normalized_direction,
    landscape_1d,
    landscape_2d,
    landscape_parameters,
    summarize_1d,
)
from advfeat.eval.suites import suite_options
from advfeat.eval.suites.landscape import grid


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _direct_loss(
    model: nn.Module, x: Tensor, y: Tensor, moves: list[tuple[float, list[Tensor]]]
) -> float:
    """Mean CE of ``model`` (eval mode) at θ + Σ c·d, computed with functional_call."""
    params = {
        n: p.detach() + sum(c * d[i] for c, d in moves)
        for i, (n, p) in enumerate(landscape_parameters(model))
    }
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    model.train(was)
    return float(loss)


def test_directions_are_filter_normalised(tiny_bn_cnn: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    d = filter_normalized_direction(tiny_bn_cnn, generator=g)
    params = landscape_parameters(tiny_bn_cnn)
    assert len(d) == len(params)
    n_filters = 0
    for (name, p), t in zip(params, d, strict=True):
        assert t.shape == p.shape and t.dtype == p.dtype
        if p.dim() <= 1:  # biases, BN weight / bias: kept fixed ("ignore biasbn")
            assert torch.count_nonzero(t) == 0, name
            continue
        w_norms = p.detach().flatten(1).norm(dim=1)
        d_norms = t.flatten(1).norm(dim=1)
        torch.testing.assert_close(d_norms, w_norms, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(t, p.detach())  # random, not the weights themselves
        n_filters += p.shape[0]
    assert n_filters == 8 + 16 + 3
    # same seed → same direction; the other convention copies the 1-D parameters
    again = filter_normalized_direction(tiny_bn_cnn, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(d, again, strict=True))
    other = filter_normalized_direction(
        tiny_bn_cnn, generator=torch.Generator().manual_seed(0), ignore_biasbn=False
    )
    for (_, p), t in zip(params, other, strict=True):
        if p.dim() <= 1:
            assert torch.equal(t, p.detach())


def test_landscape_values_equal_losses_computed_directly(
    tiny_bn_cnn: nn.Module, tiny_task: Any
) -> None:
    model = tiny_bn_cnn.train()  # the landscape switches to eval mode and back
    x, y = tiny_task.x_test[:40], tiny_task.y_test[:40]
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]  # unequal batches: the mean is per sample
    before = _state(model)
    d1 = filter_normalized_direction(model, generator=torch.Generator().manual_seed(1))
    d2 = filter_normalized_direction(model, generator=torch.Generator().manual_seed(2))
    alphas = grid(1.0, 5)
    curve = landscape_1d(model, batches, d1, alphas)
    assert curve["alpha"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    for a, loss in zip(alphas, curve["loss"], strict=True):
        assert loss == pytest.approx(_direct_loss(model, x, y, [(a, d1)]), rel=1e-5)
    # α = 0 is the trained model's own loss (eval-mode BN with its running statistics)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    assert curve["loss"][2] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert curve["accuracy"][2] == pytest.approx(float((logits.argmax(1) == y).float().mean()))

    surface = landscape_2d(model, batches, (d1, d2), [-0.5, 0.0, 0.5], [0.0, 0.75])
    assert len(surface["loss"]) == 2 and len(surface["loss"][0]) == 3  # rows: β
    assert surface["loss"][0][1] == pytest.approx(curve["loss"][2], rel=1e-6)
    assert surface["loss"][1][0] == pytest.approx(
        _direct_loss(model, x, y, [(-0.5, d1), (0.75, d2)]), rel=1e-5
    )
    # weights and BN statistics exactly as they were; train flags, grads untouched
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_summary_of_a_curve() -> None:
    curve = {
        "alpha": [-1.0, -0.5, 0.0, 0.5, 1.0],
        "loss": [3.0, 1.2, 0.5, 1.4, 2.0],
        "accuracy": [0.1, 0.5, 0.9, 0.5, 0.2],
    }
    s = summarize_1d(curve)
    assert s["loss_at_zero"] == 0.5 and s["accuracy_at_zero"] == 0.9
    assert s["mean_loss_increase"] == pytest.approx((2.5 + 0.7 + 0 + 0.9 + 1.5) / 5)
    assert s["max_loss_increase"] == pytest.approx(2.5)
    assert s["width_loss_below_plus_1"] == pytest.approx(1.0)  # [-0.5, 0.5]: 2.0 > 1.5


def _data(task: Any) -> EvalData:
    return EvalData(
        test=TensorDataset(task.x_test[:32], task.y_test[:32]),
        num_classes=3,
        image_size=8,
        train=TensorDataset(task.x_train[:64], task.y_train[:64]),
    )


OPTS: dict[str, Any] = {
    "landscape_batches": 2,
    "landscape_batch_size": 16,
    "landscape_points": 7,
    "landscape_points_2d": 5,
}


def test_landscape_suite_compares_two_models_side_by_side(
    trained_tiny_model: nn.Module, make_tiny_bn_cnn: Any, tiny_task: Any, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    untrained = make_tiny_bn_cnn(seed=3).eval()
    ref_out = tmp_path / "ref.json"
    evaluate(untrained, _data(tiny_task), ["landscape"], out=ref_out, **OPTS)
    model = copy.deepcopy(trained_tiny_model)
    out = tmp_path / "eval.json"
    res = evaluate(
        model, _data(tiny_task), ["landscape"], out=out, landscape_reference=str(ref_out), **OPTS
    )
    land = res["suites"]["landscape"]
    assert land["data"] == "train" and land["n"] == 32 and land["range"] == 1.0
    # α = 0: the model's own training loss on the same seeded subset of the training set
    from advfeat.eval.context import seeded_subset

    subset = seeded_subset(_data(tiny_task).train, 32, 0)  # type: ignore[arg-type]
    xs = torch.stack([subset[i][0] for i in range(32)])
    ys = torch.stack([subset[i][1] for i in range(32)])
    with torch.no_grad():
        direct = float(F.cross_entropy(model(xs), ys))
    c = land["1d"]
    assert len(c["alpha"]) == 7 and c["alpha"][3] == 0.0
    assert c["loss_at_zero"] == pytest.approx(direct, rel=1e-5)
    assert land["2d"]["loss"][2][2] == pytest.approx(direct, rel=1e-5)
    assert land["parameters_moved"] == sum(p.numel() for p in model.parameters() if p.dim() > 1)
    ref = land["reference"]
    assert ref["source"] == str(ref_out) and "2d" in ref
    # the trained model sits in a lower basin than the untrained one
    assert c["loss_at_zero"] < ref["1d"]["loss_at_zero"]
    assert (tmp_path / "eval_plots" / "loss_landscape.png").stat().st_size > 10_000
    md = out.with_suffix(".md").read_text()
    assert "## Loss landscape (A-FAN Fig. 3)" in md and "loss_landscape.png" in md
    # deterministic for the seed; a checkpoint-less reference must be an eval JSON with results
    again = evaluate(copy.deepcopy(trained_tiny_model), _data(tiny_task), ["landscape"], **OPTS)
    assert again["suites"]["landscape"]["1d"]["loss"] == c["loss"]
    bad = tmp_path / "nolandscape.json"
    bad.write_text(json.dumps({"suites": {"clean": {}}}))
    with pytest.raises(AdvfeatError, match="no landscape results"):
        evaluate(model, _data(tiny_task), ["landscape"], landscape_reference=str(bad), **OPTS)


def test_landscape_options_are_checked() -> None:
    with pytest.raises(AdvfeatError, match="odd"):
        suite_options({"landscape": {"points": 10}})
    with pytest.raises(AdvfeatError, match="landscape data"):
        suite_options({"landscape": {"data": "val"}})
    assert suite_options({"landscape": {"points_2d": 0}})["landscape"].points_2d == 0
    assert grid(0.5, 3) == [-0.5, 0.0, 0.5]
