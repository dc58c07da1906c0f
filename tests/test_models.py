"""Models: shapes, parameter counts of the papers, the [0, 1] contract, sites, fx, external models."""

from __future__ import annotations

import copy
import importlib.util
import sys
from typing import Any

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from advfeat.errors import AdvfeatError
from advfeat.models import MODELS, Normalize, attach_normalize, build_model, model_names
from advfeat.models.cifar_resnet import PaddedIdentity
from advfeat.models.external import replace_classifier

OWN = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "preact_resnet18", "wrn16_8"]
FORWARD = ["resnet20", "resnet110", "preact_resnet18", "wrn16_8"]  # depth 32..56 only differ in n
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_holds_our_architectures() -> None:
    assert set(OWN) | {"wrn28_10", "wrn34_10"} == set(MODELS.names())
    names = model_names()
    assert names[: len(MODELS)] == MODELS.names()
    assert "torchvision:resnet18" in names and "torchvision:efficientnet_b0" in names


@pytest.mark.parametrize("name", FORWARD)
def test_own_models_output_shape_and_normalize_child(name: str) -> None:
    model = build_model(name, num_classes=7, mean=MEAN, std=STD).eval()
    out = model(images())
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert next(iter(model.named_children()))[0] == "normalize"
    assert isinstance(model.normalize, Normalize)
    assert not any(k.startswith("normalize") for k in model.state_dict())


@pytest.mark.parametrize(
    ("name", "paper_params"),
    [
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet44", 0.66e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
        ("wrn16_8", 11.0e6),
        ("wrn28_10", 36.5e6),
        ("preact_resnet18", 11.17e6),
    ],
)
def test_parameter_counts_match_the_papers(name: str, paper_params: float) -> None:
    with torch.device("meta"):  # no memory, no initialization cost
        model = build_model(name, num_classes=10)
    assert n_params(model) == pytest.approx(paper_params, rel=0.02)


def test_option_a_shortcut_is_parameter_free_zero_padding() -> None:
    pad = PaddedIdentity(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    out = pad(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert out[:, 16:].abs().sum() == 0
    a, b = build_model("resnet20"), build_model("resnet20", shortcut="B")
    assert isinstance(a.layer2[0].shortcut, PaddedIdentity)
    assert isinstance(b.layer2[0].shortcut[0], nn.Conv2d)
    # Two projections: 16→32 and 32→64 (1×1 conv + BN each).
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_he_initialization() -> None:
    model = build_model("resnet56")
    conv = model.layer3[0].conv1  # 3×3, 32 → 64 channels
    fan_out = 3 * 3 * 64
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
    assert bool((model.fc.bias == 0).all())


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet18", "wrn16_8"])
def test_model_takes_images_in_unit_range(name: str) -> None:
    model = build_model(name, mean=MEAN, std=STD).eval()
    plain = copy.deepcopy(model)
    plain.normalize = Normalize(0.0, 1.0)
    x = images()
    pre = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), plain(pre))
    assert not torch.allclose(model(x), plain(x), atol=1e-3)


def test_normalize_validates_and_broadcasts() -> None:
    norm = Normalize(0.5, (0.25, 0.5, 1.0))
    x = torch.ones(1, 3, 2, 2)
    assert norm(x)[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]
    assert norm.state_dict() == {}
    for mean, std in [
        ((0.5,), (0.0,)),
        ((0.1, 0.2), (0.5, 0.5, 0.5)),
        ("red", 1.0),
        (float("nan"), 1.0),
    ]:
        with pytest.raises(AdvfeatError):
            Normalize(mean, std)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet18", "wrn16_8"])
def test_sites_resolve_by_dotted_name(name: str) -> None:
    model = build_model(name)
    assert model.get_submodule("layer3") is model.layer3
    assert isinstance(model.get_submodule("layer3.0.conv1"), nn.Conv2d)
    assert isinstance(model.get_submodule("normalize"), Normalize)


class _TopLevelTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return "." not in module_qualified_name


@pytest.mark.parametrize("name", ["resnet20", "resnet20-B", "preact_resnet18", "wrn16_8"])
def test_forward_is_a_traceable_chain_of_top_level_children(name: str) -> None:
    arch, _, option = name.partition("-")
    model = build_model(arch, **({"shortcut": option} if option else {})).eval()
    traced = torch.fx.symbolic_trace(model)
    x = images()
    torch.testing.assert_close(traced(x), model(x))
    graph = _TopLevelTracer().trace(model)
    ops = [(n.op, n.target) for n in graph.nodes]
    children = [("call_module", child) for child, _ in model.named_children()]
    assert ops == [("placeholder", "x"), *children, ("output", "output")]


