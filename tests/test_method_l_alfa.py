"""L-ALFA (Qin et al., ALFA §3.3): learnable strengths η on the simplex (Eq. 5, Algorithm 1),
the exact simplex projection, γ‖η‖₁, η's trajectory in the history, options and presets."""

from __future__ import annotations

import copy
import csv
import itertools
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

from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.feature_aug import stage_blocks
from advfeat.methods.l_alfa import LALFA, project_simplex
from advfeat.models import build_model
from advfeat.presets import load_preset, preset_names
from helpers import random_batch

ALPHA = 0.05
SITES = ["block1", "block2"]


# ------------------------------------------------------------------ simplex projection
def brute_force_projection(v: list[float]) -> list[float]:
    """Closest point of the simplex, by trying every support set (KKT: η_S = v_S − τ)."""
    best: list[float] | None = None
    best_d = math.inf
    n = len(v)
    for r in range(1, n + 1):
        for support in itertools.combinations(range(n), r):
            tau = (sum(v[i] for i in support) - 1) / r
            eta = [v[i] - tau if i in support else 0.0 for i in range(n)]
            if min(eta) < -1e-12:
                continue
            d = sum((a - b) ** 2 for a, b in zip(eta, v, strict=True))
            if d < best_d:
                best, best_d = eta, d
    assert best is not None
    return best


def bisection_projection(v: Tensor, iters: int = 200) -> Tensor:
    """The paper's route (ALFA Alg. 1, line 5): find τ with Σ max(v − τ, 0) = 1 by bisection."""
    lo, hi = float(v.min()) - 1, float(v.max())
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float((v - mid).clamp_min(0).sum()) > 1:
            lo = mid
        else:
            hi = mid
    return (v - (lo + hi) / 2).clamp_min(0)


@pytest.mark.parametrize(
    ("v", "expected"),
    [
        ([0.5, 0.5], [0.5, 0.5]),  # already on the simplex
        ([1.0, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3]),  # η_0 = (1, …, 1) of Algorithm 1
        ([2.0, 0.0], [1.0, 0.0]),
        ([0.2, -0.3, 1.5], [0.0, 0.0, 1.0]),
        ([0.6, 0.5, -1.0], [0.55, 0.45, 0.0]),  # a negative entry is clipped, not shifted
        ([-2.0, -1.0], [0.0, 1.0]),
        ([3.0], [1.0]),
    ],
)
def test_projection_known_cases(v: list[float], expected: list[float]) -> None:
    got = project_simplex(torch.tensor(v, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_projection_matches_brute_force_and_bisection_and_is_idempotent() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 6):
        v = 2 * torch.randn(20, n, generator=g, dtype=torch.float64)
        p = project_simplex(v)  # batched over the leading dimension
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(20, dtype=torch.float64))
        torch.testing.assert_close(project_simplex(p), p)
        for row, proj in zip(v, p, strict=True):
            torch.testing.assert_close(
                proj, torch.tensor(brute_force_projection(row.tolist()), dtype=torch.float64)
            )
            torch.testing.assert_close(proj, bisection_projection(row))


def test_projection_rejects_empty_input() -> None:
    with pytest.raises(AdvfeatError, match="simplex"):
        project_simplex(torch.zeros(0))


