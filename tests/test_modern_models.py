"""ViTs and ConvNeXts (timm and torchvision, no weights downloaded): default sites, every method
without normalization branches trains a couple of steps, exports give the stock keys and logits,
and the tail after a ViT block is the full model with the block's output replaced."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.convnext import CNBlockConfig

from advfeat.errors import AdvfeatError
from advfeat.export import build_exported, export_run, load_exported_state
from advfeat.methods import build_method
from advfeat.methods.feature_aug import TailFallback, report_tail_fallback
from advfeat.models import attach_normalize, build_model
from advfeat.norm import AdaptiveFeatureAlignment
from advfeat.sites import (
    SiteSplit,
    capture_features,
    last_stage,
    replace_features,
    spread_blocks,
    stage_blocks,
    stages,
)
from advfeat.train import TrainConfig, Trainer
from helpers import tiny_train_config

timm = pytest.importorskip("timm")

SIZE = 16  # ViTs (patch 4: 16 tokens); timm's ConvNeXt stem and 3 downsamplings need 32
SIZES = {"timm-convnext": 32}
METHODS = ("standard", "alfa", "l-alfa", "afan", "pgd-at", "trades", "mart")
FEW_STEPS = {"alfa": 1, "l-alfa": 1, "afan": 1, "pgd-at": 2, "trades": 2, "mart": 2}
TIMM_VIT = {"patch_size": 4, "depth": 2, "embed_dim": 16, "num_heads": 2}
TIMM_CONVNEXT = {"depths": (1, 1, 2, 1), "dims": (8, 8, 16, 16)}
TV_VIT = {"patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
TV_CONVNEXT = {"patch_size": 2, "depths": [1, 2, 1], "dims": [8, 16, 16]}


def stock_tv_convnext(num_classes: int = 10) -> nn.Module:
    """What ``torchvision:convnext_tiny`` with :data:`TV_CONVNEXT` is, from torchvision alone."""
    setting = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 16, 2), CNBlockConfig(16, None, 1)]
    model = tv_models.ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=num_classes)
    model.features[0][0] = nn.Conv2d(3, 8, kernel_size=2, stride=2)
    return model


def tv_convnext() -> nn.Module:
    """torchvision's ConvNeXt class at a tiny size (convnext_tiny fixes its widths)."""
    setting = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 16, 2), CNBlockConfig(16, None, 1)]
    return attach_normalize(tv_models.ConvNeXt(setting, num_classes=10), 0.5, 0.5)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "timm-vit": lambda: build_model("timm:vit_tiny_patch16_224", image_size=SIZE, **TIMM_VIT),
    "timm-convnext": lambda: build_model("timm:convnext_atto", **TIMM_CONVNEXT),
    "tv-vit": lambda: build_model("torchvision:vit_b_16", image_size=SIZE, **TV_VIT),
    "tv-convnext": tv_convnext,
}


@pytest.fixture(autouse=True)
def _quiet_layouts() -> None:
    warnings.filterwarnings("ignore", message=".*layout inferred.*")


# ---------------------------------------------------------------------------- default sites
def test_default_sites_of_stock_models() -> None:
    """The stock architectures (built on the meta device: nothing allocated or downloaded)."""
    with torch.device("meta"):
        vit = build_model("timm:vit_tiny_patch16_224", image_size=32, patch_size=4)
        convnext = build_model("timm:convnext_atto")
        tv_vit = build_model("torchvision:vit_b_16", image_size=32)
        tv_convnext_tiny = build_model("torchvision:convnext_tiny")
    assert last_stage(vit) == "blocks.11"  # a ViT's last encoder block
    assert stage_blocks(vit) == [f"blocks.{i}" for i in range(12)]
    assert spread_blocks(vit, 4) == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert stages(convnext) == [f"stages.{i}" for i in range(4)]
    assert last_stage(convnext) == "stages.3"  # a ConvNeXt's last stage
    assert stage_blocks(convnext)[:3] == [
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.blocks.0",
    ]
    assert len(stage_blocks(convnext)) == 2 + 2 + 6 + 2
    assert last_stage(tv_vit) == "encoder.layers.encoder_layer_11"
    assert len(stage_blocks(tv_vit)) == 12
    assert stages(tv_convnext_tiny) == ["features.1", "features.3", "features.5", "features.7"]
    assert last_stage(tv_convnext_tiny) == "features.7"
    assert stage_blocks(tv_convnext_tiny)[-1] == "features.7.2"


