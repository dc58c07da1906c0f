"""Clean, adversarially perturbed and re-normalized feature maps (A-FAN Fig. S6).

The perturbation is ALFA/A-FAN's feature attack: sign-gradient ascent of the cross-entropy on
the output of a feature site, without an ε-ball (ALFA §3.1, A-FAN Eq. 4), run on the whole model
with the site's output replaced. Two strengths are shown, obtained by rescaling the one
perturbation (A-FAN §4.1: f_adv^(i) = f + (α_i/α_1)·δ_1). Adversarial feature normalization
(A-FAN Eq. 6) injects the perturbed features' per-channel batch statistics into the clean ones:

    f_mix = σ_adv · (f_clean − μ_clean) / σ_clean + μ_adv

with μ, σ per channel over (batch, height, width), as BN computes them. As in the paper's
figure, the perturbation is magnified (×20 by default) before display and normalization.
One channel is shown: the one whose clean map varies most over the images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from advfeat.attacks.base import attack_guard
from advfeat.attacks.feature import FeaturePGD
from advfeat.errors import AdvfeatError
from advfeat.layouts import site_layout
from advfeat.methods.feature_aug import adversarial_feature_normalization
from advfeat.sites import capture_features

__all__ = ["feature_grid", "perturb_feature"]


def perturb_feature(
    model: nn.Module, x: Tensor, y: Tensor, site: str, *, alpha: float, steps: int
) -> tuple[Tensor, Tensor]:
    """``(f_clean, δ)``: the site's clean output and ``steps`` unbounded sign-gradient steps of
    size ``alpha`` ascending the cross-entropy (ALFA Eq. 2 with ε = ∞), both as maps
    (N, C, H, W): a channels-last output is moved, a ViT's patch tokens (N, L, C) are laid out
    on their square grid without the class tokens (:mod:`advfeat.layouts`)."""
    # a copy: the rest of the forward may write into the site's output (`out += identity`)
    with (
        attack_guard(model),
        torch.no_grad(),
        capture_features(model, site, detach=True, clone=True) as f,
    ):
        model(x)
    clean = f[site]
    if not isinstance(clean, Tensor) or clean.ndim not in (3, 4):
        shape = tuple(clean.shape) if isinstance(clean, Tensor) else type(clean).__name__
        raise AdvfeatError(
            f"feature site {site!r} must output a feature map (N, C, H, W), (N, H, W, C) or "
            f"tokens (N, L, C), got {shape}"
        )
    delta = FeaturePGD(model, site, alpha=alpha, steps=steps)(x, y, feature=clean)
    return as_map(model, site, clean), as_map(model, site, delta)


def as_map(model: nn.Module, site: str, feature: Tensor) -> Tensor:
    """``feature`` (the output of ``site``, or a perturbation of it) as (N, C, H, W)."""
    layout = site_layout(model, site, feature)
    grid = layout.to_channels_first(feature)
    if layout.kind != "tokens":
        return grid
    patches = grid[:, :, layout.prefix_tokens :]
    side = round(patches.shape[2] ** 0.5)
    if side * side != patches.shape[2]:
        raise AdvfeatError(
            f"feature site {site!r}: {patches.shape[2]} patch tokens do not form a square grid; "
            "set features.site to a site with a square token grid or a feature map"
        )
    return patches.reshape(*patches.shape[:2], side, side)


def _show(t: Tensor, channel: int) -> list[list[list[float]]]:
    return [[[round(float(v), 4) for v in row] for row in m] for m in t[:, channel]]


def feature_grid(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    site: str,
    *,
    alpha: float,
    steps: int,
    magnify: float,
    ratios: tuple[float, ...] = (0.5, 1.0),
) -> dict[str, Any]:
    """JSON-ready maps: columns clean, perturbed at each ratio, re-normalized of each."""
    clean, delta = perturb_feature(model, x, y, site, alpha=alpha, steps=steps)
    columns: dict[str, Tensor] = {"clean": clean}
    perturbed = {r: clean + magnify * r * delta for r in ratios}
    for r in ratios:
        columns[f"perturbed ×{r:g}"] = perturbed[r]
    for r in ratios:
        columns[f"normalized ×{r:g}"] = adversarial_feature_normalization(clean, perturbed[r])
    channel = int(clean.transpose(0, 1).flatten(1).var(dim=1).argmax())
    return {
        "site": site,
        "channel": channel,
        "alpha": alpha,
        "steps": steps,
        "magnify": magnify,
        "ratios": list(ratios),
        "columns": list(columns),
        "images": [
            [[[round(float(v), 3) for v in px] for px in row] for row in img]
            for img in x.detach().cpu().permute(0, 2, 3, 1)
        ],
        "labels": [int(v) for v in y],
        "maps": {name: _show(t.detach().cpu(), channel) for name, t in columns.items()},
    }