def test_wrn_dropout_option() -> None:
    model = build_model("wrn16_8", dropout=0.3)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 6 and all(m.p == 0.3 for m in dropouts)
    assert not any(isinstance(m, nn.Dropout) for m in build_model("wrn16_8").modules())
    with pytest.raises(AdvfeatError, match="dropout"):
        build_model("wrn16_8", dropout=1.5)


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
def test_torchvision_model_keeps_its_names_and_normalizes_with_a_hook(name: str) -> None:
    model = build_model(name, num_classes=5, mean=MEAN, std=STD, image_size=224).eval()
    assert isinstance(model, torchvision.models.ResNet)
    assert model.conv1.kernel_size == (7, 7)  # no cifar stem at 224
    reference = torchvision.models.resnet18(num_classes=5).eval()
    reference.load_state_dict(model.state_dict())  # strict: identical keys, no 'normalize'
    x = images()
    pre = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), reference(pre))
    assert model.get_submodule("layer3") is model.layer3
    assert list(dict(model.named_children()))[:2] == ["normalize", "conv1"]
    twin = copy.deepcopy(model)  # the hook follows the copy's own `normalize`
    torch.testing.assert_close(twin(x), model(x))
    twin.normalize = Normalize(0.0, 1.0)
    torch.testing.assert_close(twin(pre), model(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("container", [_Net, lambda: nn.Sequential(nn.Conv2d(3, 2, 1))])
def test_attach_normalize_normalizes_exactly_once(container: Any) -> None:
    model = container()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    attach_normalize(model, 0.5, 0.25)
    x = images()
    torch.testing.assert_close(model(x), conv((x - 0.5) / 0.25))
    assert next(iter(model.named_children()))[0] == "normalize"
    with pytest.raises(AdvfeatError, match="already"):
        attach_normalize(model, 0.5, 0.5)


def test_cifar_stem_for_torchvision_resnets() -> None:
    small = build_model("resnet18", image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    feats: dict[str, torch.Tensor] = {}
    small.layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("layer4", o))
    small.eval()(images())
    assert feats["layer4"].shape[-2:] == (4, 4)  # 32 / 8, not 32 / 32
    assert build_model("resnet18", image_size=32, cifar_stem=False).conv1.kernel_size == (7, 7)
    with pytest.raises(AdvfeatError, match="cifar_stem"):
        build_model("squeezenet1_1", cifar_stem=True)


def test_pretrained_torchvision_replaces_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real_get_model = torchvision.models.get_model

    def fake_get_model(name: str, **config: Any) -> nn.Module:  # no download in tests
        calls.append({"name": name, **config})
        return real_get_model(name, weights=None)

    monkeypatch.setattr("advfeat.models.external.tv_models.get_model", fake_get_model)
    model = build_model("resnet18", num_classes=4, pretrained=True, image_size=32)
    assert calls == [{"name": "resnet18", "weights": "DEFAULT"}]
    assert model.fc.out_features == 4
    assert model.conv1.kernel_size == (7, 7)  # pretrained keeps its stem by default
    assert model.eval()(images()).shape == (2, 4)
    kept = build_model("resnet18", num_classes=1000, pretrained=True)
    assert kept.fc.out_features == 1000


def test_replace_classifier_handles_conv_heads() -> None:
    squeeze = torchvision.models.squeezenet1_1(num_classes=1000)
    assert replace_classifier(squeeze, 1000, 3) == 1
    assert squeeze.eval()(images(1, 64)).shape == (1, 3)
    with pytest.raises(AdvfeatError, match="no output layer"):
        replace_classifier(squeeze, 1000, 3)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_model_by_name() -> None:
    import timm

    model = build_model("timm:resnet10t", num_classes=3, mean=MEAN, std=STD).eval()
    reference = timm.create_model("resnet10t", num_classes=3).eval()
    reference.load_state_dict(model.state_dict())
    x = images()
    pre = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = model(x)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, reference(pre))
    with pytest.raises(AdvfeatError, match="timm:resnet10t"):
        build_model("timm:resnet10x")


def test_missing_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(AdvfeatError, match=r"pip install advfeat\[timm\]"):
        build_model("timm:efficientnet_b0")


def test_unknown_names_list_close_matches() -> None:
    with pytest.raises(AdvfeatError, match="'resnet20'"):
        build_model("resnet2")
    with pytest.raises(AdvfeatError, match="'torchvision:resnet18'"):
        build_model("torchvision:resnt18")
    with pytest.raises(AdvfeatError, match="'wrn16_8'"):
        build_model("wrn16-8")
    with pytest.raises(AdvfeatError, match="torchvision:NAME"):
        build_model("keras:resnet50")


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes: Any) -> None:
    with pytest.raises(AdvfeatError, match="num_classes"):
        build_model("resnet20", num_classes=num_classes)


def test_bad_options_for_own_models() -> None:
    with pytest.raises(AdvfeatError, match="shortcut"):
        build_model("resnet20", shortcut="C")
    with pytest.raises(AdvfeatError, match="accepted: in_channels, shortcut"):
        build_model("resnet20", dropout=0.3)
    with pytest.raises(AdvfeatError, match="pretrained"):
        build_model("resnet20", pretrained=True)
    with pytest.raises(AdvfeatError, match="image_size"):
        build_model("resnet20", image_size=0)
