"""Feature layouts per site (issue 22, item 2): per-channel statistics over the right dimensions
for (N, C, H, W), (N, H, W, C) and tokens (N, L, C) with or without class tokens.

Every statistic is checked, values and gradients, against a reference written with explicit
loops over channels (and samples / tokens): the layout helpers, A-FAN's adversarial feature
normalization (A-FAN Eq. 6), AdvBN's re-normalized feature (AdvBN Eq. 1) and the divergence's
per-channel moments (AdvBN Eq. 4-5). Then inference on timm / torchvision models, the model's
declaration, and A-FAN training on a tiny ViT.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from advfeat.attacks.feature import BNStatsAttack, advbn_feature
from advfeat.errors import AdvfeatError
from advfeat.eval.divergence import ChannelMoments, default_layers
from advfeat.eval.divergence import layer_moments as divergence_moments
from advfeat.layouts import (
    CHANNELS_FIRST,
    FeatureLayout,
    LayoutInferred,
    infer_layout,
    parse_layout,
    site_layout,
)
from advfeat.methods import afan as afan_module
from advfeat.methods import build_method
from advfeat.methods.feature_aug import (
    AdversarialFeatureNormalization,
    adversarial_feature_normalization,
    feature_moments,
)
from advfeat.sites import capture_features

EPS = 1e-5
LAYOUTS = [
    FeatureLayout("channels_first"),
    FeatureLayout("channels_last"),
    FeatureLayout("tokens"),
    FeatureLayout("tokens", 1),
    FeatureLayout("tokens", 2),
]
IDS = [str(layout) for layout in LAYOUTS]


# ------------------------------------------------------------------------------ references
def make_feature(layout: FeatureLayout, seed: int = 0, n: int = 3, c: int = 4) -> Tensor:
    """A float64 feature of ``layout`` whose channels have clearly different means and scales."""
    g = torch.Generator().manual_seed(seed)
    h, w = 2, 3
    shapes = {
        "channels_first": (n, c, h, w),
        "channels_last": (n, h, w, c),
        "tokens": (n, layout.prefix_tokens + h * w, c),
    }
    f = torch.randn(shapes[layout.kind], generator=g, dtype=torch.float64)
    scale = torch.linspace(0.5, 3.0, c, dtype=torch.float64)
    offset = torch.linspace(-2.0, 2.0, c, dtype=torch.float64)
    if layout.kind == "channels_first":
        return f * scale.view(1, c, 1, 1) + offset.view(1, c, 1, 1)
    return f * scale + offset


def channel_of(f: Tensor, layout: FeatureLayout, c: int) -> Tensor:
    """Channel ``c`` of every sample and position (all tokens), written per layout by hand."""
    return f[:, c] if layout.kind == "channels_first" else f[..., c]


def stats_values(f: Tensor, layout: FeatureLayout, c: int, sample: int | None = None) -> Tensor:
    """The values that channel ``c``'s statistics are taken over: the batch (or one sample) and
    every position; the patch tokens only, for tokens."""
    values = channel_of(f, layout, c)
    if layout.kind == "tokens":
        values = values[:, layout.prefix_tokens :]
    if sample is not None:
        values = values[sample]
    return values.reshape(-1)


def mean_var(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance written out (as batch norm in training)."""
    mean = values.sum() / values.numel()
    return mean, ((values - mean) ** 2).sum() / values.numel()


def assemble(channels: list[Tensor], layout: FeatureLayout) -> Tensor:
    """Put per-channel pieces back into ``layout``."""
    return torch.stack(channels, dim=1 if layout.kind == "channels_first" else -1)


def channel_count(f: Tensor, layout: FeatureLayout) -> int:
    return f.shape[1] if layout.kind == "channels_first" else f.shape[-1]


def reference_afn(clean: Tensor, adversarial: Tensor, layout: FeatureLayout) -> Tensor:
    """A-FAN Eq. 6, channel by channel: σ_adv·(f_clean − μ_clean)/σ_clean + μ_adv."""
    out = []
    for c in range(channel_count(clean, layout)):
        mu_c, var_c = mean_var(stats_values(clean, layout, c))
        mu_a, var_a = mean_var(stats_values(adversarial, layout, c))
        sigma_c, sigma_a = (var_c + EPS).sqrt(), (var_a + EPS).sqrt()
        out.append(sigma_a * (channel_of(clean, layout, c) - mu_c) / sigma_c + mu_a)
    return assemble(out, layout)