def test_batchnorm_cnns_keep_their_sites() -> None:
    resnet = build_model("resnet20")
    assert last_stage(resnet) == "layer3"
    assert stage_blocks(resnet) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2)]
    with torch.device("meta"):
        effnet = build_model("torchvision:efficientnet_b0")
    assert last_stage(effnet) == "features"


def test_timm_vits_are_built_for_the_data_size() -> None:
    model = build_model("timm:vit_tiny_patch16_224", image_size=SIZE, **TIMM_VIT)
    assert model(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 10)


# ------------------------------------------------------------------------ training per method
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_trains_a_few_steps(family: str) -> None:
    torch.manual_seed(0)
    size = SIZES.get(family, SIZE)
    x, y = torch.rand(8, 3, size, size), torch.randint(0, 10, (8,))
    for name in METHODS:
        options = {"steps": FEW_STEPS[name]} if name in FEW_STEPS else {}
        if name == "l-alfa":
            options["num_sites"] = 2
        method = build_method(name, **options)
        model = method.prepare(FAMILIES[family]())
        if name in ("alfa", "l-alfa", "afan"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", TailFallback)  # every site splits
                sites = method.resolve_sites(model)
            expected = [last_stage(model)] if name != "l-alfa" else spread_blocks(model, 2)
            assert sites == expected, (family, name)
        optimizer = torch.optim.SGD(method.parameter_groups(model), lr=0.01)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            out = method(model, x, y)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            assert torch.isfinite(out.loss), (family, name)
        changed = any(
            not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
        )
        assert changed, (family, name)


# ------------------------------------------------------------------------------------ export
def tiny_run(method: str, model: str, size: int, **model_options: object) -> TrainConfig:
    return tiny_train_config(
        n_train=16,
        n_test=8,
        image_size=size,
        method=method,
        model=model,
        model_options=dict(model_options),
        method_options={"steps": 1},
        epochs=1,
        batch_size=8,
        eval_batch_size=8,
    )


@pytest.mark.parametrize(
    ("method", "model", "options", "stock"),
    [
        (
            "alfa",
            "timm:vit_tiny_patch16_224",
            TIMM_VIT,
            lambda: timm.create_model(
                "vit_tiny_patch16_224", num_classes=8, img_size=SIZE, **TIMM_VIT
            ),
        ),
        (
            "afan",
            "timm:convnext_atto",
            TIMM_CONVNEXT,
            lambda: timm.create_model("convnext_atto", num_classes=8, **TIMM_CONVNEXT),
        ),
        (
            "alfa",
            "torchvision:vit_b_16",
            TV_VIT,
            lambda: tv_models.VisionTransformer(image_size=SIZE, num_classes=8, **TV_VIT),
        ),
        (
            "advprop",
            "torchvision:convnext_tiny",
            TV_CONVNEXT,
            lambda: stock_tv_convnext(num_classes=8),
        ),
    ],
)
def test_export_gives_the_stock_keys_and_logits(
    tmp_path: Path, method: str, model: str, options: dict, stock: Callable[[], nn.Module]
) -> None:
    size = 32 if "convnext" in model else SIZE
    cfg = tiny_run(method, model, size, **options)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    trained = trainer.method.eval_model(trainer.model).eval()
    export_run(tmp_path / "run", tmp_path / "export")
    state = load_exported_state(tmp_path / "export" / "model.pt")
    mean, std = state.pop("normalize.mean"), state.pop("normalize.std")
    plain = stock().eval()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    x = torch.rand(4, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(plain((x - mean) / std), trained(x))


# ------------------------------------------------------ torchvision ConvNeXt shape options
def test_torchvision_convnext_follows_its_shape_options() -> None:
    torch.manual_seed(0)
    model = build_model("torchvision:convnext_tiny", image_size=32, **TV_CONVNEXT)
    stem = model.features[0][0]
    assert (stem.kernel_size, stem.stride, stem.out_channels) == ((2, 2), (2, 2), 8)
    assert stages(model) == ["features.1", "features.3", "features.5"]
    assert [len(model.get_submodule(s)) for s in stages(model)] == [1, 2, 1]
    assert last_stage(model) == "features.5"
    with capture_features(model, stages(model)) as feats:
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    shapes = [tuple(feats[s].shape) for s in stages(model)]
    assert shapes == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4)]  # stride 2, then ×2 each
    rates = [block.stochastic_depth.p for block in model.modules() if hasattr(block, "layer_scale")]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # convnext_tiny's 0.1, linear
    assert set(model.state_dict()) - {"normalize.mean", "normalize.std"} == set(
        stock_tv_convnext().state_dict()
    )
    plain = build_model("torchvision:convnext_tiny", depths=[1, 1, 1, 1], stochastic_depth_prob=0)
    assert plain.features[0][0].kernel_size == (4, 4)  # the paper's stem unless asked
    assert [m.stochastic_depth.p for m in plain.features[7]] == [0.0]
    assert [plain.features[i][0].block[0].in_channels for i in (1, 3, 5, 7)] == [96, 192, 384, 768]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"depths": [1, 2], "dims": [8, 16, 32]}, "one value per stage"),
        ({"depths": "1,1"}, "list of positive integers"),
        ({"patch_size": 0}, "positive integer"),
        ({"patch_size": 16}, "at least 128 px, got 32"),
        ({"depth": [1, 1, 1, 1]}, "does not accept option(s) depth"),
        ({"pretrained": True, "dims": [8, 8, 8, 8]}, "built without weights"),
    ],
)
def test_torchvision_convnext_refuses_wrong_shapes_in_one_line(options: dict, message: str) -> None:
    with pytest.raises(AdvfeatError, match=re.escape(message)) as info:
        build_model("torchvision:convnext_tiny", image_size=32, **options)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- tail only
