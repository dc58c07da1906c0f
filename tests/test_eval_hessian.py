"""Hessian suite: power iteration and Hutchinson against the exact Hessian of a tiny model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from advfeat.eval import EvalData, evaluate
from advfeat.eval.hessian import hessian_trace, hessian_vector_product, top_eigenvalue


def _tiny_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    return [(x[:12], y[:12]), (x[12:], y[12:])]  # two batches of unequal size


def _exact_hessian(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(theta: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(torch.Size(shape).numel())
            params[name] = theta[start : start + size].view(shape)
            start += size
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def test_hessian_vector_product_matches_the_exact_hessian() -> None:
    model, batches = _tiny_mlp(), _batches()
    h = _exact_hessian(model, batches)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = torch.cat([t.flatten() for t in hessian_vector_product(model, batches, params, v)])
    assert torch.allclose(hv, h @ torch.cat([t.flatten() for t in v]), atol=1e-10)


def test_top_eigenvalue_and_trace_match_exact_values() -> None:
    model, batches = _tiny_mlp(), _batches()
    eig = torch.linalg.eigvalsh(_exact_hessian(model, batches))
    largest = float(eig[eig.abs().argmax()])
    g = torch.Generator().manual_seed(3)
    top = top_eigenvalue(model, batches, iters=500, tol=1e-10, generator=g)
    assert top["converged"]
    assert top["eigenvalue"] == pytest.approx(largest, rel=1e-4)
    assert top["spectral_norm"] == pytest.approx(abs(largest), rel=1e-4)
    exact_trace = float(eig.sum())
    tr = hessian_trace(model, batches, samples=200, generator=g)
    assert tr["samples"] == 200 and tr["stderr"] > 0
    assert abs(tr["trace"] - exact_trace) < 4 * tr["stderr"] + 1e-9
    # parameter state is left as it was
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_hessian_of_a_quadratic_model_is_exact_for_diagonal_curvature() -> None:
    # loss = Σ_i ½ a_i w_i² via a model whose logits make CE quadratic is awkward; instead use
    # a custom loss: Hessian = diag(a), so Hutchinson with Rademacher vectors is exact.
    model = nn.Linear(4, 1, bias=False).double()
    a = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    batch = [(torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.long))]

    def loss_fn(_out: Tensor, _y: Tensor) -> Tensor:
        w = model.weight.flatten()
        return 0.5 * (a * w.square()).sum()

    tr = hessian_trace(model, batch, samples=5, loss_fn=loss_fn)
    assert tr["trace"] == pytest.approx(4.5) and tr["stderr"] == pytest.approx(0.0, abs=1e-12)
    top = top_eigenvalue(model, batch, iters=200, tol=1e-12, loss_fn=loss_fn)
    assert top["eigenvalue"] == pytest.approx(3.0, rel=1e-6)


def test_hessian_suite_is_deterministic_and_uses_the_training_set() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(4)
    train = TensorDataset(
        torch.rand(40, 3, 2, 2, generator=g), torch.randint(0, 3, (40,), generator=g)
    )
    test = TensorDataset(
        torch.rand(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
    )
    data = EvalData(test=test, num_classes=3, train=train)
    opts: dict[str, Any] = {"hessian_batches": 2, "hessian_batch_size": 8, "hutchinson_samples": 5}
    a = evaluate(model, data, ["hessian"], **opts)["suites"]["hessian"]
    b = evaluate(model, data, ["hessian"], **opts)["suites"]["hessian"]
    assert a == b
    assert a["data"] == "train" and a["n"] == 16 and a["batches"] == 2 and a["parameters"] == 39
    # CE of a linear model is convex: every eigenvalue ≥ 0, so the trace bounds the top one
    assert 0 <= a["eigenvalue"] <= a["trace"] + 4 * a["stderr"]