def reference_advbn(
    f: Tensor, d_mu: Tensor, d_sigma: Tensor, layout: FeatureLayout, per_sample: bool
) -> Tensor:
    """AdvBN Eq. 1, channel by channel (and sample by sample for instance statistics)."""
    out = []
    for c in range(channel_count(f, layout)):
        if per_sample:
            means = [mean_var(stats_values(f, layout, c, sample=i))[0] for i in range(len(f))]
            shape = [len(f)] + [1] * (channel_of(f, layout, c).ndim - 1)
            mu = torch.stack(means).reshape(shape)
        else:
            mu = mean_var(stats_values(f, layout, c))[0]
        out.append(d_sigma[c] * (channel_of(f, layout, c) - mu) + d_mu[c] * mu)
    return assemble(out, layout)


def gradients(out: Tensor, inputs: list[Tensor], seed: int = 7) -> list[Tensor]:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * weights).sum(), inputs))


def assert_close_values_and_gradients(
    ours: Callable[..., Tensor], reference: Callable[..., Tensor], inputs: list[Tensor]
) -> None:
    leaves_a = [t.detach().clone().requires_grad_(True) for t in inputs]
    leaves_b = [t.detach().clone().requires_grad_(True) for t in inputs]
    out_a, out_b = ours(*leaves_a), reference(*leaves_b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-10)
    for ga, gb in zip(gradients(out_a, leaves_a), gradients(out_b, leaves_b), strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- the layouts
def test_dimensions_of_each_layout() -> None:
    assert CHANNELS_FIRST.reduce_dims(4) == (0, 2, 3)
    assert CHANNELS_FIRST.reduce_dims(2) == (0,)
    assert CHANNELS_FIRST.reduce_dims(4, per_sample=True) == (2, 3)
    assert FeatureLayout("channels_last").reduce_dims(4) == (0, 1, 2)
    assert FeatureLayout("channels_last").channel_dim(4) == 3
    assert FeatureLayout("tokens", 1).reduce_dims(3) == (0, 1)
    assert FeatureLayout("tokens", 1).reduce_dims(3, per_sample=True) == (1,)
    assert FeatureLayout("tokens").positional_dims(3) == (2,)
    f = make_feature(FeatureLayout("tokens", 2))
    assert FeatureLayout("tokens", 2).statistics_part(f).shape == (3, 6, 4)
    assert CHANNELS_FIRST.statistics_part(f) is f
    v = torch.arange(4.0)
    assert FeatureLayout("tokens").broadcast(v, f).shape == (1, 1, 4)
    assert CHANNELS_FIRST.broadcast(v, make_feature(CHANNELS_FIRST)).shape == (1, 4, 1, 1)


def test_specifications_parse_and_errors_are_clear() -> None:
    assert parse_layout("auto") is None
    assert parse_layout("channels_last") == ("channels_last", 0)
    assert parse_layout("tokens") == ("tokens", None)
    assert parse_layout("tokens:2") == ("tokens", 2)
    assert str(FeatureLayout("tokens", 1)) == "tokens:1"
    with pytest.raises(AdvfeatError, match="unknown feature layout"):
        parse_layout("nhwc")
    with pytest.raises(AdvfeatError, match="only a tokens layout"):
        FeatureLayout("channels_last", 1)
    with pytest.raises(AdvfeatError, match="leave no patch token"):
        FeatureLayout("tokens", 5).check(torch.zeros(2, 5, 3))
    with pytest.raises(AdvfeatError, match="tokens feature is"):
        FeatureLayout("tokens").check(torch.zeros(2, 5, 3, 3))
    with pytest.raises(AdvfeatError, match="one value per channel"):
        FeatureLayout("tokens").broadcast(torch.ones(2), torch.zeros(2, 5, 3))
    with pytest.raises(AdvfeatError, match="afan: layout must be"):
        build_method("afan", layout="nchw")


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_channel_mean_var_against_loops(layout: FeatureLayout, per_sample: bool) -> None:
    f = make_feature(layout)

    def ours(t: Tensor) -> Tensor:
        mean, var = layout.channel_mean_var(t, per_sample=per_sample)
        return torch.stack([mean.reshape(-1), var.reshape(-1)])

    def reference(t: Tensor) -> Tensor:
        samples = range(len(t)) if per_sample else [None]
        pairs = [
            mean_var(stats_values(t, layout, c, sample=i))
            for i in samples
            for c in range(channel_count(t, layout))
        ]
        return torch.stack([torch.stack([m for m, _ in pairs]), torch.stack([v for _, v in pairs])])

    assert_close_values_and_gradients(ours, reference, [f])


# ------------------------------------------------------------------------- A-FAN Eq. 6
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_feature_moments_per_channel_against_loops(layout: FeatureLayout) -> None:
    f = make_feature(layout)

    def ours(t: Tensor) -> Tensor:
        mu, sigma = feature_moments(t, "channel", EPS, layout)
        return torch.stack([mu.reshape(-1), sigma.reshape(-1)])

    def reference(t: Tensor) -> Tensor:
        pairs = [mean_var(stats_values(t, layout, c)) for c in range(channel_count(t, layout))]
        return torch.stack(
            [torch.stack([m for m, _ in pairs]), torch.stack([(v + EPS).sqrt() for _, v in pairs])]
        )

    assert_close_values_and_gradients(ours, reference, [f])


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_adversarial_feature_normalization_against_loops(layout: FeatureLayout) -> None:
    clean, adversarial = make_feature(layout, seed=0), make_feature(layout, seed=1)
    assert_close_values_and_gradients(
        lambda c, a: adversarial_feature_normalization(c, a, "channel", EPS, layout),
        lambda c, a: reference_afn(c, a, layout),
        [clean, adversarial],
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_shared_clean_statistics_class_against_loops(layout: FeatureLayout) -> None:
    """The cheaper class used in training: f_mix of f + s·δ for a constant δ, gradients in f."""
    clean = make_feature(layout, seed=0)
    delta = 0.3 * make_feature(layout, seed=2)
    for scale in (1.0, 0.4):
        assert_close_values_and_gradients(
            lambda c, s=scale: AdversarialFeatureNormalization(c, "channel", EPS, layout)(delta, s),
            lambda c, s=scale: reference_afn(c, c + s * delta, layout),
            [clean],
        )


def test_positional_statistics_of_tokens_are_per_token_over_the_channels() -> None:
    """The released code's reading, on tokens: over C at each sample and token (class token
    included: it is a position like the others there)."""
    layout = FeatureLayout("tokens", 1)
    f = make_feature(layout)
    mu, sigma = feature_moments(f, "positional", EPS, layout)
    for i in range(f.shape[0]):
        for t in range(f.shape[1]):
            m, v = mean_var(f[i, t])
            torch.testing.assert_close(mu[i, t, 0], m)
            torch.testing.assert_close(sigma[i, t, 0], (v + EPS).sqrt())


def test_the_default_layout_is_bit_identical_for_cnn_features() -> None:
    f, delta = make_feature(CHANNELS_FIRST, 0).float(), make_feature(CHANNELS_FIRST, 1).float()
    old_var, old_mean = torch.var_mean(f, dim=(0, 2, 3), keepdim=True, correction=0)
    mu, sigma = feature_moments(f)
    assert torch.equal(mu, old_mean) and torch.equal(sigma, (old_var + EPS).sqrt())
    default = AdversarialFeatureNormalization(f)(delta, 0.5)
    assert torch.equal(
        default, AdversarialFeatureNormalization(f, layout=CHANNELS_FIRST)(delta, 0.5)
    )
    d_mu, d_sigma = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    assert torch.equal(
        advbn_feature(f, d_mu, d_sigma), advbn_feature(f, d_mu, d_sigma, layout=CHANNELS_FIRST)
    )


def old_token_statistics(f: Tensor) -> tuple[Tensor, Tensor]:
    """What A-FAN computed on an (N, L, C) feature before layouts: the "channel" dimensions of
    an (N, C, ...) feature, (0, 2) — per token, over the batch and the channels."""
    var, mean = torch.var_mean(f, dim=(0, 2), keepdim=True, correction=0)
    return mean, (var + EPS).sqrt()


def test_afan_token_statistics_differ_from_the_old_wrong_ones() -> None:
    layout = FeatureLayout("tokens")
    clean = make_feature(layout, seed=0)
    adversarial = clean + 0.5 * make_feature(layout, seed=3)
    mu_old, sigma_old = old_token_statistics(clean)
    mu_new, _ = feature_moments(clean, "channel", EPS, layout)
    assert mu_old.shape == (1, clean.shape[1], 1) and mu_new.shape == (1, 1, clean.shape[2])
    # without a layout the function keeps its (N, C, ...) reading: exactly the old statistics
    mu_default, sigma_default = feature_moments(clean)
    assert torch.equal(mu_default, mu_old) and torch.equal(sigma_default, sigma_old)

    mu_a_old, sigma_a_old = old_token_statistics(adversarial)
    mixed_old = sigma_a_old * (clean - mu_old) / sigma_old + mu_a_old
    mixed_new = adversarial_feature_normalization(clean, adversarial, "channel", EPS, layout)
    assert not torch.allclose(mixed_new, mixed_old, atol=1e-3)
    # Eq. 6: f_mix carries the adversarial feature's per-channel statistics; the old one did not
    mu_adv, sigma_adv = feature_moments(adversarial, "channel", EPS, layout)
    mu_mix, sigma_mix = feature_moments(mixed_new, "channel", 0.0, layout)
    torch.testing.assert_close(mu_mix, mu_adv)
    var_clean = feature_moments(clean, "channel", 0.0, layout)[1].square()
    torch.testing.assert_close(sigma_mix, sigma_adv * (var_clean / (var_clean + EPS)).sqrt())
    mu_mix_old, _ = feature_moments(mixed_old, "channel", 0.0, layout)
    assert not torch.allclose(mu_mix_old, mu_adv, atol=1e-3)


def test_class_tokens_stay_out_of_the_statistics_and_take_the_per_channel_map() -> None:
    layout = FeatureLayout("tokens", 1)
    clean, adversarial = make_feature(layout, 0), make_feature(layout, 1)
    changed = clean.clone()
    changed[:, 0] += 100.0  # only the class token
    mu, sigma = feature_moments(clean, "channel", EPS, layout)
    mu_changed, sigma_changed = feature_moments(changed, "channel", EPS, layout)
    assert torch.equal(mu, mu_changed) and torch.equal(sigma, sigma_changed)
    counted = FeatureLayout("tokens", 0)
    assert not torch.allclose(feature_moments(changed, "channel", EPS, counted)[0], mu)
    # the class token gets the same per-channel affine map as the patch tokens
    mixed = adversarial_feature_normalization(clean, adversarial, "channel", EPS, layout)
    mu_a, sigma_a = feature_moments(adversarial, "channel", EPS, layout)
    torch.testing.assert_close(mixed[:, :1], sigma_a * (clean[:, :1] - mu) / sigma + mu_a)


# ------------------------------------------------------------------------- AdvBN Eq. 1
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_advbn_feature_against_loops(layout: FeatureLayout, stats: str) -> None:
    f = make_feature(layout)
    g = torch.Generator().manual_seed(5)
    d_mu = 1 + 0.5 * torch.rand(4, generator=g, dtype=torch.float64)
    d_sigma = 1 - 0.5 * torch.rand(4, generator=g, dtype=torch.float64)
    assert_close_values_and_gradients(
        lambda t, m, s: advbn_feature(t, m, s, stats=stats, layout=layout),  # type: ignore[arg-type]
        lambda t, m, s: reference_advbn(t, m, s, layout, per_sample=stats == "instance"),
        [f, d_mu, d_sigma],
    )


# ---------------------------------------------------------------------- a tiny token model
class TokenBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class TinyTokenNet(nn.Module):
    """A class token and 4×4 patches of 8×8 images, two blocks, the class token's logits."""

    def __init__(self, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 4 * 4, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.1)
        self.blocks = nn.Sequential(TokenBlock(width), TokenBlock(width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3)
        tokens = self.embed(patches.flatten(1, 2))
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def token_net(seed: int = 0) -> TinyTokenNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyTokenNet()


def token_batch(n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_a_class_token_is_handled_as_the_model_declares() -> None:
    model = token_net()
    x, _ = token_batch()
    with torch.no_grad(), capture_features(model, ["blocks.1"]) as feats:
        model(x)
    f = feats["blocks.1"]
    with pytest.warns(LayoutInferred, match="tokens .* with 1 prefix token"):
        assert site_layout(model, "blocks.1", f) == FeatureLayout("tokens", 1)  # cls_token

    declared = token_net()
    declared.feature_layouts = {"blocks.1": "tokens:0"}  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared: nothing to report
        assert site_layout(declared, "blocks.1", f) == FeatureLayout("tokens", 0)
        # names relative to a module on the site's path; the method option wins over both
        declared.blocks.feature_layouts = {"0": "tokens:1"}  # type: ignore[assignment]
        assert site_layout(declared, "blocks.0", f) == FeatureLayout("tokens", 1)
        assert site_layout(declared, "blocks.1", f, "tokens") == FeatureLayout("tokens", 1)
        assert site_layout(declared, "blocks.1", f, "channels_last").kind == "channels_last"

    # A-FAN follows the declaration: the class token's values do not move its statistics
    seen: list[FeatureLayout] = []

    class Recording(AdversarialFeatureNormalization):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            seen.append(self.layout)

    x, y = token_batch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(afan_module, "AdversarialFeatureNormalization", Recording)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayoutInferred)
            build_method("afan", site="blocks.1")(token_net(), x, y)
            build_method("afan", site="blocks.1")(declared, x, y)
            build_method("afan", site="blocks.1", layout="tokens:0")(token_net(), x, y)
    assert seen == [
        FeatureLayout("tokens", 1),
        FeatureLayout("tokens", 0),
        FeatureLayout("tokens", 0),
    ]


def test_inference_is_reported_once_and_not_for_cnn_features(make_tiny_bn_cnn) -> None:  # type: ignore[no-untyped-def]
    model = token_net()
    f = torch.zeros(2, 5, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            site_layout(model, "blocks.0", f)
        cnn = make_tiny_bn_cnn()
        assert site_layout(cnn, "block1", torch.zeros(2, 8, 8, 8)) == CHANNELS_FIRST
    assert [type(w.message) for w in caught] == [LayoutInferred]


def test_inference_on_modules_without_a_model() -> None:
    assert infer_layout(nn.Conv1d(3, 4, 1), torch.zeros(2, 4, 7)) == CHANNELS_FIRST
    assert infer_layout(nn.BatchNorm1d(4), torch.zeros(2, 4, 7)) == CHANNELS_FIRST
    assert infer_layout(nn.LayerNorm(4), torch.zeros(2, 7, 4)) == FeatureLayout("tokens")
    assert infer_layout(nn.LayerNorm(4), torch.zeros(2, 5, 5, 4)).kind == "channels_last"
    assert infer_layout(nn.Linear(3, 4), torch.zeros(2, 5, 5, 4)).kind == "channels_last"
    assert infer_layout(nn.Linear(3, 4), torch.zeros(2, 4)) == CHANNELS_FIRST
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    assert infer_layout(block, torch.zeros(2, 4, 5, 5)) == CHANNELS_FIRST


def test_torchvision_models_are_inferred() -> None:
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=16
    )
    convnext = torchvision.models.convnext_tiny()
    cases = [
        (vit, "encoder.layers.encoder_layer_0", (1, 3, 16, 16), FeatureLayout("tokens", 1)),
        (vit, "conv_proj", (1, 3, 16, 16), CHANNELS_FIRST),
        (convnext, "features.1.0", (1, 3, 32, 32), CHANNELS_FIRST),
        (convnext, "features.1.0.block.2", (1, 3, 32, 32), FeatureLayout("channels_last")),
        (convnext, "features.1.0.block.3", (1, 3, 32, 32), FeatureLayout("channels_last")),
    ]
    for model, site, shape, expected in cases:
        with torch.no_grad(), capture_features(model, [site]) as feats:
            model(torch.rand(shape))
        assert infer_layout(model.get_submodule(site), feats[site], model, site) == expected, site


# --------------------------------------------------------------------------------- timm
def tiny_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: nn.Module = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
            embed_dim=24, num_heads=2, num_classes=3,
        )  # fmt: skip
    return model


def test_timm_models_are_inferred() -> None:
    timm = pytest.importorskip("timm")
    vit = tiny_vit()
    convnext = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=3)
    swin = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
        num_classes=3,
    )  # fmt: skip
    cases = [
        (vit, "blocks.1", FeatureLayout("tokens", 1)),
        (vit, "patch_embed", FeatureLayout("tokens", 0)),  # before the class token is added
        (vit, "norm", FeatureLayout("tokens", 1)),
        (convnext, "stages.0.blocks.0", CHANNELS_FIRST),
        (convnext, "stages.0.blocks.0.norm", FeatureLayout("channels_last")),
        (convnext, "stages.0.blocks.0.mlp", FeatureLayout("channels_last")),
        (convnext, "stem", CHANNELS_FIRST),
        (swin, "patch_embed", FeatureLayout("channels_last")),
        (swin, "layers.0.blocks.0", FeatureLayout("channels_last")),
        (swin, "layers.1", FeatureLayout("channels_last")),
    ]
    for model, site, expected in cases:
        with torch.no_grad(), capture_features(model, [site]) as feats:
            model(torch.rand(1, 3, 32, 32))
        assert infer_layout(model.get_submodule(site), feats[site], model, site) == expected, site


