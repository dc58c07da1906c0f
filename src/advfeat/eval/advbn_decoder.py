"""AdvBN's decoder and its "-AdvBN" test sets (AdvBN §3 "Visualizing feature shifts", App. B).

The authors pair the first layers of a VGG-19 (the encoder) with the AdaIN decoder of Huang &
Belongie (2017), train the decoder to restore the input image from the encoder's features, put
an AdvBN module after the encoder (the rest of the classifier gives the loss), and decode the
adversarially re-normalised features: (a) to *see* what an AdvBN perturbation does in pixel
space, and (b) to build ImageNet-AdvBN, the whole validation set passed through this pipeline,
on which other models are then evaluated (App. B, Table 8, next to the reconstructed images
without perturbation).

Here the encoder is any model up to any feature site addressed by name (``layer1``,
``features.10``, ...): the *source* model's head, frozen, in eval mode (BN running statistics).
:class:`FeatureDecoder` mirrors AdaIN's decoder at a small scale — 3×3 convolutions with ReLU and
reflection padding, nearest-neighbour ×2 upsampling until the image size is reached, channels
halving at each upsampling — ending in a sigmoid, so decoded images lie in [0, 1] by
construction. It is trained with the pixel mean-squared error between decoded and input images
(AdaIN trains its decoder with perceptual losses for style transfer; for the identity mapping
the paper needs, the pixel loss is the direct objective), on the data at hand.

The perturbation is :class:`advfeat.attacks.BNStatsAttack` (AdvBN Eq. 1-2, Alg. 1) at the site,
with the source model's tail giving the cross-entropy; App. B uses 6 steps of 0.20 with
ε = 1.1 and batches of 32 (the multipliers are shared by a batch). With ε = 0 (or 0 steps) the
AdvBN image *is* the reconstruction, so the shift is controlled by ε alone; the results record
the mean absolute pixel change from the originals and from the reconstructions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from advfeat.attacks.base import attack_guard
from advfeat.attacks.feature import BNStatsAttack
from advfeat.errors import AdvfeatError
from advfeat.eval.accuracy import eval_mode
from advfeat.sites import SiteSplit

__all__ = [
    "FeatureDecoder",
    "advbn_images",
    "encode",
    "reconstruction_error",
    "train_decoder",
    "write_image_folder",
]


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect")


class FeatureDecoder(nn.Module):
    """Decode a (N, C, h, w) feature map to (N, 3, H, W) images in [0, 1] (AdaIN-style)."""

    def __init__(
        self, channels: int, feature_size: int, image_size: int, *, width: int | None = None
    ) -> None:
        super().__init__()
        if feature_size < 1 or image_size < feature_size:
            raise AdvfeatError(
                f"the decoder maps {feature_size}-px features to {image_size}-px images; the "
                "site must keep spatial size (a feature map no larger than the image)"
            )
        self.channels = channels
        self.feature_size = feature_size
        self.image_size = image_size
        ups = max(0, round(math.log2(image_size / feature_size)))
        c = width if width is not None else max(32, min(256, channels))
        layers: list[nn.Module] = [_conv(channels, c), nn.ReLU()]
        for _ in range(ups):
            nxt = max(16, c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(c, nxt), nn.ReLU()]
            layers += [_conv(nxt, nxt), nn.ReLU()]
            c = nxt
        layers += [_conv(c, c), nn.ReLU(), _conv(c, 3)]
        self.body = nn.Sequential(*layers)

    def forward(self, feature: Tensor) -> Tensor:
        out = self.body(feature)
        if out.shape[-1] != self.image_size or out.shape[-2] != self.image_size:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear")
        return torch.sigmoid(out)

    def config(self) -> dict[str, int]:
        return {
            "channels": self.channels,
            "feature_size": self.feature_size,
            "image_size": self.image_size,
        }


def encode(split: SiteSplit, x: Tensor, site: str) -> Tensor:
    """The site's feature map of ``x`` (no grad), checked to be (N, C, h, w)."""
    with torch.no_grad():
        f = split.head(x)
    if not isinstance(f, Tensor) or f.ndim != 4:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise AdvfeatError(
            f"feature site {site!r} must output a feature map (N, C, H, W), got {shape}"
        )
    return f.detach()


