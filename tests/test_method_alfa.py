"""ALFA (Qin et al.): unbounded feature PGD at one or more sites, L_clean + λ·Σ_i L_adv (Eq. 3-4),
tail-only attack, BN statistics, random-noise ablation, options and presets."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.alfa import ALFA
from advfeat.models import build_model
from advfeat.presets import load_preset, preset_names
from advfeat.sites import SiteSplit
from helpers import count_calls, random_batch

ALPHA = 0.05


def tail_after(model: nn.Module, site: str) -> Callable[[Tensor], Tensor]:
    """The part of TinyBNCNN after ``site``, written by hand."""
    head_out = {"block1": lambda f: model.block2(f), "block2": lambda f: f}[site]
    return lambda f: model.fc(model.pool(head_out(f)).flatten(1))


def hand_pgd(tail: Callable[[Tensor], Tensor], f: Tensor, y: Tensor, steps: int) -> Tensor:
    """ALFA Eq. 4 with ε unbounded: ``steps`` sign-gradient ascent steps of size α from δ = 0."""
    delta = torch.zeros_like(f)
    for _ in range(steps):
        d = delta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(tail(f.detach() + d), y), d)
        delta = delta + ALPHA * grad.sign()
    return delta


# ----------------------------------------------------------------------- objective
@pytest.mark.parametrize("sites", [["block1"], ["block1", "block2"]])
def test_loss_is_clean_plus_lambda_sum_of_site_losses(
    tiny_bn_cnn: nn.Module, sites: list[str]
) -> None:
    x, y = random_batch()
    lam, steps = 0.6, 3
    hand_model = copy.deepcopy(tiny_bn_cnn).train()
    model = tiny_bn_cnn.train()
    method = ALFA(sites=sites, alpha=ALPHA, steps=steps, lam=lam, loss_weighting="sum")
    out = method(model, x, y)

    loss_clean = F.cross_entropy(hand_model(x), y)
    f1 = hand_model.block1(x)
    feats = {"block1": f1, "block2": hand_model.block2(f1)}
    losses = []
    for s in sites:
        tail = tail_after(hand_model, s)
        delta = hand_pgd(tail, feats[s], y, steps)
        assert delta.abs().max().item() == pytest.approx(steps * ALPHA)  # unbounded: no ε clip
        losses.append(F.cross_entropy(tail(feats[s] + delta), y))
    expected = loss_clean + lam * sum(losses)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.logs["loss_clean"] == pytest.approx(loss_clean.item(), rel=1e-5)
    assert out.logs["loss_adv"] == pytest.approx(sum(v.item() for v in losses), rel=1e-5)
    # the attack increases the loss of each site's tail
    for s, loss in zip(sites, losses, strict=True):
        assert loss.item() > F.cross_entropy(tail_after(hand_model, s)(feats[s]), y).item()
    out.loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), hand_model.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_adversarial_loss_trains_the_head_through_the_feature(tiny_bn_cnn: nn.Module) -> None:
    x, y = random_batch()
    grads = []
    for lam in (0.0, 1.0):
        model = copy.deepcopy(tiny_bn_cnn).train()
        ALFA(site="block2", alpha=ALPHA, lam=lam)(model, x, y).loss.backward()
        grads.append(model.block1[0].weight.grad)
    assert grads[0] is not None and grads[1] is not None
    assert not torch.allclose(grads[0], grads[1])  # the head gets the adversarial gradient too


# --------------------------------------------------------------- cost and side effects
def test_attack_runs_only_the_tail(tiny_bn_cnn: nn.Module) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch()
    assert SiteSplit(model, "block2").is_fast
    with count_calls(model.block1, model.block2, model.fc) as calls:
        out = ALFA(site="block2", steps=5)(model, x, y)
    assert calls == [1, 1, 1 + 5 + 1]  # head once (clean pass); tail: clean, 5 steps, adv
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated by the attack
    assert math.isfinite(out.loss.item())


def test_head_runs_once_on_resnet20_last_block() -> None:
    model = build_model("resnet20", num_classes=3, image_size=8).train()
    x, y = random_batch(4, 8)
    method = build_method("alfa")
    assert method.resolve_sites(model) == ["layer3"]
    assert SiteSplit(model, "layer3").is_fast
    with count_calls(model.conv1, model.layer3, model.fc) as calls:
        out = method(model, x, y)
    assert calls == [1, 1, 1 + 5 + 1]
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(("adv_bn_stats", "passes"), [("frozen", 1), ("update", 2)])
def test_attack_never_moves_bn_running_statistics(
    tiny_bn_cnn: nn.Module, adv_bn_stats: str, passes: int
) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch()
    bn = model.block2[1]
    reference = copy.deepcopy(model)
    ALFA(site="block1", steps=4, adv_bn_stats=adv_bn_stats)(model, x, y)
    # the tail's BN saw the clean pass (+ the adversarial training pass), never the 4 attack steps
    assert int(bn.num_batches_tracked) == 7 + passes
    with torch.no_grad():
        reference(x)
    ref_bn = reference.block2[1]
    if passes == 1:
        torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
        torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    else:
        assert not torch.allclose(bn.running_mean, ref_bn.running_mean)
    # the head's BN ran once in either case
    assert int(model.block1[1].num_batches_tracked) == 8
    torch.testing.assert_close(model.block1[1].running_mean, reference.block1[1].running_mean)


def test_random_noise_ablation_replaces_the_attack(tiny_bn_cnn: nn.Module) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch(16)
    with count_calls(model.block2) as calls:
        out = ALFA(site="block1", random_noise="gaussian", noise_std=0.1)(model, x, y)
    assert calls == [2]  # clean pass and the noisy pass; no attack
    per_sample = 8 * 8 * 8
    assert out.logs["delta_l2"] == pytest.approx(0.1 * math.sqrt(per_sample), rel=0.1)
    out_u = ALFA(site="block1", random_noise="uniform", noise_std=0.1)(model, x, y)
    assert out_u.logs["delta_l2"] == pytest.approx(0.1 * math.sqrt(per_sample), rel=0.1)


def test_joint_mode_perturbs_all_sites_in_one_pass(tiny_bn_cnn: nn.Module) -> None:
    model = tiny_bn_cnn.train()
    x, y = random_batch()
    with count_calls(model.block1, model.block2) as calls:
        out = ALFA(sites=["block1", "block2"], steps=2, multi_site="joint")(model, x, y)
    assert calls == [1, 1 + 2 + 1]
    assert math.isfinite(out.loss.item())


# ------------------------------------------------------------------------ end to end
def test_cli_trains_end_to_end(tmp_path: Path) -> None:
    code = main(
        ["train", "--method", "alfa", "--model", "resnet20", "--dataset", "shapes",
         "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet",
         "--out", str(tmp_path), "--set", "dataset_options={n_train: 32, n_test: 16, image_size: 16}",
         "--set", "eval_shifted=false", "--set", "method_options={steps: 2}"]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "alfa" and 0 <= metrics["clean_acc"] <= 1
    row = metrics["history"][0]
    assert row["loss_adv"] > 0 and row["delta_l2"] > 0 and math.isfinite(row["train_loss"])


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"alpah": 0.1}, "alpha"),
        ({"alpha": 0}, "alpha"),
        ({"steps": 1.5}, "steps"),
        ({"lam": -1}, "lam"),
        ({"random_noise": "gauss"}, "gaussian"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"multi_site": "jont"}, "joint"),
        ({"attack_bn_mode": "evl"}, "eval"),
        ({"adv_bn_stats": "frozn"}, "frozen"),
        ({"sites": []}, "non-empty"),
        ({"sites": ["a", "a"]}, "twice"),
    ],
)
def test_bad_options_raise_clear_errors(options: dict[str, object], match: str) -> None:
    with pytest.raises(AdvfeatError, match=match):
        build_method("alfa", **options)


def test_missing_site_lists_close_matches() -> None:
    model = build_model("resnet20", num_classes=3, image_size=8)
    x, y = random_batch(2, 8)
    with pytest.raises(AdvfeatError, match="layer3"):
        ALFA(site="layer_3")(model, x, y)
    with pytest.raises(AdvfeatError, match="inside"):
        ALFA(sites=["layer3", "layer3.1"])(model, x, y)


def test_model_without_stages_asks_for_a_site() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(AdvfeatError, match="site="):
        ALFA()(model, torch.rand(2, 3, 2, 2), torch.tensor([0, 1]))


ALFA_PRESETS = [n for n in preset_names() if n.startswith("alfa-")]
ALPHAS = {"resnet20": 0.5 / 255, "resnet56": 1.5 / 255}


def test_table2_presets_exist() -> None:
    assert {"alfa-resnet20-cifar10", "alfa-resnet56-cifar10"} <= set(ALFA_PRESETS)


@pytest.mark.parametrize("name", ALFA_PRESETS)
def test_preset_show_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", name, "--show-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"] == "alfa" and cfg == {**cfg, **load_preset(name)}
    method = build_method("alfa", **cfg["method_options"])
    assert method.opts.steps == 5 and method.opts.site == "layer3"
    if cfg["dataset"] == "cifar10":  # Table 2: α per backbone
        assert method.opts.alpha == pytest.approx(ALPHAS[cfg["model"]])


def test_adversarial_pass_at_a_site_inside_a_block_reaches_the_skip_path() -> None:
    """ALFA Eq. 3's L_adv is a loss of every weight: with the site inside a residual block, the
    adversarial training pass carries gradients to earlier layers through the skip connection,
    exactly as a full forward with the site's output replaced does."""
    from advfeat.sites import replace_features

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4, image_size=16).train()
    method = build_method("alfa", site="layer3.2.bn2")
    site = "layer3.2.bn2"
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad(), capture_site(model, site) as seen:
        model(x)
    feature = seen[0].detach()  # a constant: the only path to layer1 is the skip connection
    clean = method.clean_pass(model, x, torch.zeros(4, dtype=torch.long), [site])
    method.adversarial_output(model, clean, site, feature).square().sum().backward()
    got = model.layer1[0].conv1.weight.grad.clone()
    model.zero_grad()
    with replace_features(model, {site: feature}):
        model(x).square().sum().backward()
    expected = model.layer1[0].conv1.weight.grad
    assert float(expected.abs().sum()) > 0
    torch.testing.assert_close(got, expected)


@contextmanager
def capture_site(model: nn.Module, site: str) -> Iterator[list[Tensor]]:
    seen: list[Tensor] = []
    handle = model.get_submodule(site).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()