def test_afan_trains_a_tiny_timm_vit_at_a_block_with_token_statistics() -> None:
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    method = build_method("afan", site="blocks.1")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
    seen: list[FeatureLayout] = []

    class Recording(AdversarialFeatureNormalization):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            seen.append(self.layout)

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(afan_module, "AdversarialFeatureNormalization", Recording)
        for _ in range(3):
            out = method(model, x, y)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            assert torch.isfinite(out.loss)
    inferred = [w for w in caught if issubclass(w.category, LayoutInferred)]
    assert len(inferred) == 1 and "'blocks.1'" in str(inferred[0].message)
    assert "tokens (N, L, C) with 1 prefix token" in str(inferred[0].message)
    assert seen == [FeatureLayout("tokens", 1)] * 3
    assert out.logs["loss_adv"] > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "head.weight" in changed


# ------------------------------------------------------- AdvBN's attack and the divergence
def test_advbn_attack_on_tokens_has_one_multiplier_per_channel() -> None:
    model = token_net().eval()
    x, y = token_batch()
    with torch.no_grad(), capture_features(model, ["blocks.0"]) as feats:
        model(x)
    f = feats["blocks.0"]
    layout = FeatureLayout("tokens", 1)
    attack = BNStatsAttack(model, "blocks.0", eps=0.5, alpha=0.2, steps=2, layout=layout)
    f_adv = attack(x, y, feature=f)
    assert attack.last_multipliers is not None
    d_mu, d_sigma = attack.last_multipliers
    assert d_mu.shape == d_sigma.shape == (6,)
    assert not torch.equal(d_mu, torch.ones(6))
    torch.testing.assert_close(f_adv, reference_advbn(f, d_mu, d_sigma, layout, per_sample=False))


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_divergence_channel_moments_against_loops(layout: FeatureLayout) -> None:
    batches = [make_feature(layout, seed=s) for s in range(3)]
    moments = ChannelMoments()
    for f in batches:
        moments.update(f, layout)
    mean, std = moments.mean_std()
    whole = torch.cat(batches)
    for c in range(4):
        m, v = mean_var(stats_values(whole, layout, c))
        torch.testing.assert_close(mean[c], m)
        torch.testing.assert_close(std[c], v.sqrt())


def test_divergence_layers_and_moments_of_a_token_model() -> None:
    model = token_net().eval()
    x, _ = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutInferred)
        layers = default_layers(model, x[:2])
        assert layers == ["embed", "blocks.0", "blocks.1", "norm"]  # the token outputs
        found = divergence_moments(model, [x[:3], x[3:]], ["blocks.1"])
    with torch.no_grad(), capture_features(model, ["blocks.1"]) as feats:
        model(x)
    tokens = feats["blocks.1"][:, 1:].reshape(-1, 6)  # patch tokens only
    mean, std = found["blocks.1"].mean_std()
    torch.testing.assert_close(mean, tokens.double().mean(0))
    torch.testing.assert_close(std, tokens.double().std(0, correction=0))
