"""Multi-branch normalization for every norm family (issue 22, item 1): what a branch owns per
family, the "separate" and "shared" readings of an auxiliary branch, stripping at export, a
user's own norm class, the two predicates, and the auxiliary-norm methods on a ViT and a
ConvNeXt (no batch norm at all)."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from timm import layers as timm_layers
from torch import Tensor, nn

from advfeat.checkpoint import InitialWeights
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.base import PrepareContext
from advfeat.norm import (
    BranchNorm,
    MultiBatchNorm,
    WeightGenerator,
    branch_names,
    branch_parameters,
    can_have_branches,
    convert_branches,
    convert_multibn,
    convert_sync_branches,
    frozen_bn_statistics,
    has_running_statistics,
    register_norm_family,
    shared_parameters,
    split_branches,
    strip_branches,
    to_fused_dual_bn,
    unregister_norm_family,
    use_branch,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- families
def _tokens(n: int = 4) -> Tensor:
    return torch.randn(n, 5, 8)


def _maps(n: int = 4) -> Tensor:
    return torch.randn(n, 8, 3, 3)


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "torch LayerNorm (tokens)": (lambda: nn.LayerNorm(8), _tokens),
    "torch GroupNorm": (lambda: nn.GroupNorm(2, 8), _maps),
    "torch RMSNorm": (lambda: nn.RMSNorm(8), _tokens),
    "timm LayerNorm": (lambda: timm_layers.LayerNorm(8), _tokens),
    "timm LayerNorm2d": (lambda: timm_layers.LayerNorm2d(8), _maps),
    "timm GroupNorm": (lambda: timm_layers.GroupNorm(8, num_groups=2), _maps),
    "timm RmsNorm": (lambda: timm_layers.RmsNorm(8), _tokens),
    "torchvision LayerNorm2d": (lambda: torchvision.models.convnext.LayerNorm2d(8), _maps),
    "torch BatchNorm2d": (lambda: nn.BatchNorm2d(8), _maps),
    "timm BatchNormAct2d": (lambda: timm_layers.BatchNormAct2d(8), _maps),
}
BATCH_NORMS = {"torch BatchNorm2d", "timm BatchNormAct2d"}


def _branched(name: str, aux_norm: str = "separate") -> tuple[nn.Sequential, nn.Module, Tensor]:
    make, data = FAMILIES[name]
    torch.manual_seed(0)
    stock = nn.Sequential(make())
    with torch.no_grad():  # non-trivial affine parameters, so a shared one is visible
        for p in stock.parameters():
            p.add_(torch.randn_like(p))
    model = convert_branches(copy.deepcopy(stock), aux_norm=aux_norm)
    assert isinstance(model, nn.Sequential)
    return model, stock, data()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_separate_branch_owns_its_affine_parameters_and_bn_statistics(name: str) -> None:
    model, stock, x = _branched(name)
    layer = model[0]
    assert isinstance(layer, BranchNorm) and isinstance(layer, type(stock[0]))
    assert can_have_branches(layer) and can_have_branches(stock[0])
    assert model.state_dict().keys() >= stock.state_dict().keys()
    aux = layer.aux["adv"]
    main_params, aux_params = branch_parameters(model, "clean"), branch_parameters(model, "adv")
    assert len(main_params) == len(aux_params) > 0
    assert not {id(p) for p in main_params} & {id(p) for p in aux_params}
    assert not shared_parameters(model)
    model.eval()
    reference = stock.eval()(x)
    with use_branch(model, "adv"):
        assert torch.equal(model(x), reference)  # a copy at first
    with torch.no_grad():
        for p in aux_params:
            p.mul_(2.0)
    assert torch.equal(model(x), reference)  # the main branch is untouched
    with use_branch(model, "adv"):
        assert not torch.allclose(model(x), reference)
    if name in BATCH_NORMS:  # BN: each branch also owns its running statistics
        model.train()
        before = layer.running_mean.clone()
        with use_branch(model, "adv"):
            model(x)
        assert torch.equal(layer.running_mean, before)
        assert not torch.equal(aux.running_mean, before)
        assert has_running_statistics(layer)
    else:
        assert not list(layer.buffers()) and not has_running_statistics(layer)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_shared_branch_uses_the_main_affine_parameters(name: str) -> None:
    model, _, x = _branched(name, aux_norm="shared")
    layer = model[0]
    assert layer.aux_norm == "shared"
    assert branch_parameters(model, "adv") == []
    main = {k: p for k, p in layer.named_parameters() if not k.startswith("aux.")}
    aux = dict(layer.aux["adv"].named_parameters())
    assert main.keys() == aux.keys() and all(main[k] is aux[k] for k in main)
    with torch.no_grad():
        for p in branch_parameters(model, "clean"):
            p.mul_(3.0)
    model.train()
    if name in BATCH_NORMS:  # shared affine, separate statistics
        before = layer.running_mean.clone()
        with use_branch(model, "adv"):
            model(x)
        assert torch.equal(layer.running_mean, before)
        assert not torch.equal(layer.aux["adv"].running_mean, before)
    else:  # nothing but routing tells the branches apart
        clean = model(x)
        with use_branch(model, "adv"):
            assert torch.equal(model(x), clean)
    # one optimizer over every group: no parameter is in two groups
    torch.optim.SGD(
        [{"params": branch_parameters(model, b)} for b in ("clean", "adv") if b != "adv"]
        + [{"params": shared_parameters(model)}],
        lr=0.1,
    )


@pytest.mark.parametrize("aux_norm", ["separate", "shared"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_stripping_restores_the_stock_keys_and_outputs(name: str, aux_norm: str) -> None:
    model, stock, x = _branched(name, aux_norm)
    with torch.no_grad():
        for p in branch_parameters(model, "adv"):  # none when shared
            p.add_(1.0)
    stripped = strip_branches(model)
    assert type(stripped[0]) is type(stock[0])
    assert list(stripped.state_dict()) == list(stock.state_dict())
    fresh = copy.deepcopy(stock)
    fresh.load_state_dict(stripped.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(x), stock.eval()(x))
    kept_aux = strip_branches(model, keep="adv").eval()
    with use_branch(model, "adv"):
        assert torch.equal(kept_aux(x), model.eval()(x))


@pytest.mark.parametrize("name", ["torch LayerNorm (tokens)", "timm LayerNorm2d"])
def test_split_and_separate_routing_agree_on_per_sample_norms(name: str) -> None:
    model, _, x = _branched(name)
    with torch.no_grad():
        for p in model[0].aux.parameters():
            p.mul_(-1.0)
    with split_branches(model, [("clean", 1), ("adv", 3)]):
        joint = model(x)
    with use_branch(model, "adv"):
        adv = model(x[1:])
    assert torch.equal(joint[:1], model(x[:1])) and torch.allclose(joint[1:], adv)


def test_the_two_predicates_disagree_on_layer_norm() -> None:
    for layer in (nn.LayerNorm(4), nn.GroupNorm(2, 4), timm_layers.LayerNorm2d(4)):
        assert can_have_branches(layer) and not has_running_statistics(layer)
    for layer in (nn.BatchNorm2d(4), timm_layers.BatchNormAct2d(4)):
        assert can_have_branches(layer) and has_running_statistics(layer)
    for layer in (nn.Linear(4, 4), nn.Identity(), nn.InstanceNorm2d(4, track_running_stats=True)):
        assert not can_have_branches(layer)
    # frozen statistics concern BN only; a branched LayerNorm model runs under it unchanged
    model = convert_branches(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with frozen_bn_statistics(model):
        model(torch.randn(2, 4))


def test_convert_multibn_still_converts_batch_norm_only() -> None:
    torch.manual_seed(0)
    mixed = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), timm_layers.LayerNorm2d(4))
    bn_only = convert_multibn(copy.deepcopy(mixed))
    assert isinstance(bn_only[1], MultiBatchNorm) and not isinstance(bn_only[2], BranchNorm)
    every = convert_branches(copy.deepcopy(mixed), families=("layernorm",))
    assert isinstance(every[2], BranchNorm) and not isinstance(every[1], BranchNorm)
    with pytest.raises(AdvfeatError, match="no batch-norm layer"):
        convert_multibn(nn.Sequential(nn.LayerNorm(3)))
    with pytest.raises(AdvfeatError, match="register_norm_family"):
        convert_branches(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(AdvfeatError, match="aux_norm"):
        convert_branches(copy.deepcopy(mixed), aux_norm="tied")


def test_sync_conversion_leaves_per_sample_norms_alone() -> None:
    model = convert_branches(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    )
    group_norm = model[2]
    convert_sync_branches(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(
        model[1].aux["adv"], nn.SyncBatchNorm
    )
    assert model[2] is group_norm and isinstance(model[2], BranchNorm)


def test_a_converted_timm_layer_norm_model_pickles_into_a_new_process(tmp_path: Path) -> None:
    model = convert_branches(nn.Sequential(timm_layers.LayerNorm2d(4), nn.Flatten()))
    assert pickle.loads(pickle.dumps(model))[0].branches == ("clean", "adv")
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    code = (
        "import pickle, sys; m = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(type(m[0]).__name__, m[0].branches)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert "('clean', 'adv')" in out.stdout


# ------------------------------------------------------------------ a user's own norm class
class UnitScaleNorm(nn.Module):
    """A toy per-sample norm: x / RMS(x) times a learned per-channel gain (last dimension)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * x.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt() * self.gain


