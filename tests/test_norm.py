"""Multi-branch BN (conversion, routing, stripping, sync, fx) and AFA's fused dual BN."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from advfeat.errors import AdvfeatError
from advfeat.norm import (
    AdaptiveFeatureAlignment,
    FusedDualBN,
    MultiBatchNorm,
    WeightGenerator,
    afa_branches,
    branch_for_strength,
    branch_names,
    branch_parameters,
    convert_multibn,
    convert_sync_multibn,
    frozen_bn_statistics,
    is_norm_leaf,
    main_branch,
    shared_parameters,
    split_branches,
    strip_aux_bn,
    to_fused_dual_bn,
    use_branch,
)

# --------------------------------------------------------------------------------- fixtures


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """A two-stage CIFAR-style ResNet (3×3 stem, no max-pool), width 8."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class BNMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def seeded(builder: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


def images(n: int, seed: int = 0, size: int = 16) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def warmed(model: nn.Module, x: Tensor) -> nn.Module:
    """``model`` in eval mode with non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def cifar_resnet() -> nn.Module:
    return warmed(seeded(CifarResNet), images(6, seed=1))


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def aux_state(model: nn.Module, branch: str) -> dict[str, Tensor]:
    marker = f".aux.{branch}."
    return {k: v.clone() for k, v in model.state_dict().items() if marker in k}


def main_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".aux." not in k}


def same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class NormLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, NormLeafTracer().trace(model))


# --------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("arch", ["resnet18", "cifar_resnet"])
def test_conversion_keeps_eval_outputs_and_keys(arch: str) -> None:
    if arch == "resnet18":
        model = warmed(seeded(lambda: torchvision.models.resnet18(num_classes=10)), images(4))
    else:
        model = cifar_resnet()
    reference = copy.deepcopy(model)
    layers_before = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = images(3, seed=5)
    assert convert_multibn(model) is model
    assert torch.equal(model(x), reference(x))
    layers_after = [m for m in model.modules() if isinstance(m, MultiBatchNorm)]
    # the same layer objects, still BatchNorm2d / _BatchNorm, the main branch has the old keys
    assert [id(m) for m in layers_after] == [id(m) for m in layers_before]
    assert all(isinstance(m, nn.BatchNorm2d) and isinstance(m, _BatchNorm) for m in layers_after)
    keys = model.state_dict().keys()
    assert set(reference.state_dict()) <= set(keys)
    assert "layer1.0.bn1.aux.adv.weight" in keys
    assert "layer1.0.bn1.aux.adv.running_var" in keys
    assert branch_names(model) == ("clean", "adv") and main_branch(model) == "clean"
    # a new branch starts as a copy: routing a whole batch through it changes nothing in eval
    with use_branch(model, "adv"):
        assert torch.equal(model(x), reference(x))


def test_main_branch_in_train_mode_matches_unconverted_model() -> None:
    model = cifar_resnet()
    reference = copy.deepcopy(model)
    convert_multibn(model, ("clean", "adv", "aug"))
    adv_before, aug_before = aux_state(model, "adv"), aux_state(model, "aug")
    x = images(5, seed=2)
    model.train()
    reference.train()
    assert torch.equal(model(x), reference(x))
    assert same_tensors(main_state(model), dict(reference.state_dict()))
    assert same_tensors(aux_state(model, "adv"), adv_before)
    assert same_tensors(aux_state(model, "aug"), aug_before)


@pytest.fixture(scope="module")
def timm_efficientnet() -> nn.Module:
    """A small timm EfficientNet (TinyNet-E: EfficientNet scaled down, BatchNormAct2d + SiLU)."""
    timm = pytest.importorskip("timm", reason="the timm extra is not installed")
    model = seeded(lambda: timm.create_model("tinynet_e", num_classes=10))
    return warmed(model, images(4))


def test_timm_efficientnet_bn_act_keeps_activation_in_every_branch(
    timm_efficientnet: nn.Module,
) -> None:
    norm_act = pytest.importorskip("timm.layers.norm_act")
    model = copy.deepcopy(timm_efficientnet)
    reference = copy.deepcopy(model)
    convert_multibn(model)
    x = images(2, seed=3)
    assert torch.equal(model(x), reference(x))
    layers = [m for m in model.modules() if isinstance(m, MultiBatchNorm)]
    assert layers and all(isinstance(m, norm_act.BatchNormAct2d) for m in layers)
    for layer in layers:
        aux = layer.aux["adv"]
        assert isinstance(aux, norm_act.BatchNormAct2d)
        assert type(aux.act) is type(layer.act)
    assert any(isinstance(m.aux["adv"].act, nn.SiLU) for m in layers)
    with use_branch(model, "adv"):  # aux branch = BN + SiLU, exactly like the original
        assert torch.equal(model(x), reference(x))


def test_converted_model_pickles_and_copies_with_its_branches() -> None:
    model = convert_multibn(cifar_resnet())
    with torch.no_grad():
        model.bn1.aux["adv"].running_mean.add_(1.0)
    x = images(2)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert (
            type(clone.bn1) is type(model.bn1) and clone.bn1.aux["adv"] is not model.bn1.aux["adv"]
        )
        assert torch.equal(clone(x), model(x))
        with use_branch(clone, "adv"), use_branch(model, "adv"):
            assert torch.equal(clone(x), model(x))
    assert is_norm_leaf(model.bn1) and not is_norm_leaf(cifar_resnet().bn1)


# --------------------------------------------------------------------------------- routing


def test_use_branch_updates_only_the_chosen_branch_and_nests() -> None:
    model = convert_multibn(cifar_resnet(), ("clean", "adv", "aug")).train()
    clean, adv, aug = main_state(model), aux_state(model, "adv"), aux_state(model, "aug")
    with use_branch(model, "adv"):
        with use_branch(model, "aug"):
            assert model.bn1.route == "aug"
        assert model.bn1.route == "adv"
        model(images(4, seed=3))
    assert model.bn1.route == "clean"
    assert same_tensors(main_state(model), clean)
    assert same_tensors(aux_state(model, "aug"), aug)
    assert not same_tensors(aux_state(model, "adv"), adv)
    assert int(model.bn1.aux["adv"].num_batches_tracked) == int(model.bn1.num_batches_tracked) + 1


@pytest.mark.parametrize("sizes", [(3, 4), (0, 5), (5, 0)])
def test_split_equals_separate_runs(sizes: tuple[int, int]) -> None:
    split_model = convert_multibn(cifar_resnet()).train()
    separate = copy.deepcopy(split_model)
    x = images(sum(sizes), seed=4)
    with split_branches(split_model, [("clean", sizes[0]), ("adv", sizes[1])]):
        out = split_model(x)
    parts = []
    for name, chunk in zip(("clean", "adv"), x.split(list(sizes)), strict=True):
        if chunk.shape[0]:
            with use_branch(separate, name):
                parts.append(separate(chunk))
    expected = torch.cat(parts)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    got, want = split_model.state_dict(), separate.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    if sizes[0] == 0:  # a zero-size chunk is skipped: clean statistics untouched
        assert int(split_model.bn1.num_batches_tracked) == int(
            cifar_resnet().bn1.num_batches_tracked
        )


def test_split_works_for_batchnorm1d() -> None:
    model = convert_multibn(seeded(BNMLP)).train()
    separate = copy.deepcopy(model)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    with split_branches(model, [("clean", 3), ("adv", 4)]):
        out = model(x)
    with use_branch(separate, "clean"):
        first = separate(x[:3])
    with use_branch(separate, "adv"):
        second = separate(x[3:])
    torch.testing.assert_close(out, torch.cat([first, second]))
    for key, value in separate.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    # a batch-level BN would mix the chunks: the split output differs from one joint batch
    assert not torch.allclose(out, copy.deepcopy(separate).train()(x))


def test_split_sizes_must_add_up_to_the_batch() -> None:
    model = convert_multibn(cifar_resnet())
    with (
        split_branches(model, [("clean", 2), ("adv", 2)]),
        pytest.raises(AdvfeatError, match=r"sum to 4.*batch of 5"),
    ):
        model(images(5))


def test_frozen_bn_statistics_freezes_every_branch() -> None:
    model = convert_multibn(cifar_resnet(), ("clean", "adv", "aug")).train()
    before = copy.deepcopy(model.state_dict())
    x = images(6, seed=7)
    with frozen_bn_statistics(model):
        model(x)
        with use_branch(model, "adv"):
            model(x)
        with split_branches(model, [("clean", 2), ("adv", 1), ("aug", 3)]):
            model(x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, _BatchNorm))
    with use_branch(model, "adv"):  # and the statistics move again afterwards
        model(x)
    assert not torch.equal(before["bn1.aux.adv.running_mean"], model.bn1.aux["adv"].running_mean)


def test_layer_level_track_running_stats_switch_covers_aux_branches() -> None:
    model = convert_multibn(cifar_resnet()).train()
    adv = aux_state(model, "adv")
    for layer in model.modules():
        if isinstance(layer, MultiBatchNorm):
            layer.track_running_stats = False
    with use_branch(model, "adv"):
        model(images(4))
    assert same_tensors(aux_state(model, "adv"), adv)
    assert model.bn1.aux["adv"].track_running_stats  # restored


def test_branch_parameter_groups_partition_all_parameters() -> None:
    model = convert_multibn(cifar_resnet(), ("clean", "adv", "aug"))
    groups = {name: branch_parameters(model, name) for name in branch_names(model)}
    groups["shared"] = shared_parameters(model)
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".aux.adv." in names[id(p)] for p in groups["adv"])
    main_owned = {
        id(p) for m in model.modules() if isinstance(m, MultiBatchNorm) for p in (m.weight, m.bias)
    }
    assert {id(p) for p in groups["clean"]} == main_owned
    assert len(groups["adv"]) == len(groups["aug"]) == len(main_owned) == 2 * 6  # 6 BN layers
    assert all(isinstance(p, nn.Parameter) and p.dim() > 1 for p in groups["shared"][:-1])
    assert len(groups["shared"]) == 6 + 2  # 6 convolutions, fc weight and bias


def test_use_branch_under_dataparallel_and_split_guard_in_replicas() -> None:
    model = convert_multibn(cifar_resnet())
    x = images(3)
    with torch.no_grad(), use_branch(model, "adv"):
        model.bn1.aux["adv"].running_mean.add_(0.5)  # make the adv branch differ
        expected = model(x)
        assert torch.equal(nn.DataParallel(model)(x), expected)
    assert not torch.equal(model(x), expected)
    with split_branches(model, [("clean", 1), ("adv", 2)]):
        replica = model.bn1._replicate_for_data_parallel()  # what DataParallel runs on each GPU
        with pytest.raises(AdvfeatError, match="DistributedDataParallel"):
            replica(torch.randn(3, 8, 4, 4))


# --------------------------------------------------------------------------------- strip


def test_strip_round_trips_to_the_original_architecture() -> None:
    model = convert_multibn(cifar_resnet())
    optimizer = torch.optim.SGD(branch_parameters(model, "adv") + shared_parameters(model), lr=0.1)
    model.train()
    for step in range(2):  # train the aux branch so that it differs from the main one
        with use_branch(model, "adv"):
            loss = F.cross_entropy(model(images(4, seed=step)), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = images(3, seed=9)
    clean_out = model(x)
    with use_branch(model, "adv"):
        adv_out = model(x)
    assert not torch.allclose(clean_out, adv_out)
    for keep, expected in (("clean", clean_out), ("adv", adv_out)):
        stripped = strip_aux_bn(model, keep=keep)
        assert not any(isinstance(m, MultiBatchNorm) for m in stripped.modules())
        assert type(stripped.bn1) is nn.BatchNorm2d
        fresh = seeded(CifarResNet, seed=3).eval()
        fresh.load_state_dict(stripped.state_dict(), strict=True)
        assert torch.equal(fresh(x), expected)
        assert torch.equal(stripped(x), expected)
    assert isinstance(model.bn1, MultiBatchNorm)  # not in place by default
    assert strip_aux_bn(model, inplace=True) is model
    assert type(model.bn1) is nn.BatchNorm2d and not hasattr(model.bn1, "aux")
    convert_multibn(model)  # a stripped model converts again


# --------------------------------------------------------------------------------- errors


def test_user_errors_are_clear() -> None:
    with pytest.raises(AdvfeatError, match="no batch-norm layer"):
        convert_multibn(nn.Sequential(nn.Linear(2, 2)))
    for bad in [(), ("clean",), "clean", ("clean", ""), ("clean", "a.b"), ("clean", 3)]:
        with pytest.raises(AdvfeatError, match="branch"):
            convert_multibn(cifar_resnet(), bad)  # type: ignore[arg-type]
    with pytest.raises(AdvfeatError, match="distinct"):
        convert_multibn(cifar_resnet(), ("clean", "adv", "adv"))
    with pytest.raises(AdvfeatError, match="reserved"):
        convert_multibn(cifar_resnet(), ("clean", "keys"))
    model = convert_multibn(cifar_resnet())
    with pytest.raises(AdvfeatError, match="already converted"):
        convert_multibn(model)
    with pytest.raises(AdvfeatError, match="did you mean 'adv'"), use_branch(model, "advv"):
        pass
    with pytest.raises(AdvfeatError, match="unknown BN branch"):
        strip_aux_bn(model, keep="aux")
    with pytest.raises(AdvfeatError, match="repeated"), split_branches(model, [("adv", 1)] * 2):
        pass
    with pytest.raises(AdvfeatError, match="int >= 0"), split_branches(model, [("adv", -1)]):
        pass
    with pytest.raises(AdvfeatError, match="convert_multibn"):
        branch_names(cifar_resnet())
    # torch's own SyncBN converter drops the routing: advfeat notices and names the fix
    lost = nn.SyncBatchNorm.convert_sync_batchnorm(convert_multibn(cifar_resnet()))
    with pytest.raises(AdvfeatError, match="convert_sync_multibn"):
        branch_names(lost)


# --------------------------------------------------------------------------------- sync BN


def test_sync_conversion_structure_and_cpu_behaviour() -> None:
    plain = cifar_resnet()
    model = convert_multibn(copy.deepcopy(plain), sync=True)
    layers = [m for m in model.modules() if isinstance(m, MultiBatchNorm)]
    assert len(layers) == 6
    assert all(isinstance(m, nn.SyncBatchNorm) for m in layers)
    assert all(isinstance(m.aux["adv"], nn.SyncBatchNorm) for m in layers)
    assert model.state_dict().keys() == convert_multibn(copy.deepcopy(plain)).state_dict().keys()
    x = images(4, seed=2)
    assert torch.equal(model(x), plain(x))  # eval mode runs on CPU
    # without a process group SyncBN falls back to plain BN: the split matches the non-sync model
    reference = convert_multibn(copy.deepcopy(plain)).train()
    model.train()
    with split_branches(model, [("clean", 1), ("adv", 3)]):
        out = model(x)
    with split_branches(reference, [("clean", 1), ("adv", 3)]):
        torch.testing.assert_close(out, reference(x))


def test_convert_sync_multibn_keeps_routing_and_shares_parameters(
    timm_efficientnet: nn.Module,
) -> None:
    model = convert_multibn(cifar_resnet())
    before = {n: p for n, p in model.named_parameters()}
    x = images(3)
    with torch.no_grad():
        model.bn1.aux["adv"].running_mean.add_(1.0)
    with use_branch(model, "adv"):
        expected = model(x)
    with use_branch(model, "adv"), pytest.raises(AdvfeatError, match="outside use_branch"):
        convert_sync_multibn(model)
    assert convert_sync_multibn(model) is model
    assert isinstance(model.bn1, MultiBatchNorm) and isinstance(model.bn1, nn.SyncBatchNorm)
    assert isinstance(model.layer2[0].shortcut[1].aux["adv"], nn.SyncBatchNorm)
    assert all(before[n] is p for n, p in model.named_parameters())
    with use_branch(model, "adv"):
        assert torch.equal(model(x), expected)
    timm_model = convert_multibn(copy.deepcopy(timm_efficientnet), sync=True)
    norm_act = pytest.importorskip("timm.layers.norm_act")
    assert isinstance(timm_model.bn1, norm_act.SyncBatchNormAct)
    assert isinstance(timm_model.bn1.aux["adv"].act, nn.SiLU)


# --------------------------------------------------------------------------------- torch.fx


def test_fx_trace_keeps_multibn_as_leaves_and_routing_works() -> None:
    model = convert_multibn(cifar_resnet())
    with torch.no_grad():
        model.bn1.aux["adv"].running_var.mul_(3.0)
    gm = trace(model)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    multibn = {n for n, m in model.named_modules() if isinstance(m, MultiBatchNorm)}
    assert multibn <= called
    x = images(2)
    assert torch.equal(gm(x), model(x))
    with use_branch(gm, "adv"):
        traced_adv = gm(x)
    with use_branch(model, "adv"):
        assert torch.equal(traced_adv, model(x))
    assert not torch.equal(traced_adv, gm(x))


# --------------------------------------------------------------------------------- AFA


class ConstantWeight(nn.Module):
    """A stand-in generator: W_0 = the given per-sample values."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def forward(self, x: Tensor) -> Tensor:
        return torch.tensor(self.values).reshape(-1, 1).expand(x.shape[0], 1)