# ----------------------------------------------------------------------- objective
def test_loss_is_eq5_and_eta_gets_its_gradient(tiny_bn_cnn: nn.Module) -> None:
    x, y = random_batch()
    lam, gamma, steps = 0.8, 0.5, 2
    eta = torch.tensor([0.7, 0.3])
    hand_model = copy.deepcopy(tiny_bn_cnn).train()
    model = tiny_bn_cnn.train()
    method = LALFA(
        sites=SITES,
        alpha=ALPHA,
        steps=steps,
        lam=lam,
        gamma=gamma,
        multi_site="separate",
        loss_weighting="sum",  # Eq. 5 as written
    )
    with torch.no_grad():
        method.eta.copy_(eta)  # a point of the simplex: the projection keeps it
    out = method(model, x, y)
    out.loss.backward()

    eta_h = eta.clone().requires_grad_(True)
    loss_clean = F.cross_entropy(hand_model(x), y)
    f1 = hand_model.block1(x)
    feats = {"block1": f1, "block2": hand_model.block2(f1)}
    tails: dict[str, Callable[[Tensor], Tensor]] = {
        "block1": lambda f: hand_model.fc(hand_model.pool(hand_model.block2(f)).flatten(1)),
        "block2": lambda f: hand_model.fc(hand_model.pool(f).flatten(1)),
    }
    losses = []
    for i, s in enumerate(SITES):
        delta = torch.zeros_like(feats[s])
        for _ in range(steps):  # δ ascends L(f + η_i·δ) at the current η (Alg. 1, line 3)
            d = delta.clone().requires_grad_(True)
            obj = F.cross_entropy(tails[s](feats[s].detach() + eta[i] * d), y)
            (grad,) = torch.autograd.grad(obj, d)
            delta = delta + ALPHA * grad.sign()
        losses.append(F.cross_entropy(tails[s](feats[s] + eta_h[i] * delta), y))
    expected = loss_clean + lam * sum(losses) + gamma * eta_h.abs().sum()
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.logs["loss_l1"] == pytest.approx(1.0)
    assert method.eta.grad is not None and eta_h.grad is not None
    torch.testing.assert_close(method.eta.grad, eta_h.grad, rtol=1e-4, atol=1e-6)
    for p, q in zip(model.parameters(), hand_model.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_zero_strength_site_is_not_perturbed(tiny_bn_cnn: nn.Module) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch()
    reference = copy.deepcopy(model)
    method = LALFA(sites=SITES, alpha=ALPHA, steps=2, lam=1.0, gamma=0.0, multi_site="separate")
    with torch.no_grad():
        method.eta.copy_(torch.tensor([0.0, 1.0]))
    out = method(model, x, y)
    # η_1 = 0: site block1 contributes the clean loss; η_2 = 1: block2's is ALFA's at block2
    alfa = build_method("alfa", site="block2", alpha=ALPHA, steps=2)(reference, x, y)
    expected = alfa.logs["loss_clean"] + alfa.logs["loss_adv"]
    assert out.logs["loss_adv"] == pytest.approx(expected, rel=1e-5)
    assert alfa.logs["loss_adv"] > alfa.logs["loss_clean"]


def test_user_loop_keeps_eta_on_the_simplex_and_trains(
    make_tiny_bn_cnn: Callable[..., nn.Module], plain_loop: Callable[..., Any]
) -> None:
    model = make_tiny_bn_cnn()
    method = build_method("l-alfa", sites=SITES, alpha=ALPHA, steps=1)
    model = method.prepare(model).train()
    groups = method.parameter_groups(model, lr=0.5)
    assert groups[1]["params"][0] is method.eta
    assert groups[1]["weight_decay"] == 0.0
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    for _ in range(4):
        plain_loop(method, model, [random_batch(16)], lr=0.5)
        seen.append(method.eta.detach().clone())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == set(start)  # parameters, not BN buffers: every layer was trained
    strengths = method.strengths  # projected
    values = torch.tensor(list(strengths.values()))
    assert list(strengths) == SITES
    assert (values >= 0).all() and values.sum().item() == pytest.approx(1.0)
    assert not torch.equal(seen[0], seen[-1])  # η is learned
    logged = method.on_epoch_end(model, 0)
    assert logged == {f"eta_{s}": v for s, v in strengths.items()}


def test_eta_momentum_zero_is_plain_projected_sgd(
    make_tiny_bn_cnn: Callable[..., nn.Module],
) -> None:
    """With ``eta_momentum=0`` η takes Algorithm 1's step, η ← P(η − lr·∇η), while the network
    keeps its momentum; by default η shares the network's."""
    model = make_tiny_bn_cnn()
    method = build_method("l-alfa", sites=SITES, alpha=ALPHA, steps=1, eta_momentum=0.0)
    model = method.prepare(model).train()
    with torch.no_grad():
        method.eta.copy_(torch.tensor([0.6, 0.4]))
    opt = torch.optim.SGD(method.parameter_groups(model, lr=0.5), lr=0.5, momentum=0.9)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.0]
    x, y = random_batch(16)
    for _ in range(2):  # the second step would differ under momentum
        before = method.eta.detach().clone()
        out = method(model, x, y)  # projects the previous step's η first
        before = project_simplex(before)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        assert method.eta.grad is not None
        expected = before - 0.5 * method.eta.grad
        opt.step()
        torch.testing.assert_close(method.eta.detach(), expected)
    shared = build_method("l-alfa", sites=SITES)
    groups = shared.parameter_groups(make_tiny_bn_cnn(), lr=0.5, momentum=0.9)
    assert groups[1]["momentum"] == 0.9


