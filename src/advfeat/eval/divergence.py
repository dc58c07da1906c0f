"""Feature divergence between two datasets, per layer (AdvBN §5.3, Eq. 4-5, after Pan et al.).

Each channel i of a layer's features is modelled as a normal distribution with the channel's
mean μ^i and standard deviation σ^i over all images and positions. For datasets A and B:

    KL(F_A^i || F_B^i) = log(σ_B^i / σ_A^i) + (σ_A^i² + (μ_A^i − μ_B^i)²) / (2 σ_B^i²) − 1/2   (5)
    D(F_A || F_B) = (1/C) Σ_i [KL(F_A^i || F_B^i) + KL(F_B^i || F_A^i)]                        (4)

"All positions" follows the layer's layout (:mod:`advfeat.layouts`): the spatial positions of an
(N, C, H, W) or (N, H, W, C) feature, the patch tokens of a ViT's (N, L, C) tokens (class tokens
left out). Statistics are accumulated in float64 over the whole dataset (population standard deviation).
A channel that is (nearly) constant on one dataset — a ReLU channel that is dead on it — makes
Eq. 5 infinite or astronomically large and would swamp the mean over channels. Such channels
(standard deviation below ``rel_min_std`` × the layer's median channel standard deviation, on
either dataset) are left out of the mean, and their number is reported
(:func:`near_constant_channels`); with ``rel_min_std=0`` only exactly constant channels
(where Eq. 5 is undefined) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advfeat.layouts import (
    AUTO_LAYOUT,
    CHANNELS_FIRST,
    FeatureLayout,
    LayoutSpecValue,
    infer_layout,
    site_layout,
)
from advfeat.sites import capture_features

__all__ = [
    "ChannelMoments",
    "default_layers",
    "gaussian_kl",
    "layer_moments",
    "near_constant_channels",
    "symmetric_kl_divergence",
]


@dataclass
class ChannelMoments:
    """Running per-channel count, sum and sum of squares (float64) of features ``(N, C, ...)``,
    or of another layout (:class:`advfeat.layouts.FeatureLayout`)."""

    count: float = 0.0
    total: Tensor | None = None
    squares: Tensor | None = None

    def update(self, feature: Tensor, layout: FeatureLayout | None = None) -> None:
        f = feature.detach().to(torch.float64)
        if layout is not None and layout != CHANNELS_FIRST:
            f = layout.channel_rows(f)
        else:
            f = f.transpose(0, 1).reshape(f.shape[1], -1) if f.ndim > 1 else f.reshape(1, -1)
        total, squares = f.sum(dim=1), f.square().sum(dim=1)
        if self.total is None or self.squares is None:
            self.total, self.squares = total, squares
        else:
            self.total, self.squares = self.total + total, self.squares + squares
        self.count += f.shape[1]

    def mean_std(self) -> tuple[Tensor, Tensor]:
        if self.total is None or self.squares is None or self.count == 0:
            raise ValueError("no features were recorded")
        mean = self.total / self.count
        var = (self.squares / self.count - mean.square()).clamp_min(0)
        return mean, var.sqrt()


def gaussian_kl(mu_a: Tensor, sd_a: Tensor, mu_b: Tensor, sd_b: Tensor) -> Tensor:
    """Per-channel KL(N(μ_a, σ_a²) || N(μ_b, σ_b²)), AdvBN Eq. 5."""
    return (
        torch.log(sd_b / sd_a)
        + (sd_a.square() + (mu_a - mu_b).square()) / (2 * sd_b.square())
        - 0.5
    )


def near_constant_channels(
    a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], rel_min_std: float = 1e-3
) -> Tensor:
    """Channels whose std on A or B is below ``rel_min_std`` × the median channel std (bool)."""
    sd = torch.cat([a[1].double(), b[1].double()])
    floor = rel_min_std * float(sd.median()) if rel_min_std > 0 else 0.0
    return (a[1].double() <= floor) | (b[1].double() <= floor)


def symmetric_kl_divergence(
    a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], *, rel_min_std: float = 1e-3
) -> float:
    """AdvBN Eq. 4: mean over channels of KL(A||B) + KL(B||A), from per-channel ``(mean, std)``
    pairs, leaving out :func:`near_constant_channels` (``nan`` if no channel is left)."""
    keep = ~near_constant_channels(a, b, rel_min_std)
    if not bool(keep.any()):
        return float("nan")
    mu_a, sd_a = a[0].double()[keep], a[1].double()[keep]
    mu_b, sd_b = b[0].double()[keep], b[1].double()[keep]
    both = gaussian_kl(mu_a, sd_a, mu_b, sd_b) + gaussian_kl(mu_b, sd_b, mu_a, sd_a)
    return float(both.mean())


def default_layers(model: nn.Module, probe: Tensor) -> list[str]:
    """Every block of the network, in execution order: the children of top-level
    ``nn.Sequential`` stages (``layer1.0``, ...) and the other top-level modules, keeping those
    whose output is a feature map (4-D) or a ViT's tokens (3-D, :mod:`advfeat.layouts`); input
    normalisation and the flattening/pooling glue are left out."""
    candidates: list[str] = []
    for name, child in model.named_children():
        if name == "normalize":
            continue
        if isinstance(child, nn.Sequential) and len(child) > 0:
            candidates += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            candidates.append(name)
    order: list[str] = []
    with torch.no_grad(), capture_features(model, candidates) as feats:
        hooks = []
        for name in candidates:
            module = model.get_submodule(name)
            hooks.append(
                module.register_forward_hook(
                    lambda _m, _a, _o, name=name: order.append(name) if name not in order else None
                )
            )
        try:
            model(probe)
        finally:
            for h in hooks:
                h.remove()
    return [n for n in order if _is_feature_map(model, n, feats.get(n))]


def _is_feature_map(model: nn.Module, name: str, feature: object) -> bool:
    if not isinstance(feature, Tensor):
        return False
    if feature.ndim == 3:
        return infer_layout(model.get_submodule(name), feature, model, name).kind == "tokens"
    return feature.ndim == 4


def layer_moments(
    model: nn.Module,
    batches: Iterable[Tensor],
    layers: Sequence[str],
    layouts: Mapping[str, LayoutSpecValue] | None = None,
) -> dict[str, ChannelMoments]:
    """Per-channel moments of each layer's output over all ``batches`` of images.

    Each layer's channels are where ``layouts[name]`` says (default ``"auto"``: the model's
    ``feature_layouts``, else inferred, :func:`advfeat.layouts.site_layout`)."""
    given = dict(layouts or {})
    moments = {name: ChannelMoments() for name in layers}
    with torch.no_grad():
        for x in batches:
            # copies: later layers may write into a layer's output (a BN before an in-place
            # ReLU or `out += identity`)
            with capture_features(model, list(layers), detach=True, clone=True) as feats:
                model(x)
            for name in layers:
                f = feats[name]
                layout = site_layout(model, name, f, given.get(name, AUTO_LAYOUT))
                moments[name].update(f, layout)
    return moments