def stage_one(k: int = 3) -> nn.Module:
    """A K-branch model whose branches all differ (as after AFA stage I)."""
    model = convert_multibn(cifar_resnet(), afa_branches(k))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MultiBatchNorm):
                for branch in layer.aux.values():
                    branch.running_mean.add_(0.3 * torch.randn(branch.num_features, generator=g))
                    branch.running_var.mul_(1.0 + torch.rand(branch.num_features, generator=g))
                    branch.weight.add_(0.2 * torch.randn(branch.num_features, generator=g))
    return model.eval()


def branch_output(model: nn.Module, branch: str, x: Tensor) -> Tensor:
    with use_branch(model, branch), torch.no_grad():
        return model(x)


def test_afa_branch_names_and_strengths() -> None:
    assert afa_branches(5) == ("eps0", "eps1", "eps2", "eps3", "eps4")
    eps = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255]
    assert branch_for_strength(eps, 4 / 255) == "eps3"
    assert branch_for_strength(eps, 0) == "eps0"
    with pytest.raises(AdvfeatError, match="K >= 2"):
        afa_branches(1)
    with pytest.raises(AdvfeatError, match="no stage-I branch"):
        branch_for_strength(eps, 3 / 255)
    with pytest.raises(AdvfeatError, match="increasing"):
        branch_for_strength([0.0, 2.0, 1.0], 1.0)