@pytest.fixture
def unit_scale_family() -> Iterator[type[nn.Module]]:
    yield register_norm_family(UnitScaleNorm, owned=("affine",))
    unregister_norm_family("UnitScaleNorm")


def test_a_custom_norm_class_gets_branches_in_one_registration(
    unit_scale_family: type[nn.Module],
) -> None:
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(6, 6), UnitScaleNorm(6), nn.Linear(6, 2))
    assert can_have_branches(stock[1]) and not has_running_statistics(stock[1])
    model = convert_branches(copy.deepcopy(stock))
    assert isinstance(model[1], BranchNorm) and "1.aux.adv.gain" in model.state_dict()
    with torch.no_grad():
        model[1].aux["adv"].gain.fill_(2.0)
    x = torch.randn(3, 6)
    assert torch.equal(model(x), stock(x))
    with use_branch(model, "adv"):
        assert not torch.allclose(model(x), stock(x))
    assert list(strip_branches(model).state_dict()) == list(stock.state_dict())


def test_registration_is_checked() -> None:
    with pytest.raises(AdvfeatError, match="owned"):
        register_norm_family(UnitScaleNorm, owned=("weights",))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        register_norm_family(int)
    with pytest.raises(AdvfeatError, match="unknown norm family"):
        unregister_norm_family("no-such-family")