def test_hyperplane_projection_option_only_shifts_eta(tiny_bn_cnn: nn.Module) -> None:
    method = LALFA(sites=SITES, projection="hyperplane")
    with torch.no_grad():
        method.eta.copy_(torch.tensor([1.5, -0.1]))
    method.project_strengths_()
    torch.testing.assert_close(method.eta.detach(), torch.tensor([1.3, -0.3]))  # sum 1, not ≥ 0
    simplex = LALFA(sites=SITES, projection="simplex")
    with torch.no_grad():
        simplex.eta.copy_(torch.tensor([1.5, -0.1]))
    simplex.project_strengths_()
    torch.testing.assert_close(simplex.eta.detach(), torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------------ defaults
def test_default_sites_are_the_blocks_of_every_stage() -> None:
    model = build_model("resnet20", num_classes=3, image_size=8)
    assert stage_blocks(model) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2)]
    method = build_method("l-alfa")
    method.prepare(model)
    assert method.eta_sites == stage_blocks(model)
    torch.testing.assert_close(method.eta.detach(), torch.ones(9))  # η_0 = (1, …, 1)


def test_forward_before_prepare_is_a_clear_error(tiny_bn_cnn: nn.Module) -> None:
    x, y = random_batch()
    with pytest.raises(AdvfeatError, match="prepare"):
        build_method("l-alfa")(tiny_bn_cnn, x, y)


# ------------------------------------------------------------------------ end to end
def test_cli_logs_eta_every_epoch(tmp_path: Path) -> None:
    sites = ["layer2", "layer3"]
    code = main(
        ["train", "--method", "l-alfa", "--model", "resnet20", "--dataset", "shapes",
         "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--quiet",
         "--out", str(tmp_path), "--set", "dataset_options={n_train: 32, n_test: 16, image_size: 16}",
         "--set", "eval_shifted=false",
         "--set", "method_options={steps: 1, sites: [layer2, layer3]}"]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "l-alfa" and len(metrics["history"]) == 2
    with (tmp_path / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for row, hist in zip(rows, metrics["history"], strict=True):
        eta = [float(row[f"eta_{s}"]) for s in sites]
        assert min(eta) >= 0 and sum(eta) == pytest.approx(1.0)
        assert eta == pytest.approx([hist[f"eta_{s}"] for s in sites])
        assert float(row["loss_l1"]) > 0


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"gama": 1.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"eta_init": 0}, "eta_init"),
        ({"eta_lr_scale": -1}, "eta_lr_scale"),
        ({"eta_momentum": -0.5}, "eta_momentum"),
        ({"multi_site": "both"}, "separate"),
        ({"projection": "simplx"}, "simplex"),
        ({"sites": "block1"}, "list"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_options_raise_clear_errors(options: dict[str, object], match: str) -> None:
    with pytest.raises(AdvfeatError, match=match):
        build_method("l-alfa", **options)


def test_missing_site_lists_close_matches(tiny_bn_cnn: nn.Module) -> None:
    with pytest.raises(AdvfeatError, match="block2"):
        build_method("l-alfa", sites=["block1", "blok2"]).prepare(tiny_bn_cnn)


L_ALFA_PRESETS = [n for n in preset_names() if n.startswith("l-alfa-")]


def test_table8_preset_exists() -> None:
    assert "l-alfa-resnet56-cifar100" in L_ALFA_PRESETS


@pytest.mark.parametrize("name", L_ALFA_PRESETS)
def test_preset_show_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", name, "--show-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"] == "l-alfa" and cfg == {**cfg, **load_preset(name)}
    method = build_method("l-alfa", **cfg["method_options"])
    assert method.opts.gamma == 1.0 and len(method.opts.sites) == 9  # Table 8: dim(η) = 9
    model = build_model(cfg["model"], num_classes=100)
    method.prepare(model)  # every site exists in the preset's model
    assert method.eta_sites is not None and method.eta_sites[-1] == "layer3.8"