def test_fusion_weight_one_and_zero_give_bn0_and_bnk_exactly() -> None:
    x = images(2, seed=6)
    stage1 = stage_one()
    first, last = branch_output(stage1, "eps0", x), branch_output(stage1, "eps2", x)
    assert not torch.allclose(first, last)
    for values, expected in (([1.0], first), ([0.0], last)):
        afa = to_fused_dual_bn(copy.deepcopy(stage1), ConstantWeight(values))
        assert torch.equal(afa(x), expected)
    # per sample: sample 0 through BN_0, sample 1 through BN_{K-1}
    afa = to_fused_dual_bn(copy.deepcopy(stage1), ConstantWeight([1.0, 0.0]))
    out = afa(x)
    assert torch.equal(out[0], first[0]) and torch.equal(out[1], last[1])
    with pytest.raises(AdvfeatError, match="AdaptiveFeatureAlignment"):
        afa.model(x)  # a fused layer never runs without a W_0


def test_w0_reaches_every_fused_layer_with_the_fusion_formula() -> None:
    stage1 = stage_one(k=4)
    afa = to_fused_dual_bn(stage1, ConstantWeight([0.25, 0.8, 0.5]), "eps0", "eps3")
    assert isinstance(afa, AdaptiveFeatureAlignment)
    fused = afa.fused_layers
    assert len(fused) == 6 and all(isinstance(m.first, nn.BatchNorm2d) for m in fused)
    seen: list[str] = []
    w0 = torch.tensor([0.25, 0.8, 0.5]).view(3, 1, 1, 1)

    def check(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        assert isinstance(module, FusedDualBN)
        (x,) = args
        bn0, bnk = module.first, module.last
        a = (x - bn0.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            bn0.running_var.view(1, -1, 1, 1) + bn0.eps
        ) * bn0.weight.view(1, -1, 1, 1) + bn0.bias.view(1, -1, 1, 1)
        b = (x - bnk.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            bnk.running_var.view(1, -1, 1, 1) + bnk.eps
        ) * bnk.weight.view(1, -1, 1, 1) + bnk.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(output, w0 * a + (1 - w0) * b, rtol=1e-5, atol=1e-5)
        seen.append(module.layer_name)

    for layer in fused:
        layer.register_forward_hook(check)
    with torch.no_grad():
        afa(images(3))
    assert sorted(seen) == sorted(m.layer_name for m in fused)
    assert afa.last_weight is not None
    assert torch.equal(afa.last_weight, torch.tensor([0.25, 0.8, 0.5]))


def test_stage_two_trains_only_the_generator() -> None:
    afa = to_fused_dual_bn(stage_one(), WeightGenerator(3, channels=4, hidden=4))
    frozen = copy.deepcopy(afa.model.state_dict())
    afa.train()
    assert afa.generator.training and not afa.model.training
    out, w0 = afa(images(4), return_weight=True)
    assert w0.shape == (4,) and bool(((w0 > 0) & (w0 < 1)).all())
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None and not p.requires_grad for p in afa.model.parameters())
    grads = [p.grad for p in afa.generator.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    assert all(torch.equal(v, afa.model.state_dict()[k]) for k, v in frozen.items())


def test_per_layer_weights_and_intermediate_source() -> None:
    stage1 = stage_one()
    with pytest.raises(AdvfeatError, match="one per fused layer"):
        to_fused_dual_bn(copy.deepcopy(stage1), WeightGenerator(3), per_layer=True)
    gen = WeightGenerator(3, out_features=6, channels=4, hidden=4)
    afa = to_fused_dual_bn(copy.deepcopy(stage1), gen, per_layer=True)
    _, w0 = afa(images(2), return_weight=True)
    assert w0.shape == (2, 6)
    # the generator reads the stem's feature map (Sec. 4.3: "the end of an intermediate layer")
    afa = to_fused_dual_bn(copy.deepcopy(stage1), WeightGenerator(8, channels=4), source="conv1")
    assert afa(images(2)).shape == (2, 10)
    late = to_fused_dual_bn(copy.deepcopy(stage1), WeightGenerator(8), source="layer1")
    with pytest.raises(AdvfeatError, match="prefix_weight"):
        late(images(2))
    late = to_fused_dual_bn(
        copy.deepcopy(stage1), WeightGenerator(8), source="layer1", prefix_weight=1.0
    )
    assert torch.isfinite(late(images(2))).all()
    with pytest.raises(AdvfeatError, match="did you mean 'layer1'"):
        to_fused_dual_bn(copy.deepcopy(stage1), WeightGenerator(8), source="layer_1")


def test_fused_timm_bn_act_and_fx_trace(timm_efficientnet: nn.Module) -> None:
    model = convert_multibn(copy.deepcopy(timm_efficientnet), afa_branches(2))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MultiBatchNorm):
                layer.aux["eps1"].bias.add_(0.1)
    x = images(2, seed=8)
    expected = branch_output(model, "eps1", x)
    afa = to_fused_dual_bn(model, ConstantWeight([0.0]))
    assert torch.equal(afa(x), expected)  # BN + SiLU after the fusion, like the stage-I branch
    stage1 = stage_one()
    afa = to_fused_dual_bn(stage1, ConstantWeight([0.3]))
    gm = trace(afa.model)
    fused = {n for n, m in afa.model.named_modules() if isinstance(m, FusedDualBN)}
    assert fused <= {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert all(is_norm_leaf(m) for m in afa.fused_layers)
    w0 = torch.full((2,), 0.3)
    with afa.weights.provide(w0):
        traced = gm(images(2))
    assert torch.equal(traced, afa(images(2)))


# ------------------------------------------------------------------------ BN-like predicate
def test_is_batchnorm_like_covers_every_bn_and_only_bn() -> None:
    from advfeat.norm import is_batchnorm_like, register_batchnorm_class
    from advfeat.norm.stats import _BATCHNORM_CLASSES

    for layer in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3)):
        assert is_batchnorm_like(layer), type(layer).__name__
    converted = convert_multibn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert isinstance(converted[1], MultiBatchNorm) and is_batchnorm_like(converted[1])
    assert is_batchnorm_like(converted[1].aux["adv"])
    for other in (nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.Conv2d(3, 3, 1), nn.Identity()):
        assert not is_batchnorm_like(other), type(other).__name__

    class OwnNorm(nn.Module):
        pass

    class OwnNormChild(OwnNorm):
        pass

    before = list(_BATCHNORM_CLASSES)
    try:
        assert not is_batchnorm_like(OwnNorm())
        assert register_batchnorm_class(OwnNorm) is OwnNorm
        assert is_batchnorm_like(OwnNorm()) and is_batchnorm_like(OwnNormChild())
        with pytest.raises(TypeError, match=r"nn\.Module class"):
            register_batchnorm_class(int)  # type: ignore[type-var]
    finally:
        _BATCHNORM_CLASSES[:] = before
    assert not is_batchnorm_like(OwnNorm())
