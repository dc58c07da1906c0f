"""The ``attacks`` suite: agreement with independent reference loops, the robust ≤ clean and
non-increasing ε-curve invariants, eval mode, determinism, transfer, AutoAttack and AFA."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from advfeat.errors import AdvfeatError
from advfeat.eval import EvalConfig, EvalContext, EvalData, evaluate
from advfeat.eval.autoattack import autoattack_backend, make_autoattack, model_checks
from advfeat.eval.context import PartialStore
from advfeat.eval.robust import Outcome, summarize, worst_case_curve

EPS = 8 / 255
ALPHA = 2 / 255


def _dataset(task: Any, n: int = 96) -> TensorDataset:
    return TensorDataset(task.x_test[:n], task.y_test[:n])


def _seed_for(key: str, seed: int = 0) -> int:
    data = EvalData(test=TensorDataset(torch.zeros(1, 3, 2, 2), torch.zeros(1)), num_classes=2)
    ctx = EvalContext(
        nn.Identity(),
        data,
        EvalConfig(seed=seed).validate(),
        device=torch.device("cpu"),
        store=PartialStore(None, ""),
    )
    return ctx.seed_for(key)


def _reference_pgd(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, generator: torch.Generator
) -> Tensor:
    """Madry et al.'s L∞ PGD written out: uniform start, sign steps, clamp to ball and box."""
    delta = (2 * torch.rand(x.shape, generator=generator) - 1) * EPS
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    return x + delta


def _reference_fgsm(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x.detach() + EPS * grad.sign()).clamp(0, 1)