def _batches(
    dataset: Dataset, batch_size: int, device: torch.device, *, shuffle: bool, seed: int
) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g)
    for x, _ in loader:
        yield x.to(device)


def train_decoder(
    model: nn.Module,
    site: str,
    dataset: Dataset,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    width: int | None = None,
    progress: Any = None,
) -> tuple[FeatureDecoder, list[float]]:
    """Train a :class:`FeatureDecoder` to invert ``model`` up to ``site`` on ``dataset``.

    The encoder is frozen (eval mode, no weight changes, BN statistics untouched). Adam,
    pixel MSE. Returns the decoder (eval mode) and the mean training loss of each epoch.
    """
    dev = torch.device(device)
    split = SiteSplit(model, site)
    x0, _ = dataset[0]
    with attack_guard(model):
        f0 = encode(split, x0[None].to(dev), site)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = FeatureDecoder(f0.shape[1], f0.shape[-1], x0.shape[-1], width=width).to(dev)
        opt = torch.optim.Adam(decoder.parameters(), lr=lr)
        history: list[float] = []
        decoder.train()
        for epoch in range(epochs):
            total, n = 0.0, 0
            for x in _batches(dataset, batch_size, dev, shuffle=True, seed=seed + epoch):
                f = encode(split, x, site)
                loss = F.mse_loss(decoder(f), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * x.shape[0]
                n += x.shape[0]
            history.append(total / max(n, 1))
            if progress is not None:
                progress(epoch + 1, history[-1])
    return decoder.eval(), history


@torch.no_grad()
def reconstruction_error(
    model: nn.Module,
    site: str,
    decoder: FeatureDecoder,
    dataset: Dataset,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean squared and mean absolute pixel error of decode(encode(x)) against x (held-out)."""
    dev = torch.device(device)
    split = SiteSplit(model, site)
    se, ae, n = 0.0, 0.0, 0
    with attack_guard(model), eval_mode(decoder):
        for x in _batches(dataset, batch_size, dev, shuffle=False, seed=0):
            r = decoder(encode(split, x, site))
            se += float((r - x).pow(2).sum())
            ae += float((r - x).abs().sum())
            n += x.numel()
    return {
        "mse": se / max(n, 1),
        "mae": ae / max(n, 1),
        "psnr_db": 10 * math.log10(1 / max(se / max(n, 1), 1e-12)),
    }


def advbn_images(
    model: nn.Module,
    site: str,
    decoder: FeatureDecoder,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 1.1,
    alpha: float = 0.2,
    steps: int = 6,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(reconstructed, advbn)``: decode(encode(x)) and the decoded AdvBN features of the batch
    (:class:`BNStatsAttack` at ``site``, one pair of multipliers for the batch), in [0, 1]."""
    split = SiteSplit(model, site)
    with attack_guard(model):
        f = encode(split, x, site)
    attack = BNStatsAttack(model, site, eps=eps, alpha=alpha, steps=steps, seed=seed)
    f_adv = attack(x, y, feature=f)
    with torch.no_grad(), eval_mode(decoder):
        return decoder(f).detach(), decoder(f_adv).detach()


def write_image_folder(
    root: Path, images: Tensor, labels: Sequence[int], class_names: Sequence[str], start: int
) -> None:
    """Save ``images`` (N, 3, H, W in [0, 1]) as PNGs ``root/<class name>/<index>.png``."""
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    for i, (array, label) in enumerate(zip(arrays, labels, strict=True)):
        folder = root / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.numpy()).save(folder / f"{start + i:06d}.png")
