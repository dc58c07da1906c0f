"""Pixel attacks: the guarantees, equivalences, a reference PGD, strength ordering, bad input."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.attacks.base import Attack
from advfeat.attacks.pixel import (
    CWL2,
    FGSM,
    GD,
    IFGSM,
    PGD,
    advprop_pgd,
    advprop_pgd_steps,
    cw_margin_loss,
)
from advfeat.errors import AdvfeatError
from helpers import assert_same_state, model_state

EPS = 8 / 255
TOL = 1e-6

# name -> (factory, threat ball: (norm, radius) or None when the attack has no ε-ball)
AttackFactory = Callable[..., Attack]
ATTACKS: dict[str, tuple[AttackFactory, tuple[str, float] | None]] = {
    "fgsm": (lambda m, **kw: FGSM(m, eps=EPS, **kw), ("linf", EPS)),
    "ifgsm": (lambda m, **kw: IFGSM(m, eps=EPS, alpha=3 / 255, steps=3, **kw), ("linf", EPS)),
    "pgd-linf": (
        lambda m, **kw: PGD(m, eps=EPS, alpha=3 / 255, steps=3, seed=0, **kw),
        ("linf", EPS),
    ),
    "pgd-l2": (
        lambda m, **kw: PGD(m, eps=0.3, alpha=0.2, steps=3, norm="l2", seed=0, **kw),
        ("l2", 0.3),
    ),
    "advprop-pgd": (lambda m, **kw: advprop_pgd(m, 4, seed=0, **kw), ("linf", 4 / 255)),
    "gd": (lambda m, **kw: GD(m, alpha=4 / 255, steps=3, **kw), None),
    "cwl2": (lambda m, **kw: CWL2(m, steps=4, lr=0.05, **kw), None),
}
DETERMINISTIC: dict[str, AttackFactory] = {
    "fgsm": lambda m, **kw: FGSM(m, eps=EPS, **kw),
    "ifgsm": lambda m, **kw: IFGSM(m, eps=EPS, alpha=2 / 255, steps=5, **kw),
    "pgd-no-start": lambda m, **kw: PGD(
        m, eps=EPS, alpha=2 / 255, steps=5, random_start=False, **kw
    ),
    "pgd-l2-no-start": lambda m, **kw: PGD(
        m, eps=0.5, alpha=0.2, steps=5, norm="l2", random_start=False, **kw
    ),
    "gd": lambda m, **kw: GD(m, alpha=2 / 255, steps=5, **kw),
    "cwl2": lambda m, **kw: CWL2(m, steps=10, lr=0.05, **kw),
}


# --------------------------------------------------------------------------- helpers
def per_sample_norm(delta: Tensor, norm: str) -> Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def double_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


# --------------------------------------------------------------------------- guarantees
@pytest.mark.parametrize("bn_mode", ["eval", "train", "keep"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_guarantees(
    name: str, bn_mode: str, tiny_bn_cnn: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model = tiny_bn_cnn
    model.train()
    model.block2.eval()  # a mixture of flags
    model.block1[0].weight.requires_grad_(False)  # a frozen parameter
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)  # an existing gradient
    before = model_state(model)
    x, y = tiny_batch
    x_before, y_before = x.clone(), y.clone()
    factory, ball = ATTACKS[name]

    x_adv = factory(model, bn_mode=bn_mode)(x, y)

    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert not torch.equal(x_adv, x)
    if ball is not None:
        norm, radius = ball
        assert float(per_sample_norm(x_adv - x, norm).max()) <= radius + TOL
    assert_same_state(model, before)


def test_input_requiring_grad_is_left_alone(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x = tiny_batch[0].clone().requires_grad_(True)
    x_adv = PGD(trained_tiny_model, steps=2, seed=0)(x, tiny_batch[1])
    assert x.grad is None and not x_adv.requires_grad


def test_state_restored_when_the_attack_fails(
    tiny_bn_cnn: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model = tiny_bn_cnn.train()
    model.fc.weight.requires_grad_(False)
    before = model_state(model)
    calls = []

    def failing_loss(output: Tensor, target: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("loss failed")
        return F.cross_entropy(output, target)

    with pytest.raises(RuntimeError, match="loss failed"):
        PGD(model, steps=3, loss_fn=failing_loss, bn_mode="eval", seed=0)(*tiny_batch)
    assert_same_state(model, before)


def test_attacks_work_under_no_grad(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    expected = PGD(trained_tiny_model, steps=2, seed=0)(x, y)
    with torch.no_grad():
        assert torch.equal(PGD(trained_tiny_model, steps=2, seed=0)(x, y), expected)
    with torch.inference_mode(), pytest.raises(AdvfeatError, match="inference_mode"):
        PGD(trained_tiny_model, steps=2)(x, y)


def test_bn_mode_changes_the_attack(
    tiny_bn_cnn: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    by_eval = FGSM(tiny_bn_cnn, bn_mode="eval")(x, y)
    by_train = FGSM(tiny_bn_cnn, bn_mode="train")(x, y)
    assert not torch.equal(by_eval, by_train)
    # "keep" follows the model's own flags: identical to the explicit mode.
    assert torch.equal(FGSM(tiny_bn_cnn.train(), bn_mode="keep")(x, y), by_train)
    assert torch.equal(FGSM(tiny_bn_cnn.eval(), bn_mode="keep")(x, y), by_eval)


def test_attack_raises_the_loss(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch

    def loss(images: Tensor) -> float:
        with torch.no_grad():
            return F.cross_entropy(trained_tiny_model(images), y).item()

    for name, (factory, _) in ATTACKS.items():
        if name != "cwl2":
            assert loss(factory(trained_tiny_model)(x, y)) > loss(x) + 0.05, name


# --------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("factory", [FGSM, IFGSM, lambda m, eps: PGD(m, eps=eps, seed=3)])
def test_scalar_eps_equals_per_sample_eps(
    factory: Callable[..., Attack], trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    scalar = factory(trained_tiny_model, eps=EPS)(x, y)
    batch = factory(trained_tiny_model, eps=torch.full((x.shape[0],), EPS))(x, y)
    assert torch.equal(scalar, batch)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_sample_eps_equals_attacking_each_sample(
    norm: str, trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model = double_copy(trained_tiny_model)
    x, y = tiny_batch[0][:6].double(), tiny_batch[1][:6]
    scale = 1.0 if norm == "linf" else 40.0
    eps = torch.tensor([0.0, 1, 2, 4, 8, 16], dtype=torch.float64) / 255 * scale
    together = IFGSM(model, eps=eps, alpha=eps / 3 + 1e-3, steps=4, norm=norm)(x, y)
    for i in range(6):
        alone = IFGSM(model, eps=float(eps[i]), alpha=float(eps[i]) / 3 + 1e-3, steps=4, norm=norm)(
            x[i : i + 1], y[i : i + 1]
        )
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-12)
        assert (
            float(per_sample_norm(together[i : i + 1] - x[i : i + 1], norm))
            <= float(eps[i]) + 1e-12
        )
    assert torch.equal(together[0], x[0])  # ε = 0 leaves the sample alone


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_batch_equals_one_by_one(
    name: str, trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model = double_copy(trained_tiny_model)
    x, y = tiny_batch[0][:5].double(), tiny_batch[1][:5]
    attack = DETERMINISTIC[name](model)
    together = attack(x, y)
    alone = torch.cat([attack(x[i : i + 1], y[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)
    torch.testing.assert_close(attack(x, y), together, rtol=0, atol=0)  # and repeatable


def test_seeded_random_start_is_reproducible(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    global_state = torch.get_rng_state()
    first = PGD(trained_tiny_model, steps=1, seed=5)(x, y)
    again = PGD(trained_tiny_model, steps=1, seed=5)(x, y)
    other = PGD(trained_tiny_model, steps=1, seed=6)(x, y)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is not used
    # one instance draws a fresh start per call; a new instance with the seed replays them
    attack, replay = (
        PGD(trained_tiny_model, steps=0, seed=1),
        PGD(trained_tiny_model, steps=0, seed=1),
    )
    starts = [attack(x, y), attack(x, y)]
    assert not torch.equal(starts[0], starts[1])
    assert all(torch.equal(s, replay(x, y)) for s in starts)


def reference_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, start: Tensor
) -> Tensor:
    """Textbook L∞ PGD (Madry et al.), written independently of advfeat."""
    x_adv = (x + start).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("saturated", [False, True])
@pytest.mark.parametrize("shared_start", [False, True])
def test_matches_reference_pgd(
    shared_start: bool, saturated: bool, trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    model = double_copy(trained_tiny_model)
    x, y = tiny_task.x_test.double(), tiny_task.y_test
    if saturated:  # many pixels at 0 or 1: the box constraint is active at every step
        x = ((x - 0.5) * 4 + 0.5).clamp(0, 1)
    start = torch.zeros_like(x)
    if shared_start:
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        start = (2 * u - 1) * EPS
    expected = reference_pgd(model, x, y, EPS, 2 / 255, 10, start)
    attack = PGD(model, eps=EPS, alpha=2 / 255, steps=10, random_start=False)
    ours = attack(x, y, init=start) if shared_start else attack(x, y)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
    assert accuracy(model, ours, y) == accuracy(model, expected, y)
    assert accuracy(model, ours, y) < accuracy(model, x, y)


# --------------------------------------------------------------------------- strength
def test_strength_ordering(trained_tiny_model: nn.Module, tiny_task: Any) -> None:
    model, x, y = trained_tiny_model, tiny_task.x_test, tiny_task.y_test
    clean = accuracy(model, x, y)
    fgsm = accuracy(model, FGSM(model, eps=EPS)(x, y), y)
    pgd = accuracy(model, PGD(model, eps=EPS, alpha=2 / 255, steps=10, seed=0)(x, y), y)
    assert clean >= 0.9
    assert pgd <= fgsm <= clean and pgd < clean - 0.3
    sweep = [
        accuracy(model, PGD(model, eps=e / 255, alpha=e / 1020 + 1e-4, steps=10, seed=0)(x, y), y)
        for e in (0, 2, 4, 8)
    ]
    assert sweep[0] == clean
    assert all(b <= a + 1 / len(y) for a, b in itertools.pairwise(sweep)), sweep
    assert sweep[-1] < sweep[0]


def test_targeted_pgd_hits_the_target(trained_tiny_model: nn.Module, tiny_task: Any) -> None:
    model, x, y = trained_tiny_model, tiny_task.x_test, tiny_task.y_test
    target = (y + 1) % tiny_task.num_classes

    def hit_rate(images: Tensor) -> float:
        return accuracy(model, images, target)

    targeted = PGD(model, eps=16 / 255, alpha=2 / 255, steps=10, targeted=True, seed=0)(x, target)
    untargeted = PGD(model, eps=16 / 255, alpha=2 / 255, steps=10, seed=0)(x, y)
    assert hit_rate(targeted) > hit_rate(x) + 0.4
    assert hit_rate(targeted) > hit_rate(untargeted)


def test_cw_l2_finds_small_successful_perturbations(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model, (x, y) = trained_tiny_model, tiny_batch
    correct = model(x).argmax(1) == y
    cw = CWL2(model, c=5.0, steps=60, lr=0.02)(x, y)
    cw_success = (model(cw).argmax(1) != y) & correct
    assert cw_success.sum() >= 0.8 * correct.sum()
    pgd = PGD(model, eps=1.0, alpha=0.1, steps=20, norm="l2", seed=0)(x, y)
    both = cw_success & (model(pgd).argmax(1) != y)
    assert both.sum() >= 5
    cw_l2, pgd_l2 = per_sample_norm(cw - x, "l2")[both], per_sample_norm(pgd - x, "l2")[both]
    assert cw_l2.mean() < pgd_l2.mean()
    # a failed sample keeps the last iterate; a successful one is the best found, not the last
    weak = CWL2(model, c=1e-3, steps=3, lr=0.01)(x, y)
    assert float(per_sample_norm(weak - x, "l2").max()) < 0.2


def test_cw_binary_search_and_targeted(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model, (x, y) = trained_tiny_model, tiny_batch
    one_round = CWL2(model, c=0.01, steps=30, lr=0.02)(x, y)
    searched = CWL2(model, c=0.01, steps=30, lr=0.02, search_steps=4)(x, y)
    assert (model(searched).argmax(1) != y).sum() > (model(one_round).argmax(1) != y).sum()
    target = (y + 1) % 3
    hit = CWL2(model, c=5.0, steps=40, lr=0.02, targeted=True)(x, target)
    assert accuracy(model, hit, target) >= 0.7


def test_gd_is_unprojected(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    x_adv = GD(trained_tiny_model, alpha=4 / 255, steps=5)(x, y)
    assert float((x_adv - x).abs().max()) > 8 / 255 + TOL  # left the ε-ball that PGD would keep
    assert float((x_adv - x).abs().max()) <= 20 / 255 + TOL
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with_start = GD(trained_tiny_model, alpha=4 / 255, steps=5, init_eps=4 / 255, seed=0)
    assert not torch.equal(with_start(x, y), x_adv)


def test_advprop_rule() -> None:
    # AdvProp §5.1: n = ε + 1 except n = 1 for ε = 1; step size 1; PGD5 at ε = 4 (footnote 1)
    assert [advprop_pgd_steps(e) for e in (1, 2, 3, 4, 6)] == [1, 3, 4, 5, 7]
    attack = advprop_pgd(nn.Linear(2, 2), 4, branch="adv", seed=0)
    assert (attack.eps, attack.alpha, attack.steps, attack.norm) == (4 / 255, 1 / 255, 5, "linf")
    assert attack.random_start and attack.branch == "adv"


def test_loss_hook_with_dense_outputs(
    make_tiny_bn_cnn: Callable[..., nn.Module], tiny_batch: tuple[Tensor, Tensor]
) -> None:
    class TinySegmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_tiny_bn_cnn(seed=1).block1
            self.classifier = nn.Conv2d(8, 3, 1)

        def forward(self, x: Tensor) -> dict[str, Tensor]:  # torchvision-style output
            return {"out": self.classifier(self.body(x))}

    model = TinySegmenter().eval()
    x = tiny_batch[0]
    masks = torch.randint(0, 3, (x.shape[0], 8, 8), generator=torch.Generator().manual_seed(0))
    masks[:, :2] = 255  # ignored pixels

    def per_sample(out: dict[str, Tensor], t: Tensor) -> Tensor:
        return F.cross_entropy(out["out"], t, ignore_index=255, reduction="none").flatten(1).mean(1)

    def summed(out: dict[str, Tensor], t: Tensor) -> Tensor:
        return F.cross_entropy(out["out"], t, ignore_index=255, reduction="sum")

    adv = IFGSM(model, eps=EPS, alpha=2 / 255, steps=5, loss_fn=per_sample)(x, masks)
    with torch.no_grad():
        assert bool((per_sample(model(adv), masks) > per_sample(model(x), masks)).all())
    # a scalar loss gives the same sign-gradient steps as the per-sample one
    assert torch.equal(IFGSM(model, eps=EPS, alpha=2 / 255, steps=5, loss_fn=summed)(x, masks), adv)


def test_cw_margin_loss_as_pgd_objective(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = tiny_batch
    logits = torch.tensor([[3.0, 1.0, 2.0]])
    assert torch.equal(cw_margin_loss(logits, torch.tensor([0])), torch.tensor([-1.0]))
    assert torch.equal(cw_margin_loss(logits, torch.tensor([1])), torch.tensor([2.0]))
    adv = PGD(trained_tiny_model, eps=EPS, loss_fn=cw_margin_loss, seed=0)(x, y)
    assert accuracy(trained_tiny_model, adv, y) < accuracy(trained_tiny_model, x, y) - 0.3


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make",
    [
        lambda m: PGD(m, eps=-0.1),
        lambda m: PGD(m, eps=float("nan")),
        lambda m: PGD(m, eps="8/255"),
        lambda m: PGD(m, eps=torch.tensor([0.1, -0.1])),
        lambda m: PGD(m, eps=torch.zeros(2, 2)),
        lambda m: PGD(m, steps=-1),
        lambda m: PGD(m, steps=2.5),
        lambda m: PGD(m, alpha=0.0),
        lambda m: PGD(m, alpha=-1 / 255),
        lambda m: IFGSM(m, alpha=0),
        lambda m: GD(m, alpha=0),
        lambda m: FGSM(m, eps=-1),
        lambda m: PGD(m, bn_mode="training"),
        lambda m: CWL2(m, c=0),
        lambda m: CWL2(m, steps=-3),
        lambda m: CWL2(m, search_steps=0),
        lambda m: advprop_pgd(m, 0),
        lambda m: advprop_pgd(m, 2.5),
        lambda m: advprop_pgd(m, 4, steps=3),
    ],
)
def test_bad_arguments(make: Callable[[nn.Module], Attack], tiny_bn_cnn: nn.Module) -> None:
    with pytest.raises(AdvfeatError):
        make(tiny_bn_cnn)


def test_unknown_norm_lists_close_matches(tiny_bn_cnn: nn.Module) -> None:
    with pytest.raises(AdvfeatError, match="did you mean 'linf'"):
        PGD(tiny_bn_cnn, norm="lnf")
    assert (
        PGD(tiny_bn_cnn, norm="L2").norm == "l2" and FGSM(tiny_bn_cnn, norm="Linf").norm == "linf"
    )


def test_bad_inputs_at_call_time(tiny_bn_cnn: nn.Module, tiny_batch: tuple[Tensor, Tensor]) -> None:
    x, y = tiny_batch
    attack = PGD(tiny_bn_cnn, steps=1)
    for images in (x * 2, x - 0.5, x * 255):
        with pytest.raises(AdvfeatError, match=r"\[0, 1\]"):
            attack(images, y)
    with pytest.raises(AdvfeatError, match="NaN"):
        attack(torch.where(x == x.max(), float("nan"), x), y)
    with pytest.raises(AdvfeatError, match="floating-point"):
        attack((x * 255).to(torch.uint8), y)
    with pytest.raises(AdvfeatError, match="unexpected attack argument"):
        attack(x, y, start=torch.zeros_like(x))
    with pytest.raises(AdvfeatError, match=r"\(32,\)"):
        PGD(tiny_bn_cnn, eps=torch.full((5,), EPS), steps=1)(x, y)
    with pytest.raises(AdvfeatError, match="alpha"):
        PGD(tiny_bn_cnn, alpha=torch.full((5,), EPS), steps=1)(x, y)
    with pytest.raises(AdvfeatError, match="init"):
        attack(x, y, init=torch.zeros(3))
    with pytest.raises(AdvfeatError, match="logits"):
        CWL2(nn.Conv2d(3, 3, 1), steps=1)(x, y)  # dense output, not logits
    with pytest.raises(AdvfeatError, match="one class label per image"):
        CWL2(tiny_bn_cnn, steps=1)(x, y[:3])

    class Detached(nn.Module):
        def forward(self, images: Tensor) -> Tensor:
            return tiny_bn_cnn(images).detach()

    with pytest.raises(AdvfeatError, match="does not depend on the input"):
        FGSM(Detached())(x, y)


# --------------------------------------------------------------------------- BN branches
def test_attack_through_aux_branch(
    make_tiny_bn_cnn: Callable[..., nn.Module], tiny_batch: tuple[Tensor, Tensor]
) -> None:
    from advfeat import norm

    x, y = tiny_batch[0].double(), tiny_batch[1]
    model = make_tiny_bn_cnn(seed=0).double()
    plain_main = copy.deepcopy(model).eval()
    plain_aux = copy.deepcopy(model)
    norm.convert_multibn(model, branches=("clean", "adv"))
    # give the aux branch statistics of its own (a shifted domain); a plain copy gets the same
    shifted = x * 0.5 + 0.4
    model.train()
    plain_aux.train()
    with torch.no_grad():
        for _ in range(3):
            with norm.use_branch(model, "adv"):
                model(shifted)
            plain_aux(shifted)
    model.eval()
    plain_aux.eval()

    results = {}
    for bn_mode in ("eval", "train"):
        before = model_state(model)
        through_aux = IFGSM(model, steps=3, bn_mode=bn_mode, branch="adv")(x, y)
        through_main = IFGSM(model, steps=3, bn_mode=bn_mode)(x, y)
        assert_same_state(model, before)
        expected_aux = IFGSM(plain_aux, steps=3, bn_mode=bn_mode)(x, y)
        torch.testing.assert_close(through_aux, expected_aux, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            through_main, IFGSM(plain_main, steps=3, bn_mode=bn_mode)(x, y), rtol=0, atol=1e-12
        )
        results[bn_mode] = through_aux, through_main
    # with running statistics the branches differ (in train mode both use batch statistics)
    assert not torch.equal(*results["eval"])