def _robust(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> int:
    with torch.no_grad():
        ok = (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
    return int(ok.sum())


def test_pgd_and_fgsm_match_independent_reference_loops(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    model = copy.deepcopy(trained_tiny_model)
    data = _dataset(tiny_task)
    res = evaluate(model, data, ["attacks"], attacks=["pgd", "fgsm"], batch_size=48, pgd_steps=5)[
        "suites"
    ]["attacks"]
    g = torch.Generator().manual_seed(_seed_for("attacks/pgd"))
    pgd_ok, fgsm_ok, n = 0, 0, 0
    for start in range(0, 96, 48):  # same batches, same order of random draws
        x, y = tiny_task.x_test[start : start + 48], tiny_task.y_test[start : start + 48]
        pgd_ok += _robust(model, x, _reference_pgd(model, x, y, 5, g), y)
        fgsm_ok += _robust(model, x, _reference_fgsm(model, x, y), y)
        n += len(y)
    assert res["pgd"]["accuracy"] == pytest.approx(pgd_ok / n, abs=1e-9)
    assert res["fgsm"]["accuracy"] == pytest.approx(fgsm_ok / n, abs=1e-9)
    assert res["pgd"]["max_linf"] <= EPS + 1e-6
    # the attacks do something on this breakable model
    assert res["pgd"]["accuracy"] < res["pgd"]["clean_accuracy"]
    assert res["fgsm"]["accuracy"] < res["fgsm"]["clean_accuracy"]


def test_robust_never_above_clean_and_curve_non_increasing(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    model = copy.deepcopy(trained_tiny_model)
    res = evaluate(
        model,
        _dataset(tiny_task),
        ["clean", "attacks"],
        attacks=["pgd", "fgsm", "cw", "curve"],
        pgd_steps=3,
        cw_steps=10,
        eps_curve=[8 / 255, 0, 2 / 255, 1 / 255, 4 / 255],
    )["suites"]
    clean = res["clean"]["top1"]
    for name in ("pgd", "fgsm", "cw"):
        assert res["attacks"][name]["clean_accuracy"] == pytest.approx(clean)
        assert res["attacks"][name]["accuracy"] <= clean
    curve = res["attacks"]["curve"]
    assert curve["eps_255"] == [0, 1, 2, 4, 8]  # sorted
    acc = curve["accuracy"]
    assert acc[0] == pytest.approx(clean)
    assert all(b <= a for a, b in itertools.pairwise(acc))
    assert all(w <= p + 1e-12 for w, p in zip(acc, curve["pointwise_accuracy"], strict=True))
    assert acc[-1] < clean


def test_worst_case_curve_repairs_a_non_monotone_attack() -> None:
    # sample 1 survives ε=8 but fell at ε=4: it is not robust at 8 either (nested balls)
    at4 = Outcome([True, True], [True, False], [0.0, 0.0], [0.0, 0.0])
    at8 = Outcome([True, True], [True, True], [0.0, 0.0], [0.0, 0.0])
    curve = worst_case_curve([4 / 255, 8 / 255], [at4, at8])
    assert curve["pointwise_accuracy"] == [0.5, 1.0]
    assert curve["accuracy"] == [0.5, 0.5]
    # a sample the model got wrong clean never counts as robust
    wrong = Outcome([False, True], [True, True], [0.1, 0.0], [0.1, 0.0])
    assert summarize(wrong)["accuracy"] == 0.5 and summarize(wrong)["attacked_accuracy"] == 1.0


def test_eval_mode_is_set_and_every_flag_restored(tiny_bn_cnn: nn.Module, tiny_task: Any) -> None:
    model = tiny_bn_cnn.train()
    block1, block2 = model.get_submodule("block1"), model.get_submodule("block2")
    block2.eval()  # a mixed state must come back as it was
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda m, _a: seen.append(m.training))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, _dataset(tiny_task, 32), ["clean", "attacks"], attacks=["pgd"], pgd_steps=2)
    assert seen and not any(seen)
    assert model.training and block1.training and not block2.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key  # BN running statistics untouched
    assert all(p.grad is None for p in model.parameters())


def test_results_are_deterministic_for_a_seed(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    model = copy.deepcopy(trained_tiny_model)
    opts: dict[str, Any] = {"attacks": ["pgd", "curve"], "pgd_steps": 2, "max_images": 64}
    a = evaluate(model, _dataset(tiny_task), ["attacks"], seed=3, **opts)["suites"]
    torch.manual_seed(12345)  # the global RNG must not matter
    b = evaluate(model, _dataset(tiny_task), ["attacks"], seed=3, **opts)["suites"]
    assert a == b
    c = evaluate(model, _dataset(tiny_task), ["attacks"], seed=4, **opts)["suites"]
    assert c["attacks"]["pgd"]["n"] == 64 and c != a  # another subset and other random starts


def test_transfer_attack_uses_the_surrogate(trained_tiny_model: nn.Module, tiny_task: Any) -> None:
    model = copy.deepcopy(trained_tiny_model)
    data = _dataset(tiny_task, 64)
    opts: dict[str, Any] = {"attacks": ["curve", "transfer"], "pgd_steps": 3}
    res = evaluate(model, data, ["attacks"], **opts)["suites"]["attacks"]
    assert "skipped" in res["transfer"]  # no surrogate given
    # a surrogate identical to the model: transfer = white-box PGD with the same seed schedule
    same = evaluate(model, data, ["attacks"], surrogate=copy.deepcopy(model), **opts)
    transfer = same["suites"]["attacks"]["transfer"]
    assert transfer["accuracy"][0] == pytest.approx(res["curve"]["accuracy"][0])
    assert transfer["accuracy"][-1] < transfer["accuracy"][0]
    # a constant surrogate has no gradient: only its random start is left, a far weaker attack
    linear = nn.Linear(3 * 8 * 8, 3)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    const = nn.Sequential(nn.Flatten(), linear)
    blind = evaluate(model, data, ["attacks"], surrogate=const, **opts)["suites"]["attacks"]
    assert blind["transfer"]["accuracy"][-1] > transfer["accuracy"][-1]


def test_autoattack_missing_package_names_the_pip_command(
    trained_tiny_model: nn.Module, tiny_task: Any, no_autoattack: None
) -> None:
    assert autoattack_backend() is None
    with pytest.raises(AdvfeatError, match=r"pip install 'advfeat\[autoattack\]'"):
        evaluate(trained_tiny_model, _dataset(tiny_task, 8), ["attacks"], attacks=["autoattack"])
    with pytest.raises(AdvfeatError, match="pip install"):
        make_autoattack(
            trained_tiny_model,
            eps=EPS,
            version="standard",
            seed=0,
            num_classes=3,
            device=torch.device("cpu"),
        )


def test_autoattack_sanity_checks_flag_probabilities_and_randomness(tiny_task: Any) -> None:
    x = tiny_task.x_test[:8]
    logits = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    checks = model_checks(logits.eval(), x)
    assert checks["deterministic"]["passed"] and checks["logits"]["passed"]
    probs = nn.Sequential(logits, nn.Softmax(dim=1))
    assert not model_checks(probs, x)["logits"]["passed"]
    noisy = nn.Sequential(nn.Dropout(0.5), logits).train()
    assert not model_checks(noisy, x)["deterministic"]["passed"]


def _afa_model(base: nn.Module) -> nn.Module:
    from advfeat.norm import WeightGenerator, convert_multibn, to_fused_dual_bn

    model = convert_multibn(copy.deepcopy(base), branches=("eps0", "eps1"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = WeightGenerator(3, channels=4, hidden=4)
    return to_fused_dual_bn(model, generator).eval()


def test_afa_adaptive_attack_and_fusion_weight(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    model = _afa_model(trained_tiny_model)
    res = evaluate(
        model,
        _dataset(tiny_task, 48),
        ["attacks"],
        attacks=["curve", "adaptive"],
        pgd_steps=2,
        eps_curve=[0, 8 / 255],
        adaptive_weights=[(1, 1), (1, 10)],
    )["suites"]["attacks"]
    ada = res["adaptive"]
    assert set(ada["per_weighting"]) == {"1:1", "1:10"}
    # worst case over weightings is never above any single weighting nor above clean
    assert ada["accuracy"] <= ada["best_single_weighting"] + 1e-12
    assert ada["accuracy"] <= ada["non_adaptive_w0_detached"]["clean_accuracy"]
    w0 = res["curve"]["fusion_weight_w0"]
    assert len(w0) == 2 and all(0 < w < 1 for w in w0)
    assert res["curve"]["fusion_weight_w1"] == pytest.approx([1 - w for w in w0])
    # at ε = 0 the images are the clean ones: the mean and per-image spread by hand
    from advfeat.eval.adaptive import find_fusion, fusion_weight_tap

    x = tiny_task.x_test[:48]
    fusion = find_fusion(model)
    assert fusion is not None
    with fusion_weight_tap(fusion) as store, torch.no_grad():
        model(x)
    by_hand = store["w0"].double().reshape(48, -1).mean(dim=1)
    assert w0[0] == pytest.approx(float(by_hand.mean()), abs=1e-6)
    spread = res["curve"]["fusion_weight_w1_image_std"]
    assert spread[0] == pytest.approx(float(by_hand.std(correction=0)), rel=1e-4) and spread[0] > 0
    plain = evaluate(trained_tiny_model, _dataset(tiny_task, 8), ["attacks"], attacks=["adaptive"])
    assert "skipped" in plain["suites"]["attacks"]["adaptive"]


def test_adaptive_attack_gradient_reaches_the_generator(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    from advfeat.eval.adaptive import adaptive_loss, find_fusion, fusion_weight_tap

    model = _afa_model(trained_tiny_model)
    fusion = find_fusion(model)
    assert fusion is not None
    x = tiny_task.x_test[:4].clone().requires_grad_(True)
    y = tiny_task.y_test[:4]
    grads = {}
    for detach in (False, True):
        with fusion_weight_tap(fusion, detach=detach) as store:
            out = model(x)
            loss = adaptive_loss(store, 0.0, 1.0, 0.0)(out, y)
        grads[detach] = torch.autograd.grad(loss, x)[0]
    # BCE(W_0) only depends on x through the generator: no gradient once W_0 is detached
    assert grads[False].abs().sum() > 0
    assert grads[True].abs().sum() < 1e-6 * grads[False].abs().sum() + 1e-12


def test_bad_attack_options_are_clear_errors(tiny_task: Any) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    data = _dataset(tiny_task, 8)
    with pytest.raises(AdvfeatError, match="did you mean 'fgsm'"):
        evaluate(model, data, ["attacks"], attacks=["fgms"])
    with pytest.raises(AdvfeatError, match=r"in \[0, 1\]"):
        evaluate(model, data, ["attacks"], eps=8)
    with pytest.raises(AdvfeatError, match="ε-curve"):
        evaluate(model, data, ["attacks"], eps_curve=[0, -1 / 255])
