"""AdvProp and Fast AdvProp: CLI, BN routing, PGD-n rule, gradient re-use, errors (the plain user
loop of every method: test_plain_loop.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.fast_advprop import attacked_count
from advfeat.norm import branch_names, branch_parameters, split_branches, use_branch
from helpers import one_epoch_train_args, random_batch

TINY = "{n_train: 32, n_test: 16, image_size: 16}"


def _cli(tmp: Path, method: str, options: str) -> dict:
    args = one_epoch_train_args(tmp, TINY, batch_size=16, method=method)
    assert main([*args, "--set", f"method_options={options}"]) == 0
    return json.loads((tmp / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("method", "options"), [("advprop", "{eps: 1}"), ("fast-advprop", "{adv_fraction: 0.25}")]
)
def test_cli_end_to_end(tmp_path: Path, method: str, options: str) -> None:
    metrics = _cli(tmp_path, method, options)
    assert metrics["method"] == method and metrics["epochs"] == 1
    assert 0.0 <= metrics["clean_acc"] <= 1.0
    assert (tmp_path / "checkpoint.pt").is_file()
    row = metrics["history"][-1]
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss_clean", "loss_adv"))


def _bn(model: nn.Module) -> nn.Module:
    return model.block1[1]


def test_advprop_routes_clean_to_main_and_adversarial_to_aux(make_tiny_bn_cnn) -> None:
    """Algorithm 1: attack via aux BN (no stat change), L^c via main BN, L^a via aux BN."""
    method = build_method("advprop", attacker="ifgsm", eps=2)  # deterministic attack
    model = method.prepare(make_tiny_bn_cnn()).train()
    ref = copy.deepcopy(model)
    x, y = random_batch(16)
    out = method(model, x, y)
    out.loss.backward()
    x_adv = method.make_attack(ref)(x, y)  # same attack on an identical copy
    with use_branch(ref, "clean"):
        loss_c = F.cross_entropy(ref(x), y)
    with use_branch(ref, "adv"):
        loss_a = F.cross_entropy(ref(x_adv), y)
    assert torch.allclose(out.loss, loss_c + loss_a, atol=1e-6)
    (loss_c + loss_a).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # main statistics moved by clean images only, aux statistics by adversarial ones only
    for a, b in zip(model.buffers(), ref.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    # main BN affine gradients come from L^c alone
    fresh = copy.deepcopy(model)
    fresh.zero_grad()
    with use_branch(fresh, "clean"):
        F.cross_entropy(fresh(x), y).backward()
    for p, q in zip(
        branch_parameters(model, "clean"), branch_parameters(fresh, "clean"), strict=True
    ):
        if p.ndim == 1 and p.shape[0] != 3:  # BN weights/biases (fc bias has 3 entries)
            assert torch.allclose(p.grad, q.grad, atol=1e-6)


@pytest.mark.parametrize("name", ["advprop", "fast-advprop"])
def test_split_and_separate_routing_are_the_same_step(make_tiny_bn_cnn, name: str) -> None:
    """One [clean | adv] pass with split BN = one pass per branch: loss, gradients, statistics."""
    base = make_tiny_bn_cnn()
    results = []
    for routing in ("split", "separate", "auto"):
        torch.manual_seed(0)
        method = build_method(name, eps=1, routing=routing)
        model = method.prepare(copy.deepcopy(base)).train()
        out = method(model, *random_batch(16))
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out.loss.detach(), grads, copy.deepcopy(model.state_dict())))
    (loss, grads, state), others = results[0], results[1:]
    for other_loss, other_grads, other_state in others:
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, other_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        for key, value in state.items():
            torch.testing.assert_close(other_state[key].float(), value.float(), msg=key)


def test_auto_routing_splits_only_where_one_pass_pays() -> None:
    from advfeat.methods.auxbn import resolve_routing

    cpu = torch.zeros(2, 3)
    assert resolve_routing("auto", nn.Linear(3, 3), cpu) == "separate"
    assert resolve_routing("split", nn.Linear(3, 3), cpu) == "split"
    if torch.cuda.is_available():
        assert resolve_routing("auto", nn.Linear(3, 3), cpu.cuda()) == "split"


def test_pgd_n_rule() -> None:
    """AdvProp Sec. 5.1: n = ε + 1 steps (n = 1 at ε = 1), step size 1/255."""
    for eps, n in [(1, 1), (2, 3), (3, 4), (4, 5), (6, 7)]:
        method = build_method("advprop", eps=eps)
        assert method.attack_steps == n
        attack = method.make_attack(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
        assert attack.steps == n and attack.alpha == pytest.approx(1 / 255)
        assert attack.eps == pytest.approx(eps / 255) and attack.branch == "adv"
    assert build_method("advprop", eps=4, steps=2).attack_steps == 2


def test_fine_grained_keeps_one_aux_bn_per_source(make_tiny_bn_cnn) -> None:
    method = build_method("advprop", fine_grained=True, eps=1)
    model = method.prepare(make_tiny_bn_cnn()).train()
    assert branch_names(model) == ("clean", "strong_aug", "adv")
    stats = _bn(model).aux["strong_aug"].running_mean.clone()
    out = method(model, *random_batch(16))
    assert {"loss_clean", "loss_strong_aug", "loss_adv"} <= set(out.logs)
    assert not torch.equal(_bn(model).aux["strong_aug"].running_mean, stats)


@pytest.mark.parametrize("attack_branch", ["adv", "clean"])
def test_fast_advprop_reused_gradient_equals_slow_gradient(make_tiny_bn_cnn, attack_branch) -> None:
    """The gradient of the attack's backward, re-used, equals ∇θ of the documented loss."""
    method = build_method("fast-advprop", adv_fraction=0.25, attack_branch=attack_branch)
    model = method.prepare(make_tiny_bn_cnn()).train()
    ref = copy.deepcopy(model)
    x, y = random_batch(16)
    out = method(model, x, y)
    out.loss.backward()
    n_c, n_a = 12, 4
    assert method.last_start is not None and method.last_adv is not None
    assert (method.last_adv - x[n_c:]).abs().max() <= 1 / 255 + 1e-6
    if attack_branch == "adv":
        with split_branches(ref, [("clean", n_c), ("adv", n_a)]):
            joint = ref(torch.cat([x[:n_c], method.last_start]))
    else:
        with use_branch(ref, "clean"):
            joint = ref(torch.cat([x[:n_c], method.last_start]))
    with use_branch(ref, "adv"):
        adv = ref(method.last_adv)
    ce = lambda logits, t: F.cross_entropy(logits, t, reduction="sum")  # noqa: E731
    slow = ce(joint[:n_c], y[:n_c]) + 0.5 * ce(joint[n_c:], y[n_c:]) + 0.5 * ce(adv, y[n_c:])
    slow = slow / (n_c + n_a)
    slow.backward()
    assert torch.allclose(out.loss, slow, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    for a, b in zip(model.buffers(), ref.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_fast_advprop_without_reuse_and_split_sizes(make_tiny_bn_cnn) -> None:
    assert [attacked_count(n, 0.2) for n in (2, 5, 10, 128)] == [1, 1, 2, 26]
    method = build_method("fast-advprop", reuse_attack_grad=False, random_start=False)
    model = method.prepare(make_tiny_bn_cnn()).train()
    out = method(model, *random_batch(16))
    out.loss.backward()
    assert "loss_attack" not in out.logs and out.logs["adv_fraction"] == pytest.approx(3 / 16)
    assert all(p.grad is not None for p in branch_parameters(model, "adv"))
    with pytest.raises(AdvfeatError, match="at least 2 images"):
        method(model, *random_batch(1))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("advprop", {"epss": 1}, "eps"),
        ("advprop", {"eps": 0}, "eps"),
        ("advprop", {"eps": 2.5}, "whole number"),
        ("advprop", {"attacker": "pgdd"}, "pgd"),
        ("advprop", {"fine_grained": True, "extra_sources": ["autoaug"]}, "strong_aug"),
        ("advprop", {"attack_bn_mode": "trian"}, "train"),
        ("fast-advprop", {"adv_fraction": 1.0}, "below 1"),
        ("fast-advprop", {"attack_branch": "aux"}, "adv"),
        ("fast-advprop", {"attack_weight": 0}, "attack_weight"),
        ("fast-advprop", {"adv_fractoin": 0.1}, "adv_fraction"),
    ],
)
def test_bad_options(name: str, options: dict, match: str) -> None:
    with pytest.raises(AdvfeatError, match=match):
        build_method(name, **options)


@pytest.mark.parametrize("name", ["advprop", "fast-advprop"])
def test_model_without_bn_is_refused(name: str) -> None:
    with pytest.raises(AdvfeatError, match="no batch-norm"):
        build_method(name).prepare(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


@pytest.mark.parametrize("preset", ["advprop-resnet-cifar", "fast-advprop-resnet-cifar"])
def test_presets_show_config(preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", preset, "--show-config"]) == 0
    text = capsys.readouterr().out
    assert f"method: {preset.rsplit('-resnet', 1)[0]}" in text and "model: resnet56" in text
