"""Tail-only execution at any site: values crossing the cut are captured in the clean pass.

At every site of ResNet-20, a torchvision ResNet-50, a timm EfficientNet and a DenseNet, the
tail run from a perturbed site feature (with the frontier captured by
``capture_features(..., frontier=True)``) gives the full model's output and the same gradients
with respect to the feature and to every parameter; where the tail is tail-only, the stem does
not run again.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet

from advfeat.errors import AdvfeatError
from advfeat.models import build_model
from advfeat.sites import SiteSplit, capture_features, frontier_capture, replace_features


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(factory, seed: int) -> nn.Module:  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def _sites_run_once(model: nn.Module, x: Tensor) -> list[str]:
    """Named submodules that run exactly once per forward and output a tensor."""
    calls: dict[str, list[bool]] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _a, out, n=n: calls.setdefault(n, []).append(isinstance(out, Tensor))
        )
        for n, m in model.named_modules()
        if n
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [n for n, seen in calls.items() if seen == [True]]


def _loss(out: Tensor) -> Tensor:
    return out.square().sum() + out[:, 0].sum()


def _check_site(model: nn.Module, site: str, x: Tensor, stem_calls: list[int]) -> bool:
    """The tail equals the full model at ``site``; returns whether it ran tail-only."""
    params = [p for p in model.parameters() if p.requires_grad]
    with capture_features(model, site, clone=True, frontier=True) as feats:
        model(x)
    noise = 0.1 * torch.randn(feats[site].shape, generator=_seeded(2))
    f_tail = (feats[site].detach() + noise).requires_grad_(True)
    f_ref = (feats[site].detach() + noise).requires_grad_(True)
    stem_calls.clear()
    out_tail = SiteSplit(model, site, prefix_grad=True).tail(f_tail, x=x)
    tail_only = not stem_calls
    with replace_features(model, {site: lambda _o: f_ref.clone()}):  # in-place ops follow
        out_ref = model(x)
    torch.testing.assert_close(out_tail, out_ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(_loss(out_tail), [f_tail, *params], allow_unused=True)
    ref = torch.autograd.grad(_loss(out_ref), [f_ref, *params], allow_unused=True)
    for g, r in zip(got, ref, strict=True):
        assert (g is None) == (r is None), site
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    return tail_only


def _not_tail_only(
    model: nn.Module, stem: nn.Module, x: Tensor, within: tuple[str, ...] = ("",)
) -> list[str]:
    """Checks every site (with ``within``: the top-level ones and those of the ``within``
    blocks); returns those whose tail ran the stem again."""
    sites = _sites_run_once(model, x)
    if within != ("",):
        sites = [s for s in sites if "." not in s or s.startswith(within)]
    assert len(sites) >= 15
    stem_calls: list[int] = []
    handle = stem.register_forward_pre_hook(lambda *_: stem_calls.append(1))
    try:
        return [s for s in sites if not _check_site(model, s, x, stem_calls)]
    finally:
        handle.remove()


def test_resnet20_every_site_is_tail_only() -> None:
    model = _build(lambda: build_model("resnet20", num_classes=10), 0)
    x = torch.rand(2, 3, 8, 8, generator=_seeded(1))
    assert SiteSplit(model, "layer3.2.bn2").frontier == ("layer3_2_shortcut",)
    # only the input normalisation, which comes before the stem, runs the stem in its tail
    assert _not_tail_only(model, model.conv1, x) == ["normalize"]


def test_resnet50_sites_are_tail_only() -> None:
    """Every site of a bottleneck with a downsampling shortcut (whose last BN the block writes
    into: ``out += identity``) and every top-level site (all 151 sites take minutes)."""
    model = _build(lambda: torchvision.models.resnet50(num_classes=5), 3)
    x = torch.rand(2, 3, 32, 32, generator=_seeded(4))
    assert _not_tail_only(model, model.conv1, x, within=("layer2.0",)) == []


def test_densenet_every_site_is_tail_only() -> None:
    def densenet() -> nn.Module:
        return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                        num_classes=5)  # fmt: skip

    model = _build(densenet, 5)
    x = torch.rand(2, 3, 16, 16, generator=_seeded(6))
    split = SiteSplit(model, "features.denseblock1.denselayer2.conv2")
    # the transition concatenates the block's input and every layer's output
    assert len(split.frontier) == 2
    assert _not_tail_only(model, model.features.conv0, x) == []


def test_timm_efficientnet_every_site_is_tail_only() -> None:
    timm = pytest.importorskip("timm", reason="timm is an optional extra (advfeat[timm])")
    from timm.models._efficientnet_builder import decode_arch_def

    arch = [["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r2_k3_s2_e4_c16_se0.25"], ["ir_r1_k5_s2_e4_c24"]]

    def efficientnet() -> nn.Module:
        return timm.models.efficientnet.EfficientNet(
            decode_arch_def(arch), num_features=32, stem_size=8, num_classes=5
        )

    model = _build(efficientnet, 7)
    x = torch.rand(2, 3, 16, 16, generator=_seeded(8))
    assert _not_tail_only(model, model.conv_stem, x) == []


class SkipWithInPlaceTail(nn.Module):
    """``h = a(x); h.add_(b(h)); c(h)``: the tail writes into ``h``, from before site ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h = h.add_(self.b(h))  # fx follows in-place writes only through the result
        return self.c(h)


def _counting(module: nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_capture_is_used_only_for_the_same_unchanged_input() -> None:
    model = _build(SkipWithInPlaceTail, 9)
    x = torch.rand(2, 3, 4, 4, generator=_seeded(10))
    split = SiteSplit(model, "b")
    assert split.frontier == ("a",)
    with torch.no_grad(), capture_features(model, "b", frontier=True) as feats:
        out = model(x)
    f = feats["b"]
    calls, handle = _counting(model.a)
    try:
        with torch.no_grad():
            # the tail writes into its copy of ``h``: repeated tails give the same output
            for _ in range(2):
                torch.testing.assert_close(split.tail(f, x=x), out)
            assert not calls
            torch.testing.assert_close(split.tail(f, x=x.detach()), out)  # an alias of x
            assert not calls
            other = x.clone()
            torch.testing.assert_close(split.tail(f, x=other), out)  # another tensor: full
            assert len(calls) == 1
            x.mul_(1.0)  # written in place since the clean pass: full model again
            split.tail(f, x=x)
            assert len(calls) == 2
            with pytest.raises(AdvfeatError, match="frontier=True"):
                split.tail(f)
    finally:
        handle.remove()  # type: ignore[attr-defined]


def test_frontier_capture_can_be_switched_off() -> None:
    model = _build(SkipWithInPlaceTail, 11)
    x = torch.rand(2, 3, 4, 4, generator=_seeded(12))
    with torch.no_grad(), frontier_capture(False), capture_features(model, "b", frontier=True):
        out = model(x)
    calls, handle = _counting(model.a)
    try:
        with torch.no_grad(), capture_features(model, "b") as feats:
            model(x)
            calls.clear()
            torch.testing.assert_close(SiteSplit(model, "b").tail(feats["b"], x=x), out)
        assert len(calls) == 1  # nothing was captured: the full model ran
    finally:
        handle.remove()  # type: ignore[attr-defined]
