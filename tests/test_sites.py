"""Feature sites: names, capture/replace hooks, tail-only execution (fast path and fallback)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from advfeat.errors import AdvfeatError
from advfeat.sites import (
    SiteSplit,
    capture_features,
    replace_features,
    resolve_site,
    site_order,
    unwrap_model,
)


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def small_resnet(seed: int) -> nn.Module:
    """A torchvision ResNet with one BasicBlock per stage (built from a private seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> tuple[Tensor, Tensor]:
    g = _seeded(1)
    return torch.rand(2, 3, 32, 32, generator=g), torch.tensor([3, 7])


class SkipOverSite(nn.Module):
    """``out = c(b(a(x)) + a(x))``: the value of ``a`` jumps over site ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.c = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.c(self.b(h) + h)


class DataDependentBlock(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace this ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y if bool(y.detach().mean() > -1e9) else -y


class WithUntraceableBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.site = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.odd = DataDependentBlock()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.odd(self.site(self.stem(x))))


class UntraceableRoot(WithUntraceableBlock):
    def forward(self, x: Tensor) -> Tensor:
        h = self.site(self.stem(x))
        if bool(h.detach().sum() > -1e9):  # control flow in the root forward itself
            h = self.odd(h)
        return self.head(h)


def _reference(model: nn.Module, site: str, feature: Tensor, x: Tensor) -> Tensor:
    """Full forward with the site's output replaced by ``feature`` (hook-based ground truth)."""
    with replace_features(model, {site: feature}):
        return model(x)


def _grads(model: nn.Module, output: Tensor, feature: Tensor) -> tuple[Tensor, list]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = output.square().sum() + output[:, 0].sum()
    got = torch.autograd.grad(loss, [feature, *params], allow_unused=True)
    return got[0], list(got[1:])


def _assert_same_grads(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ga, gb in zip(a, b, strict=True):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def _check_tail_equals_full(
    model: nn.Module, site: str, x: Tensor, *, fast: bool, prefix: tuple[str, ...] = ()
) -> None:
    """Outputs and gradients (feature, parameters) of the tail equal the full network's.

    ``prefix``: modules before the site whose parameters the fallback's reference reaches
    through a skip connection; the tail, like the fast path, gives them no gradient.
    """
    split = SiteSplit(model, site)
    assert split.is_fast is fast, split.fallback_reason
    with torch.no_grad(), capture_features(model, site) as feats:
        clean_out = model(x)
    clean = feats[site]
    kwargs = {} if fast else {"x": x}
    torch.testing.assert_close(split.tail(clean, **kwargs), clean_out)
    noise = 0.1 * torch.randn(clean.shape, generator=_seeded(2))
    f_ref = (clean + noise).requires_grad_(True)
    f_tail = (clean + noise).requires_grad_(True)
    out_ref = _reference(model, site, f_ref, x)
    out_tail = split.tail(f_tail, **kwargs)
    torch.testing.assert_close(out_tail, out_ref)
    g_ref, p_ref = _grads(model, out_ref, f_ref)
    g_tail, p_tail = _grads(model, out_tail, f_tail)
    torch.testing.assert_close(g_tail, g_ref)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    skipped = [i for i, n in enumerate(names) if n.split(".")[0] in prefix]
    assert all(p_tail[i] is None for i in skipped)
    keep = [i for i in range(len(names)) if i not in skipped]
    _assert_same_grads([p_tail[i] for i in keep], [p_ref[i] for i in keep])
    assert any(g is not None for g in p_tail), "tail parameters must receive gradients"


# ------------------------------------------------------------------------------ names


def test_resolve_site_and_unknown_names(resnet18: nn.Module) -> None:
    assert resolve_site(resnet18, "layer4.0") is resnet18.layer4[0]
    with pytest.raises(AdvfeatError, match="did you mean 'layer3'"):
        resolve_site(resnet18, "layr3")
    with pytest.raises(AdvfeatError, match=r"unknown feature site 'layer4\.7'"):
        SiteSplit(resnet18, "layer4.7")
    with pytest.raises(AdvfeatError, match="not the whole model"):
        resolve_site(resnet18, "")


def test_dataparallel_wrapper_names(resnet18: nn.Module, images: tuple[Tensor, Tensor]) -> None:
    x, _ = images
    wrapped = nn.DataParallel(resnet18)
    assert unwrap_model(wrapped) is resnet18
    assert resolve_site(wrapped, "layer3") is resnet18.layer3
    assert resolve_site(wrapped, "module.layer3") is resnet18.layer3
    with torch.no_grad(), capture_features(wrapped, "module.layer3") as feats:
        out = wrapped(x)
    split = SiteSplit(wrapped, "module.layer3")
    assert split.site == "layer3" and split.is_fast
    torch.testing.assert_close(split.tail(feats["module.layer3"]), out)


# -------------------------------------------------------------------- capture and replace


def test_capture_keeps_graph_and_removes_hooks(resnet18: nn.Module, images) -> None:
    x, _ = images
    with capture_features(resnet18, ["layer2", "layer4.0"]) as feats:
        out = resnet18(x)
    assert set(feats) == {"layer2", "layer4.0"}
    assert feats["layer2"].shape == (2, 128, 4, 4)
    (grad,) = torch.autograd.grad(feats["layer2"].sum(), resnet18.conv1.weight)
    assert grad.abs().sum() > 0  # the captured feature is still attached to the prefix
    assert out.requires_grad
    assert not resnet18.layer2._forward_hooks and not resnet18.layer4[0]._forward_hooks
    with capture_features(resnet18, "layer2", detach=True) as feats:
        resnet18(x)
    assert not feats["layer2"].requires_grad


def test_replace_features_semantics(resnet18: nn.Module, images) -> None:
    x, _ = images
    with torch.no_grad(), capture_features(resnet18, "layer4") as feats:
        clean = resnet18(x)
    zero = torch.zeros_like(feats["layer4"])
    with torch.no_grad(), replace_features(resnet18, {"layer4": zero}):
        out_zero = resnet18(x)
    torch.testing.assert_close(out_zero, resnet18.fc.bias.expand(2, -1).detach())
    with torch.no_grad(), replace_features(resnet18, {"layer4": lambda f: f * 0}):
        torch.testing.assert_close(resnet18(x), out_zero)
    assert not resnet18.layer4._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(resnet18(x), clean)  # nothing left behind
    with (
        pytest.raises(AdvfeatError, match="same shape"),
        replace_features(resnet18, {"layer4": zero[:1]}),
    ):
        resnet18(x)
    with (
        pytest.raises(AdvfeatError, match="tensor or a callable"),
        replace_features(resnet18, {"layer4": 3}),  # type: ignore[dict-item]
    ):
        pass


# --------------------------------------------------------------------------- fast tails


@pytest.mark.parametrize("site", ["layer2", "layer3", "layer4.0"])
def test_resnet18_tail_equals_full_network(resnet18: nn.Module, images, site: str) -> None:
    _check_tail_equals_full(resnet18, site, images[0], fast=True)


def test_tail_equals_full_network_in_train_mode(images) -> None:
    model = small_resnet(3).train()
    _check_tail_equals_full(model, "layer3", images[0], fast=True)


def test_fast_tail_skips_the_prefix(resnet18: nn.Module, images) -> None:
    x, _ = images
    calls = {"conv1": 0, "layer1": 0, "layer2": 0, "layer4": 0, "fc": 0}
    handles = [
        resnet18.get_submodule(n).register_forward_hook(
            lambda *_, n=n: calls.__setitem__(n, calls[n] + 1)
        )
        for n in calls
    ]
    try:
        with torch.no_grad(), capture_features(resnet18, "layer3") as feats:
            out = resnet18(x)
        assert all(v == 1 for v in calls.values())
        split = SiteSplit(resnet18, "layer3")
        calls.update(dict.fromkeys(calls, 0))
        with torch.no_grad():
            torch.testing.assert_close(split.tail(feats["layer3"]), out)
        assert calls == {"conv1": 0, "layer1": 0, "layer2": 0, "layer4": 1, "fc": 1}
        calls.update(dict.fromkeys(calls, 0))
        with torch.no_grad():
            head = split.head(x)  # stops right after the site
        torch.testing.assert_close(head, feats["layer3"])
        assert calls == {"conv1": 1, "layer1": 1, "layer2": 1, "layer4": 0, "fc": 0}
    finally:
        for h in handles:
            h.remove()


def test_submodule_hooks_still_run_in_the_tail(resnet18: nn.Module, images) -> None:
    x, _ = images
    handles = [
        resnet18.layer3[0].register_forward_hook(lambda _m, _a, out: out * 2),
        resnet18.layer4[1].register_forward_pre_hook(lambda _m, args: (args[0] + 1,)),
        resnet18.layer1.register_forward_hook(lambda _m, _a, out: out - 0.5),  # in the head
    ]
    try:
        _check_tail_equals_full(resnet18, "layer2", x, fast=True)
    finally:
        for h in handles:
            h.remove()


def test_tail_uses_the_live_model(images) -> None:
    model = small_resnet(5)
    x, _ = images
    split = SiteSplit(model, "layer4")
    assert split.is_fast
    model.fc = nn.Linear(512, 3)  # same type: the cached trace is reused
    with torch.no_grad(), capture_features(model, "layer4") as feats:
        out = model(x)
    assert out.shape == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(SiteSplit(model, "layer4").tail(feats["layer4"]), out)


def test_sequential_model_and_nested_replacement() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    ).eval()
    x = torch.rand(3, 3, 8, 8, generator=_seeded(7))
    _check_tail_equals_full(model, "2", x, fast=True)
    _check_tail_equals_full(model, "3.0", x, fast=True)  # nested site: traced
    with torch.no_grad(), capture_features(model, "2") as feats:
        model(x)
    with torch.no_grad(), replace_features(model, {"3.0": lambda t: t * 3}):
        ref = model(x)
    with torch.no_grad():
        got = SiteSplit(model, "2").tail(feats["2"], {"3.0": lambda t: t * 3})
    torch.testing.assert_close(got, ref)
    with pytest.raises(AdvfeatError, match="does not run after"):
        SiteSplit(model, "2").tail(feats["2"], {"0": lambda t: t})


def test_normalize_pre_hook_is_part_of_the_head(images) -> None:
    model = small_resnet(8)
    if importlib.util.find_spec("advfeat.models") is not None:
        from advfeat.models import attach_normalize

        attach_normalize(model, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
        assert model._forward_pre_hooks
    else:
        model.register_forward_pre_hook(lambda _m, args: ((args[0] - 0.5) / 0.25,))
    x, _ = images
    _check_tail_equals_full(model, "layer3", x, fast=True)
    with torch.no_grad(), capture_features(model, "layer3") as feats:
        model(x)
        head = SiteSplit(model, "layer3").head(x)
    torch.testing.assert_close(head, feats["layer3"])


def test_replacements_inside_the_tail(resnet18: nn.Module, images) -> None:
    x, _ = images
    split = SiteSplit(resnet18, "layer2")
    replacements = {"layer3.1": lambda t: t * 1.5, "layer4": lambda t: t + 0.25}
    assert split.is_fast_for(replacements)
    with torch.no_grad(), capture_features(resnet18, "layer2") as feats:
        resnet18(x)
    f = feats["layer2"] + 0.05
    with torch.no_grad(), replace_features(resnet18, {"layer2": f, **replacements}):
        ref = resnet18(x)
    with torch.no_grad():
        torch.testing.assert_close(split.tail(f, replacements), ref)
    with pytest.raises(AdvfeatError, match="does not run after"):
        split.tail(f, {"layer1": lambda t: t})
    with pytest.raises(AdvfeatError, match="inside"):
        split.tail(f, {"layer2.0": lambda t: t})


def test_tail_never_writes_into_the_feature() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten()
    ).eval()
    x = torch.rand(2, 3, 5, 5, generator=_seeded(10))
    feature = torch.randn(2, 4, 3, 3, generator=_seeded(11))
    kept = feature.clone()
    out = SiteSplit(model, "1").tail(feature)
    assert torch.equal(feature, kept)
    torch.testing.assert_close(out, feature.relu().flatten(1))
    leaf = feature.clone().requires_grad_(True)  # an in-place ReLU on a leaf would fail
    SiteSplit(model, "1").tail(leaf).sum().backward()
    assert leaf.grad is not None
    del x


def test_site_order(resnet18: nn.Module, images) -> None:
    sites = ["layer4.1", "layer2", "layer3.0", "layer4.0"]
    assert site_order(resnet18, sites) == ["layer2", "layer3.0", "layer4.0", "layer4.1"]
    model = UntraceableRoot()
    assert site_order(model, ["odd", "site"], images[0][:, :, :8, :8]) == ["site", "odd"]


# ------------------------------------------------------------------------------- fallback


def test_skip_over_the_site_needs_the_captured_frontier() -> None:
    torch.manual_seed(12)
    model = SkipOverSite()
    x = torch.rand(2, 3, 8, 8, generator=_seeded(13))
    split = SiteSplit(model, "b")
    assert split.is_fast and split.frontier == ("a",)
    # no frontier captured: the full-model fallback, whose prefix runs without gradients
    with torch.no_grad(), capture_features(model, "b") as feats:
        model(x)
    with pytest.raises(AdvfeatError, match="frontier=True"):
        split.tail(feats["b"])
    f = feats["b"].clone().requires_grad_(True)
    out_full = split.tail(f, x=x)
    out_full.sum().backward()
    grad_c = model.c[1].weight.grad.clone()
    assert model.a.weight.grad is None
    model.zero_grad(set_to_none=True)
    # the clean pass captured the frontier: tail-only (``a`` does not run), same results
    with capture_features(model, "b", frontier=True) as feats:
        model(x)
    calls: list[int] = []
    handle = model.a.register_forward_hook(lambda *_: calls.append(1))
    try:
        f_fast = feats["b"].detach().requires_grad_(True)
        out_fast = split.tail(f_fast, x=x)
    finally:
        handle.remove()
    assert not calls
    torch.testing.assert_close(out_fast, out_full)
    out_fast.sum().backward()
    assert model.a.weight.grad is None  # prefix_grad=False: the skip value is a constant
    torch.testing.assert_close(model.c[1].weight.grad, grad_c)
    torch.testing.assert_close(f_fast.grad, f.grad)
    model.zero_grad(set_to_none=True)
    assert torch.is_grad_enabled()


def test_prefix_grad_option_reaches_layers_before_the_site() -> None:
    torch.manual_seed(14)
    model = SkipOverSite()
    x = torch.rand(2, 3, 8, 8, generator=_seeded(15))
    with torch.no_grad(), capture_features(model, "b") as feats:
        model(x)
    SiteSplit(model, "b", prefix_grad=True).tail(feats["b"], x=x).sum().backward()
    assert model.a.weight.grad is not None  # through the skip connection


def test_untraceable_submodule_is_kept_whole() -> None:
    torch.manual_seed(16)
    model = WithUntraceableBlock().eval()
    x = torch.rand(2, 3, 8, 8, generator=_seeded(17))
    _check_tail_equals_full(model, "site", x, fast=True)


def test_untraceable_model_falls_back() -> None:
    torch.manual_seed(18)
    model = UntraceableRoot().eval()
    x = torch.rand(2, 3, 8, 8, generator=_seeded(19))
    assert "cannot trace" in SiteSplit(model, "site").fallback_reason
    _check_tail_equals_full(model, "site", x, fast=False)


def test_root_forward_hook_falls_back(resnet18: nn.Module, images) -> None:
    handle = resnet18.register_forward_hook(lambda _m, _a, out: out * 2)
    try:
        _check_tail_equals_full(resnet18, "layer3", images[0], fast=False)
    finally:
        handle.remove()
    assert SiteSplit(resnet18, "layer3").is_fast


def test_fallback_rejects_sites_that_run_twice(resnet18: nn.Module, images) -> None:
    x, _ = images
    split = SiteSplit(resnet18, "layer4.0.relu")  # torchvision reuses this ReLU
    assert not split.is_fast
    with pytest.raises(AdvfeatError, match="more than once"):
        split.tail(torch.zeros(2, 512, 1, 1), x=x)


# ----------------------------------------------------------------- other advfeat modules


def test_cifar_resnet_from_the_model_zoo() -> None:
    from advfeat import models

    torch.manual_seed(21)
    model = models.build_model("resnet20", num_classes=10).eval()
    x = torch.rand(2, 3, 16, 16, generator=_seeded(22))
    _check_tail_equals_full(model, "layer3", x, fast=True)
    _check_tail_equals_full(model, "layer2.1", x, fast=True)


def test_multi_branch_bn_is_a_leaf_and_routes_in_the_tail() -> None:
    from advfeat import norm

    model = norm.convert_multibn(small_resnet(23)).train()
    x = torch.rand(4, 3, 32, 32, generator=_seeded(24))
    for m in model.modules():  # give the branches different affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
    _check_tail_equals_full(model, "layer3", x, fast=True)
    with torch.no_grad(), norm.use_branch(model, "adv"):
        with capture_features(model, "layer3") as feats:
            out_adv = model(x)
        torch.testing.assert_close(SiteSplit(model, "layer3").tail(feats["layer3"]), out_adv)


def test_loss_through_tail_trains_the_model(resnet18: nn.Module, images) -> None:
    x, y = images
    model = resnet18
    with torch.no_grad(), capture_features(model, "layer3") as feats:
        model(x)
    loss = F.cross_entropy(SiteSplit(model, "layer3").tail(feats["layer3"]), y)
    loss.backward()
    try:
        assert model.layer4[1].conv2.weight.grad is not None  # the model's own parameters
        assert model.layer1[0].conv1.weight.grad is None
    finally:
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ declared sites
DECLARED = ["layer1.2", "layer2.2", "layer3.1"]


def test_a_model_declares_its_sites() -> None:
    from advfeat.methods import build_method
    from advfeat.models import build_model
    from advfeat.sites import declared_sites, last_stage, spread_blocks, stage_blocks

    model = build_model("resnet20", num_classes=3, image_size=8)
    assert declared_sites(model) is None
    assert last_stage(model) == "layer3"  # the structural rule without a declaration
    model.feature_sites = DECLARED  # type: ignore[assignment]
    assert declared_sites(model) == DECLARED
    assert declared_sites(nn.DataParallel(model)) == DECLARED  # wrappers are transparent
    assert last_stage(model) == "layer3.1"  # the last declared site: ALFA's / A-FAN's default
    assert stage_blocks(model) == DECLARED
    assert spread_blocks(model, 2) == DECLARED  # L-ALFA's default: every declared site
    alfa = build_method("alfa")
    alfa.prepare(model)
    assert alfa.resolve_sites(model) == ["layer3.1"]
    l_alfa = build_method("l-alfa")
    l_alfa.prepare(model)
    assert l_alfa.eta_sites == DECLARED


@pytest.mark.parametrize("declared", ["layer3", [], ["layer3", 3], ["layer9"]])
def test_a_wrong_site_declaration_is_a_clear_error(declared: object) -> None:
    from advfeat.models import build_model
    from advfeat.sites import last_stage

    model = build_model("resnet20", num_classes=3, image_size=8)
    model.feature_sites = declared  # type: ignore[assignment]
    with pytest.raises(AdvfeatError, match=r"feature_sites|feature site"):
        last_stage(model)
