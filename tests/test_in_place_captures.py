"""Recorded site outputs are the outputs as the site returned them, even when the rest of the
forward pass writes into them (``out += identity``, in-place activations)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

from advfeat.attacks.feature import MultiSiteFeaturePGD
from advfeat.eval.divergence import ChannelMoments, layer_moments
from advfeat.eval.feature_maps import perturb_feature
from advfeat.sites import capture_features

torch.set_num_threads(1)


class InPlaceResidualNet(nn.Module):
    """A residual block whose shortcut and activation write into the ``bn`` site's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        out = self.bn(self.conv(h))
        out += h
        out = torch.relu_(out)
        return self.head(out.mean((2, 3)))


def in_place_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = InPlaceResidualNet()
        for name in ("running_mean", "running_var"):  # eval-mode BN that is not the identity
            getattr(model.bn, name).uniform_(0.5, 1.5)
    return model.eval()


def batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])


def site_outputs(model: nn.Module, x: Tensor, sites: list[str]) -> dict[str, Tensor]:
    """Each site's output, copied by a forward hook as the site returns it."""
    copies: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(s).register_forward_hook(
            lambda _m, _a, out, s=s: copies.__setitem__(s, out.detach().clone())
        )
        for s in sites
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return copies


def test_the_bn_site_is_written_into_after_it_returns() -> None:
    """The premise of the other tests: without a copy, the recorded tensor changes."""
    model, (x, _) = in_place_net(), batch()
    with torch.no_grad(), capture_features(model, "bn") as live:
        model(x)
    assert not torch.equal(live["bn"], site_outputs(model, x, ["bn"])["bn"])


def test_capture_with_clone_copies_tensors_inside_dict_outputs() -> None:
    """A backbone body's feature dict: the copies keep the values the body returned."""

    class Body(nn.Module):
        def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
            return OrderedDict(low=x * 2, out=x * 3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = Body()

        def forward(self, x: Tensor) -> Tensor:
            feats = self.body(x)
            return feats["out"].add_(feats["low"].relu_())

    net, x = Net(), torch.randn(2, 3)
    with capture_features(net, "body", clone=True) as copied, capture_features(net, "body") as live:
        net(x)
    assert not torch.equal(live["body"]["out"], x * 3)  # the forward wrote into both values
    assert isinstance(copied["body"], OrderedDict) and list(copied["body"]) == ["low", "out"]
    torch.testing.assert_close(copied["body"]["low"], x * 2, rtol=0, atol=0)
    torch.testing.assert_close(copied["body"]["out"], x * 3, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["joint", "separate"])
def test_multi_site_attack_uses_the_site_outputs_it_records(mode: str) -> None:
    """Features recorded by the attack itself give the δ of the true site outputs."""
    model, (x, y) = in_place_net(), batch()
    sites = ["bn", "head"]
    reference = site_outputs(model, x, sites)
    attack = MultiSiteFeaturePGD(model, sites, alpha=0.1, steps=2, mode=mode)  # type: ignore[arg-type]
    recorded = attack(x, y)
    given = attack(x, y, features=reference)
    for s in sites:
        torch.testing.assert_close(recorded[s], given[s], rtol=0, atol=0, msg=s)


def test_perturb_feature_returns_the_site_output() -> None:
    model, (x, y) = in_place_net(), batch()
    clean, delta = perturb_feature(model, x, y, "bn", alpha=0.1, steps=1)
    torch.testing.assert_close(clean, site_outputs(model, x, ["bn"])["bn"], rtol=0, atol=0)
    assert delta.shape == clean.shape and delta.abs().max() > 0


def test_layer_moments_are_those_of_the_site_output() -> None:
    model, (x, _) = in_place_net(), batch()
    moments = layer_moments(model, [x, x.flip(0)], ["bn"])["bn"]
    expected = ChannelMoments()
    for images in (x, x.flip(0)):
        expected.update(site_outputs(model, images, ["bn"])["bn"])
    for got, want in zip(moments.mean_std(), expected.mean_std(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
