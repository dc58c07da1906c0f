"""Feature-space attacks: the Attack guarantees, ALFA/A-FAN/L-ALFA/AdvBN maths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.attacks.feature import (
    BNStatsAttack,
    FeaturePGD,
    MultiSiteFeaturePGD,
    advbn_feature,
    sample_strengths,
)
from advfeat.errors import AdvfeatError
from advfeat.methods.feature_aug import multi_site_outputs
from advfeat.sites import SiteSplit, capture_features, replace_features
from advfeat.tasks import ClassificationTask
from helpers import assert_same_state, model_state


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    g = _gen(5)
    return torch.rand(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


def _features(model: nn.Module, x: Tensor, sites: list[str]) -> dict[str, Tensor]:
    with torch.no_grad(), capture_features(model, sites, detach=True) as feats:
        model(x)
    return dict(feats)


def _hand_gradient(model: nn.Module, site: str, feature: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """∇_f Σ CE(model with site output f) by plain autograd on the full network."""
    leaf = feature.clone().requires_grad_(True)
    with replace_features(model, {site: leaf}):
        loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


# ----------------------------------------------------------------------------- guarantees

AttackFactory = Callable[[nn.Module, str], Any]

ATTACKS: dict[str, AttackFactory] = {
    "pgd-linf": lambda m, bn: FeaturePGD(
        m, "block1", alpha=0.04, steps=3, eps=0.1, random_start=True, bn_mode=bn, seed=0
    ),
    "pgd-l2": lambda m, bn: FeaturePGD(
        m, "block1", alpha=0.3, steps=3, eps=0.5, norm="l2", random_start=True, bn_mode=bn, seed=0
    ),
    "pgd-unbounded": lambda m, bn: FeaturePGD(m, "block2", alpha=0.05, steps=2, bn_mode=bn),
    "advbn": lambda m, bn: BNStatsAttack(m, "block1", eps=0.5, alpha=0.2, steps=3, bn_mode=bn),
    "multi-joint": lambda m, bn: MultiSiteFeaturePGD(
        m, ["block2", "block1"], alpha=0.05, steps=2, eps=0.1, bn_mode=bn, strengths=[0.5, 1.0]
    ),
    "multi-separate": lambda m, bn: MultiSiteFeaturePGD(
        m, ["block1", "block2"], alpha=0.05, steps=2, mode="separate", bn_mode=bn
    ),
}


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_feature_attacks_keep_every_guarantee(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor], kind: str, bn_mode: str
) -> None:
    model = tiny_bn_cnn
    x, y = batch
    feats = _features(model, x, ["block1", "block2"])
    model.train()
    model.block2[1].eval()  # a mixed train/eval state must come back exactly
    model.fc.bias.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # an existing .grad stays as is
    x_kept, feats_kept = x.clone(), {k: v.clone() for k, v in feats.items()}
    attack = ATTACKS[kind](model, bn_mode)
    before = model_state(model)
    if isinstance(attack, MultiSiteFeaturePGD):
        results = [attack(x, y, features=feats), attack(x, y)]
    else:
        results = [attack(x, y, feature=feats[attack.site]), attack(x, y)]
    assert_same_state(model, before)
    assert torch.equal(x, x_kept)
    for k in feats:
        assert torch.equal(feats[k], feats_kept[k])
    for result in results:
        deltas = result if isinstance(result, dict) else {getattr(attack, "site", ""): result}
        for site, delta in deltas.items():
            assert not delta.requires_grad
            assert delta.shape == feats[site].shape
            eps = getattr(attack, "eps", None)
            if isinstance(attack, (FeaturePGD, MultiSiteFeaturePGD)) and eps is not None:
                size = attack.threat.norm(delta)
                assert bool((size <= eps + 1e-5).all()), (kind, size.max())
                assert float(size.max()) > 0


def test_attack_runs_with_parameters_that_require_no_grad_and_inside_no_grad(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    x, y = batch
    for p in tiny_bn_cnn.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        delta = FeaturePGD(tiny_bn_cnn, "block1", alpha=0.1)(x, y)
    assert float(delta.abs().max()) == pytest.approx(0.1)
    assert not any(p.requires_grad for p in tiny_bn_cnn.parameters())


# ----------------------------------------------------------------------------- FeaturePGD


@pytest.mark.parametrize("site", ["block1", "block2"])
def test_one_unbounded_step_is_alpha_times_gradient_sign(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor], site: str
) -> None:
    model = tiny_bn_cnn.eval()
    x, y = batch
    f = _features(model, x, [site])[site]
    delta = FeaturePGD(model, site, alpha=0.03, steps=1)(x, y, feature=f)
    expected = 0.03 * _hand_gradient(model, site, f, x, y).sign()
    assert torch.equal(delta, expected)
    # Targeted: the step descends the loss towards the target.
    toward = FeaturePGD(model, site, alpha=0.03, targeted=True)(x, y, feature=f)
    assert torch.equal(toward, -expected)


def test_unbounded_steps_accumulate_without_projection(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    model = tiny_bn_cnn.eval()
    x, y = batch
    f = _features(model, x, ["block1"])["block1"]
    delta = FeaturePGD(model, "block1", alpha=0.02, steps=4)(x, y, feature=f)
    # By hand: four sign steps, each at the current perturbed feature.
    d = torch.zeros_like(f)
    for _ in range(4):
        d = d + 0.02 * _hand_gradient(model, "block1", f + d, x, y).sign()
    torch.testing.assert_close(delta, d)
    assert float(delta.abs().max()) > 0.05  # beyond one step: nothing clipped it


def test_given_feature_runs_only_the_tail(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    model = tiny_bn_cnn
    x, y = batch
    f = _features(model, x, ["block2"])["block2"]
    calls = {"block1": 0, "fc": 0}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda *_, n=n: calls.__setitem__(n, calls[n] + 1)
        )
        for n in calls
    ]
    try:
        attack = FeaturePGD(model, "block2", alpha=0.05, steps=3)
        assert attack.split.is_fast
        attack(x, y, feature=f)
        assert calls == {"block1": 0, "fc": 3}
        attack(x, y)  # without the feature: the head runs once
        assert calls == {"block1": 1, "fc": 6}
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.4)])
def test_scalar_and_per_sample_eps_agree(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor], norm: str, eps: float
) -> None:
    model = tiny_bn_cnn.eval()
    x, y = batch
    f = _features(model, x, ["block1"])["block1"]
    options = dict(alpha=eps / 2, steps=3, norm=norm, random_start=True, seed=3)
    scalar = FeaturePGD(model, "block1", eps=eps, **options)(x, y, feature=f)
    per_sample = FeaturePGD(model, "block1", eps=torch.full((4,), eps), **options)(x, y, feature=f)
    assert torch.equal(scalar, per_sample)
    with pytest.raises(AdvfeatError, match="per-sample eps"):
        FeaturePGD(model, "block1", eps=torch.full((3,), eps), **options)(x, y, feature=f)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_batch_equals_one_by_one_with_eval_bn(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor], norm: str
) -> None:
    model = tiny_bn_cnn
    x, y = batch
    eps = torch.tensor([0.02, 0.05, 0.1, 0.2]) * (1 if norm == "linf" else 8)
    attack = FeaturePGD(model, "block1", alpha=0.03, steps=4, eps=eps, norm=norm, bn_mode="eval")
    together = attack(x, y)
    for i in range(4):
        alone = FeaturePGD(
            model, "block1", alpha=0.03, steps=4, eps=float(eps[i]), norm=norm, bn_mode="eval"
        )(x[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_bad_options_raise_clear_errors(tiny_bn_cnn: nn.Module, batch) -> None:
    x, y = batch
    with pytest.raises(AdvfeatError, match="unbounded"):
        FeaturePGD(tiny_bn_cnn, "block1", alpha=0.1, norm="l2")
    with pytest.raises(AdvfeatError, match="leave eps=None"):
        FeaturePGD(tiny_bn_cnn, "block1", alpha=0.1, eps=0.1, norm="unbounded")
    with pytest.raises(AdvfeatError, match="alpha must be a finite number > 0"):
        FeaturePGD(tiny_bn_cnn, "block1", alpha=0.0)
    with pytest.raises(AdvfeatError, match="steps"):
        FeaturePGD(tiny_bn_cnn, "block1", alpha=0.1, steps=0)
    with pytest.raises(AdvfeatError, match="did you mean 'block1'"):
        FeaturePGD(tiny_bn_cnn, "blok1", alpha=0.1)
    with pytest.raises(AdvfeatError, match="unknown norm"):
        FeaturePGD(tiny_bn_cnn, "block1", alpha=0.1, eps=0.1, norm="l3")
    with pytest.raises(AdvfeatError, match="unexpected"):
        FeaturePGD(tiny_bn_cnn, "block1", alpha=0.1)(x, y, features=None)
    with pytest.raises(AdvfeatError, match="eps must be a number"):
        BNStatsAttack(tiny_bn_cnn, "block1", eps=torch.ones(4))  # type: ignore[arg-type]
    with pytest.raises(AdvfeatError, match="unknown AdvBN statistics"):
        BNStatsAttack(tiny_bn_cnn, "block1", stats="layer")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- A-FAN


def test_sample_strengths() -> None:
    a = sample_strengths(5, 0.5 / 255, _gen(0))
    b = sample_strengths(5, 0.5 / 255, _gen(0))
    assert a.shape == (5,) and torch.equal(a, b)
    assert bool((a > 0).all()) and bool((a <= 0.5 / 255).all())
    assert len(set(a.tolist())) == 5
    grid = sample_strengths(4, 1.0, spacing="grid")
    torch.testing.assert_close(grid, torch.tensor([0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(AdvfeatError, match="k"):
        sample_strengths(0, 1.0)
    with pytest.raises(AdvfeatError, match="unknown strength spacing"):
        sample_strengths(3, 1.0, spacing="log")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- L-ALFA


def test_joint_multi_site_with_one_site_is_feature_pgd(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    model = tiny_bn_cnn.eval()
    x, y = batch
    f = _features(model, x, ["block1"])
    multi = MultiSiteFeaturePGD(model, ["block1"], alpha=0.03, steps=3, eps=0.05)(x, y, features=f)
    single = FeaturePGD(model, "block1", alpha=0.03, steps=3, eps=0.05)(x, y, feature=f["block1"])
    assert torch.equal(multi["block1"], single)


def test_multi_site_strengths_and_modes(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    model = tiny_bn_cnn.eval()
    x, y = batch
    sites = ["block2", "block1"]
    feats = _features(model, x, sites)
    joint = MultiSiteFeaturePGD(model, sites, alpha=0.04, steps=1, strengths=[0.5, 2.0])
    assert joint.ordered_sites() == ["block1", "block2"]
    separate = MultiSiteFeaturePGD(
        model, sites, alpha=0.04, steps=1, strengths=[0.5, 2.0], mode="separate"
    )
    dj, ds = joint(x, y, features=feats), separate(x, y, features=feats)
    # At the clean point (one step from zero) both readings take the same gradient sign.
    for s in sites:
        assert torch.equal(dj[s], ds[s])
        assert torch.equal(dj[s], 0.04 * _hand_gradient(model, s, feats[s], x, y).sign())
    # η_i = 0 switches a site off (its δ gets no gradient).
    off = joint(x, y, features=feats, strengths=[0.0, 1.0])
    assert float(off["block2"].abs().max()) == 0.0 and float(off["block1"].abs().max()) > 0
    # Several joint steps: δ_block2 follows the gradient at the jointly perturbed point.
    two = MultiSiteFeaturePGD(model, sites, alpha=0.04, steps=2, strengths=[0.5, 2.0])
    d2 = two(x, y, features=feats)
    f1_adv = feats["block1"] + 2.0 * dj["block1"]
    with torch.no_grad(), replace_features(model, {"block1": f1_adv}):
        f2_at_step2 = model.block2(f1_adv)
    g2 = _hand_gradient_joint(model, f1_adv, f2_at_step2 + 0.5 * dj["block2"], x, y)
    torch.testing.assert_close(d2["block2"], dj["block2"] + 0.04 * g2.sign())


def _hand_gradient_joint(model: nn.Module, f1: Tensor, f2: Tensor, x: Tensor, y: Tensor) -> Tensor:
    leaf = f2.clone().requires_grad_(True)
    with replace_features(model, {"block1": f1, "block2": leaf}):
        loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def test_adversarial_outputs_train_the_strengths(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    model = tiny_bn_cnn.eval()
    x, y = batch
    sites = ["block1", "block2"]
    feats = _features(model, x, sites)
    eta = torch.tensor([0.3, 0.7], requires_grad=True)
    for mode in ("joint", "separate"):
        attack = MultiSiteFeaturePGD(model, sites, alpha=0.05, steps=2, mode=mode)  # type: ignore[arg-type]
        deltas = attack(x, y, features=feats, strengths=eta)
        clean = ClassificationTask().clean_pass(model, x, y, sites)
        outputs = multi_site_outputs(attack, clean, deltas, feats, strengths=eta)
        assert len(outputs) == (1 if mode == "joint" else 2)
        if mode == "joint":
            f1 = feats["block1"] + 0.3 * deltas["block1"]
            d2 = deltas["block2"]
            with (
                torch.no_grad(),
                replace_features(model, {"block1": f1, "block2": lambda t, d2=d2: t + 0.7 * d2}),
            ):
                torch.testing.assert_close(outputs[0].detach(), model(x))
        loss = sum(F.cross_entropy(o, y) for o in outputs)
        (grad,) = torch.autograd.grad(loss, eta)
        assert bool((grad != 0).all())


def test_multi_site_option_errors(tiny_bn_cnn: nn.Module) -> None:
    with pytest.raises(AdvfeatError, match="inside"):
        MultiSiteFeaturePGD(tiny_bn_cnn, ["block1", "block1.0"], alpha=0.1)
    with pytest.raises(AdvfeatError, match="distinct"):
        MultiSiteFeaturePGD(tiny_bn_cnn, ["block1", "block1"], alpha=0.1)
    with pytest.raises(AdvfeatError, match="one value per site"):
        MultiSiteFeaturePGD(tiny_bn_cnn, ["block1", "block2"], alpha=0.1, strengths=[1.0])
    with pytest.raises(AdvfeatError, match="unknown multi-site mode"):
        MultiSiteFeaturePGD(tiny_bn_cnn, ["block1"], alpha=0.1, mode="all")  # type: ignore[arg-type]
    with pytest.raises(AdvfeatError, match="non-empty"):
        MultiSiteFeaturePGD(tiny_bn_cnn, "block1", alpha=0.1)


# --------------------------------------------------------------------------------- AdvBN


def test_advbn_feature_is_the_papers_renormalization() -> None:
    f = torch.randn(3, 2, 4, 4, generator=_gen(7)) + torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    d_mu, d_sigma = torch.tensor([1.5, 0.5]), torch.tensor([0.8, 1.3])
    mu = f.mean(dim=(0, 2, 3), keepdim=True)
    expected = d_sigma.view(1, 2, 1, 1) * (f - mu) + d_mu.view(1, 2, 1, 1) * mu
    torch.testing.assert_close(advbn_feature(f, d_mu, d_sigma), expected)
    out = advbn_feature(f, d_mu, d_sigma)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), d_mu * mu.flatten())
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), d_sigma * f.std(dim=(0, 2, 3)))
    torch.testing.assert_close(advbn_feature(f, torch.ones(2), torch.ones(2)), f)
    per_instance = advbn_feature(f, d_mu, d_sigma, stats="instance")
    torch.testing.assert_close(per_instance.mean(dim=(2, 3)), d_mu * f.mean(dim=(2, 3)))
    with pytest.raises(AdvfeatError, match="one multiplier per channel"):
        advbn_feature(f, torch.ones(3), torch.ones(2))


def test_advbn_attack_stays_in_bounds_and_increases_the_loss(
    trained_tiny_model: nn.Module, tiny_batch: tuple[Tensor, Tensor]
) -> None:
    model = trained_tiny_model
    x, y = tiny_batch
    f = _features(model, x, ["block1"])["block1"]
    attack = BNStatsAttack(model, "block1", eps=0.3, alpha=0.2, steps=4)
    f_adv = attack(x, y, feature=f)
    assert attack.last_multipliers is not None
    d_mu, d_sigma = attack.last_multipliers
    assert d_mu.shape == d_sigma.shape == (8,)
    for d in (d_mu, d_sigma):
        assert bool((d >= 0.7 - 1e-6).all()) and bool((d <= 1.3 + 1e-6).all())
        assert float((d - 1).abs().max()) == pytest.approx(0.3)  # steps of 0.2 hit the bound
    torch.testing.assert_close(f_adv, advbn_feature(f, d_mu, d_sigma))
    split = SiteSplit(model, "block1")
    with torch.no_grad():
        clean_loss = F.cross_entropy(split.tail(f), y)
        adv_loss = F.cross_entropy(split.tail(f_adv), y)
    assert float(adv_loss) > float(clean_loss) + 0.05
    none = BNStatsAttack(model, "block1", eps=0.3, alpha=0.2, steps=0)(x, y, feature=f)
    torch.testing.assert_close(none, f)


def test_advbn_random_start_is_seeded(tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    runs = [
        BNStatsAttack(tiny_bn_cnn, "block1", eps=0.5, steps=1, random_start=True, seed=4)(x, y)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------------ feature contract

CONTRACT_BALLS: dict[str, tuple[str, float] | None] = {
    "pgd-linf": ("linf", 0.1),
    "pgd-l2": ("l2", 0.5),
    "pgd-unbounded": None,
    "advbn": None,
    "multi-joint": ("linf", 0.1),
    "multi-separate": None,
}


def _contract_results(kind: str, attack: Any, x: Tensor, y: Tensor, feats: dict[str, Tensor]):
    if kind.startswith("multi"):
        return attack(x, y, features=feats)
    return {attack.site: attack(x, y, feature=feats[attack.site])}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_feature_attack_contract_on_random_inputs(
    kind: str, seed: int, make_tiny_bn_cnn: Callable[..., nn.Module]
) -> None:
    """The feature-attack contract (FeatureAttack.enforce) on random batches and scales: per
    site, a detached finite tensor of the feature's shape and dtype, in its ε-ball; the clean
    features are not written to."""
    g = _gen(100 + seed)
    batch = int(torch.randint(2, 7, (1,), generator=g))
    scale = float(10 ** (4 * torch.rand(1, generator=g) - 2))  # images in [0, 1], features ×
    model = make_tiny_bn_cnn(seed=seed).train()
    x = torch.rand(batch, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    feats = {s: f * scale for s, f in _features(model, x, ["block1", "block2"]).items()}
    kept = {s: f.clone() for s, f in feats.items()}
    attack = ATTACKS[kind](model, "train")
    results = _contract_results(kind, attack, x, y, feats)
    assert set(results) == set(attack.sites)
    for site, result in results.items():
        assert result.shape == feats[site].shape and result.dtype == feats[site].dtype
        assert not result.requires_grad and bool(torch.isfinite(result).all())
        ball = CONTRACT_BALLS[kind]
        if ball is not None:
            norm, radius = ball
            flat = result.flatten(1)
            size = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
            assert float(size.max()) <= radius + 1e-6
        assert torch.equal(feats[site], kept[site])


def test_feature_attack_contract_refuses_non_finite_and_misshaped_results(
    tiny_bn_cnn: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    x, y = batch
    f = _features(tiny_bn_cnn, x, ["block1"])["block1"]
    nan_tail = FeaturePGD(  # an L2 step divides the gradient by its (NaN) norm
        tiny_bn_cnn, "block1", alpha=0.1, eps=1.0, norm="l2",
        tail=lambda t: t.flatten(1) * float("nan"),
    )  # fmt: skip
    with pytest.raises(AdvfeatError, match="non-finite"):
        nan_tail(x, y, feature=f)

    class Misshaped(FeaturePGD):
        def perturb(self, x: Any, y: Any, features: Any, **options: Any) -> dict[str, Tensor]:
            return {self.site: torch.zeros(1)}

    with pytest.raises(AdvfeatError, match="whose feature is"):
        Misshaped(tiny_bn_cnn, "block1", alpha=0.1)(x, y, feature=f)
