"""ALFA and L-ALFA at several sites (ALFA Eq. 3 and Eq. 5): the training passes give every weight
the gradient of a full-model forward with the site outputs replaced by ``f + η·δ``, including
sites inside residual blocks (the skip connection jumps over them), and the options reach the
multi-site attack."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from advfeat.attacks.feature import FeaturePGD, MultiSiteFeaturePGD
from advfeat.methods import build_method

ALPHA = 0.05
IN_BLOCK_SITES = ["layer1.1.bn2", "layer2.1.bn2"]  # inside BasicBlocks: `out += identity` follows


@pytest.fixture
def attack_results(monkeypatch: pytest.MonkeyPatch) -> dict[str, Tensor]:
    """Every δ that a feature attack returns during the test, by site."""
    seen: dict[str, Tensor] = {}
    multi_site_call = MultiSiteFeaturePGD.__call__
    single_site_call = FeaturePGD.__call__

    def record_sites(attack: MultiSiteFeaturePGD, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        deltas = multi_site_call(attack, *args, **kwargs)
        seen.update(deltas)
        return deltas

    def record_site(attack: FeaturePGD, *args: Any, **kwargs: Any) -> Tensor:
        delta = single_site_call(attack, *args, **kwargs)
        seen[attack.site] = delta
        return delta

    monkeypatch.setattr(MultiSiteFeaturePGD, "__call__", record_sites)
    monkeypatch.setattr(FeaturePGD, "__call__", record_site)
    return seen


def resnet18() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=4).train()


def images(n: int = 4, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(got: Tensor, want: Tensor) -> float:
    """``‖got − want‖ / ‖want‖``: the summation order of the two graphs differs, so entries of a
    large gradient differ by more than an absolute tolerance allows."""
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@contextmanager
def perturbed_sites(
    model: nn.Module, perturbations: Mapping[str, Tensor], *, constant_prefix: bool
) -> Iterator[None]:
    """Forward hooks: each site outputs ``f + perturbations[site]``.

    ``constant_prefix`` (``adv_grad="tail"``): everything computed before the first site of
    ``perturbations`` (given in execution order) is a constant — its output and the values the
    skip connections carry past it — so only what runs after it is trained.
    """
    first = next(iter(perturbations))

    def perturb(site: str) -> Any:
        def hook(_m: nn.Module, _a: Any, output: Tensor) -> Tensor:
            if site == first and constant_prefix:
                torch.set_grad_enabled(True)
            return output + perturbations[site]

        return hook

    with ExitStack() as stack:
        if constant_prefix:
            stack.enter_context(torch.no_grad())
        for site in perturbations:
            handle = model.get_submodule(site).register_forward_hook(perturb(site))
            stack.callback(handle.remove)
        yield


def reference_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    passes: Sequence[Mapping[str, Tensor]],
    *,
    constant_prefix: bool,
) -> Tensor:
    """``L_clean + Σ_passes L(model with the pass's site outputs f replaced by f + p)``."""
    loss = F.cross_entropy(model(x), y)
    for perturbations in passes:
        with perturbed_sites(model, perturbations, constant_prefix=constant_prefix):
            loss = loss + F.cross_entropy(model(x), y)
    return loss


CASES = [
    pytest.param("alfa", "joint", None, id="alfa-joint"),
    pytest.param("alfa", "separate", None, id="alfa-separate"),
    pytest.param("l-alfa", "joint", [0.3, 0.7], id="l-alfa-joint"),
    pytest.param("l-alfa", "separate", [0.3, 0.7], id="l-alfa-separate"),
    # η = 0 at the first site: it is skipped, which must not change losses or gradients
    pytest.param("l-alfa", "joint", [0.0, 1.0], id="l-alfa-joint-zero-eta"),
    pytest.param("l-alfa", "separate", [0.0, 1.0], id="l-alfa-separate-zero-eta"),
]


@pytest.mark.parametrize("adv_grad", ["full", "tail"])
@pytest.mark.parametrize(("name", "mode", "strengths"), CASES)
def test_multi_site_gradients_equal_the_full_model_reference(
    attack_results: dict[str, Tensor],
    name: str,
    mode: str,
    strengths: list[float] | None,
    adv_grad: str,
) -> None:
    """Every parameter's gradient (and η's) is that of ``L_clean + Σ L_adv`` computed on the full
    model, each site's output replaced by ``f + η·δ`` for the δ the method's attack found."""
    x, y = images()
    initial = resnet18()
    model = copy.deepcopy(initial)
    options: dict[str, Any] = {"gamma": 0.0} if name == "l-alfa" else {}
    method = build_method(
        name, sites=IN_BLOCK_SITES, multi_site=mode, adv_grad=adv_grad, alpha=ALPHA, steps=1,
        lam=1.0, loss_weighting="sum", **options,
    )  # fmt: skip
    method.prepare(model)
    eta = torch.ones(len(IN_BLOCK_SITES))
    if strengths is not None:
        with torch.no_grad():
            method.eta.copy_(torch.tensor(strengths))
        method.project_strengths_()
        eta = method.eta.detach().clone()
    out = method(model, x, y)
    out.loss.backward()
    for site, strength in zip(IN_BLOCK_SITES, eta.tolist(), strict=True):
        size = float(attack_results[site].abs().max()) if site in attack_results else 0.0
        assert (size > 0) == (strength != 0), site  # η = 0: skipped, or attacked to δ = 0

    reference = copy.deepcopy(initial)
    eta_ref = eta.clone().requires_grad_(True)
    shifts = {
        s: eta_ref[i] * attack_results.get(s, torch.zeros(())) for i, s in enumerate(IN_BLOCK_SITES)
    }
    passes = [shifts] if mode == "joint" else [{s: shift} for s, shift in shifts.items()]
    expected = reference_loss(reference, x, y, passes, constant_prefix=adv_grad == "tail")
    expected.backward()

    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    got, want = grads(model), grads(reference)
    assert got.keys() == want.keys()
    errors = {n: relative_error(got[n], want[n]) for n in want}
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.3g}"
    if strengths is not None:
        assert method.eta.grad is not None and eta_ref.grad is not None
        torch.testing.assert_close(method.eta.grad, eta_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_alfa_eps_bounds_the_perturbation_in_every_multi_site_mode(
    attack_results: dict[str, Tensor], mode: str
) -> None:
    """ALFA's ``eps`` clips every site's δ to the L∞ ball, which the same steps leave without it."""
    x, y = images()
    eps = 0.06  # below steps·α = 0.15
    largest = {}
    for bound in (None, eps):
        attack_results.clear()
        method = build_method(
            "alfa", sites=IN_BLOCK_SITES, multi_site=mode, alpha=ALPHA, steps=3, eps=bound
        )
        method(resnet18(), x, y)
        assert sorted(attack_results) == sorted(IN_BLOCK_SITES)
        largest[bound] = {s: float(d.abs().max()) for s, d in attack_results.items()}
    assert all(size > eps for size in largest[None].values())
    assert largest[eps] == pytest.approx(dict.fromkeys(IN_BLOCK_SITES, eps), rel=1e-6)