# --------------------------------------------------------------- the methods on a ViT/ConvNeXt
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, num_classes=10
    )


def tiny_convnext() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


MODELS = {"vit": (tiny_vit, "blocks.0"), "convnext": (tiny_convnext, "stages.0")}
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "advprop": {"steps": 1, "eps": 2.0},
    "fast-advprop": {},
    "advbn": {"steps": 1},
    "afa": {"num_branches": 2, "steps": 1},
}


def _train_two_steps(method_name: str, model_name: str, aux_norm: str = "separate") -> None:
    make, site = MODELS[model_name]
    stock = make().eval()
    options = dict(METHOD_OPTIONS[method_name], aux_norm=aux_norm)
    if method_name == "advbn":
        options["site"] = site
    method = build_method(method_name, **options)
    initial = InitialWeights(stock.state_dict()) if method_name == "advbn" else None
    model = method.prepare_with(
        copy.deepcopy(stock), PrepareContext(input_shape=(3, 32, 32), initial=initial)
    )
    assert any(isinstance(m, BranchNorm) for m in model.modules())
    if aux_norm == "shared":
        assert branch_parameters(model, branch_names(model)[-1]) == []
    optimizer = torch.optim.SGD(method.parameter_groups(model, lr=0.01), lr=0.01)
    model.train()
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        out = method(model, x, y)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    if aux_norm == "separate":  # the adversarial loss trained the auxiliary branches
        main, aux = branch_names(model)[0], branch_names(model)[-1]
        assert any(
            not torch.equal(p, q)
            for layer in model.modules()
            if isinstance(layer, BranchNorm)
            for p, q in zip(
                layer.branch_parameters(main), layer.branch_parameters(aux), strict=True
            )
        )
    exported = method.eval_model(model).eval()
    if hasattr(exported, "branch"):  # a BranchModel (AFA stage I): its branch, stripped
        exported = strip_branches(exported.model, keep=exported.branch)
    assert list(exported.state_dict()) == list(stock.state_dict())
    fresh = make()
    fresh.load_state_dict(exported.state_dict(), strict=True)
    test = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(test), exported(test))
        with use_branch(model, method.opts.eval_branch if method_name != "afa" else "eps0"):
            assert torch.allclose(model.eval()(test), exported(test), atol=1e-6)


@pytest.mark.parametrize("aux_norm", ["separate", "shared"])
def test_advprop_trains_on_a_tiny_vit_and_exports_the_stock_model(aux_norm: str) -> None:
    _train_two_steps("advprop", "vit", aux_norm)


@pytest.mark.parametrize(
    ("method_name", "model_name"),
    [
        ("advprop", "convnext"),
        ("fast-advprop", "vit"),
        ("fast-advprop", "convnext"),
        ("advbn", "vit"),
        ("advbn", "convnext"),
        ("afa", "vit"),
    ],
)
def test_aux_norm_methods_train_without_batch_norm(method_name: str, model_name: str) -> None:
    _train_two_steps(method_name, model_name)


def test_afa_fuses_layer_norm_branches() -> None:
    """AFA Eq. 2 on a per-sample norm: x̂ = W_0·LN_0(x) + (1 − W_0)·LN_1(x)."""
    torch.manual_seed(0)
    stage1 = convert_branches(
        nn.Sequential(nn.Conv2d(3, 4, 1), timm_layers.LayerNorm2d(4), nn.Flatten()),
        ("eps0", "eps1"),
    )
    with torch.no_grad():
        stage1[1].aux["eps1"].weight.mul_(-1.0)
    x = torch.rand(2, 3, 2, 2)
    with use_branch(stage1, "eps0"):
        first = stage1(x)
    with use_branch(stage1, "eps1"):
        last = stage1(x)
    fused = to_fused_dual_bn(stage1, WeightGenerator(3, 1, channels=4, hidden=4))
    w0 = torch.tensor([0.25, 0.75])
    with fused.weights.provide(w0):
        out = fused.model(x)
    assert torch.allclose(out, w0[:, None] * first + (1 - w0[:, None]) * last, atol=1e-6)