@pytest.mark.parametrize(
    ("family", "site"), [("timm-vit", "blocks.0"), ("tv-vit", "encoder.layers.encoder_layer_0")]
)
def test_tail_after_a_vit_block_is_the_full_model_with_the_block_replaced(
    family: str, site: str
) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = torch.rand(4, 3, SIZE, SIZE)
    split = SiteSplit(model, site)
    assert split.is_fast, split.fallback_reason
    with capture_features(model, [site], frontier=True) as feats:
        model(x)
    feature = feats[site].detach() + 0.1 * torch.randn_like(feats[site])
    tail_in = feature.clone().requires_grad_(True)
    tail_out = split.tail(tail_in, x=x)
    full_in = feature.clone().requires_grad_(True)
    with replace_features(model, {site: full_in}):
        full_out = model(x)
    torch.testing.assert_close(tail_out, full_out)
    weights = torch.randn_like(full_out)
    (tail_grad,) = torch.autograd.grad((tail_out * weights).sum(), tail_in)
    (full_grad,) = torch.autograd.grad((full_out * weights).sum(), full_in)
    torch.testing.assert_close(tail_grad, full_grad)


class Untraceable(nn.Module):
    """Two blocks whose forward branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x.flatten(1)[:, :4])
        if h.sum() > 1e9:
            h = h * 2
        return self.head(h)


def test_an_untraceable_model_says_so_in_one_line_and_falls_back_correctly() -> None:
    model = Untraceable()
    assert last_stage(model) == "blocks.1"
    with pytest.warns(TailFallback) as record:
        assert not report_tail_fallback(model, "blocks.1")
    message = str(record[0].message)
    assert "\n" not in message and "blocks.1" in message and "whole model" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_tail_fallback(model, "blocks.1")  # once per model and site
    x = torch.rand(3, 4)
    feature = torch.randn(3, 4, requires_grad=True)
    out = SiteSplit(model, "blocks.1").tail(feature, x=x)
    torch.testing.assert_close(out, model.head(feature))


# ------------------------------------------------------------------------- AFA stage II on a ViT
def test_afa_stage2_on_a_vit_fuses_every_layer_norm_and_exports_the_same_logits(
    tmp_path: Path,
) -> None:
    """Stage I (3 LayerNorm branches), stage II from its checkpoint, export: the exported model
    gives the trained stage-II logits, and every fused LayerNorm blends its two frozen branches
    with one W_0 per sample, broadcast over the tokens and channels of (N, L, C)."""
    torch.manual_seed(0)
    stage1 = tiny_run("afa", "timm:vit_tiny_patch16_224", SIZE, **TIMM_VIT)
    stage1.method_options = {"num_branches": 3, "steps": 1}
    Trainer(stage1, tmp_path / "s1").fit()
    stage2 = tiny_run("afa", "timm:vit_tiny_patch16_224", SIZE, **TIMM_VIT)
    stage2.method_options = {
        "num_branches": 3,
        "steps": 1,
        "stage": 2,
        "stage1_checkpoint": str(tmp_path / "s1" / "checkpoint.pt"),
    }
    trainer = Trainer(stage2, tmp_path / "s2")
    trainer.fit()
    fused = trainer.method.eval_model(trainer.model).eval()
    assert isinstance(fused, AdaptiveFeatureAlignment)
    layer_norms = 2 * TIMM_VIT["depth"] + 1  # two per block and the final norm
    assert [isinstance(m.first, nn.LayerNorm) for m in fused.fused_layers] == [True] * layer_norms

    x = torch.rand(4, 3, SIZE, SIZE)
    layer = fused.fused_layers[0]
    with torch.no_grad(), capture_features(fused, ["model.blocks.0.norm1"]) as feats:
        hook = layer.register_forward_pre_hook(lambda _m, args: feats.update(tokens=args[0]))
        logits, w0 = fused(x, return_weight=True)
        hook.remove()
    tokens, out = feats["tokens"], feats["model.blocks.0.norm1"]
    assert tokens.shape == (4, (SIZE // 4) ** 2 + 1, TIMM_VIT["embed_dim"])  # (N, L, C)
    assert w0.shape == (4,) and bool(((w0 > 0) & (w0 < 1)).all())
    w = w0[:, None, None]
    torch.testing.assert_close(out, w * layer.first(tokens) + (1 - w) * layer.last(tokens))
    assert not torch.allclose(layer.first(tokens), layer.last(tokens))  # the branches differ

    export_run(tmp_path / "s2", tmp_path / "export")
    exported = build_exported(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(exported(x), logits)


def test_feature_maps_of_a_vit_are_its_patch_token_grid() -> None:
    """The ``features`` suite on a ViT (A-FAN Fig. S6): the first block's patch tokens laid out
    on their grid, the class token left out, and its maps in the results."""
    from advfeat.eval.feature_maps import as_map, feature_grid
    from advfeat.eval.suites.features import default_site

    model = build_model("timm:vit_tiny_patch16_224", image_size=SIZE, **TIMM_VIT).eval()
    assert default_site(model) == "blocks.0"
    assert default_site(tv_convnext()) == "features.1"  # the first stage, not the whole stack
    side = SIZE // TIMM_VIT["patch_size"]
    tokens = torch.randn(2, 1 + side * side, 16)
    grid = as_map(model, "blocks.0", tokens)
    assert grid.shape == (2, 16, side, side)
    # token t (after the class token) is pixel (t // side, t % side) of channel c
    torch.testing.assert_close(grid[1, 5, 2, 3], tokens[1, 1 + 2 * side + 3, 5])
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    maps = feature_grid(model, x, torch.tensor([0, 1]), "blocks.0", alpha=0.1, steps=1, magnify=5)
    clean = maps["maps"]["clean"]
    assert len(clean) == 2 and len(clean[0]) == side and len(clean[0][0]) == side
    assert maps["maps"]["perturbed ×1"] != clean  # the attack moved the tokens
