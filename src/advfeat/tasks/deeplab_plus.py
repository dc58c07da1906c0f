"""DeepLabV3+ (Chen et al., ECCV 2018) on torchvision backbones, and a tiny backbone for tests.

DeepLabV3+ = DeepLabV3's ASPP on the last backbone stage (output stride 16 or 8, dilated
convolutions), plus a decoder that upsamples the ASPP output to the low-level feature (stride 4,
``layer1``), concatenates a 48-channel projection of it and refines with two 3×3 convolutions.
A-FAN perturbs "the last layer of backbone and the decoder networks of DeepLab V3+" (§6):
the sites are ``backbone.layer4`` and ``decoder`` (also ``aspp``). Each named part is a plain
submodule, so feature sites address it by name and the model's ``forward`` is never edited.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP

__all__ = ["DeepLabV3Plus", "TinyResNetBody", "conv_bn_relu"]


def conv_bn_relu(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → ReLU."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyResNetBody(nn.Module):
    """A small four-stage CNN with ResNet's child names (``stem``, ``layer1`` … ``layer4``).

    For tests and CPU demos only (a few thousand parameters): same site names as a torchvision
    ResNet body, so the same A-FAN configuration runs on it and on ResNet-50. ``strides`` and
    ``dilations`` give each stage's stride/dilation (the stem has stride 2).
    """

    def __init__(
        self,
        widths: Sequence[int] = (8, 16, 24, 32),
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0], stride=2)
        c_in = widths[0]
        for i, (w, s, d) in enumerate(zip(widths, strides, dilations, strict=True), start=1):
            stage = nn.Sequential(
                conv_bn_relu(c_in, w, stride=s, dilation=d), conv_bn_relu(w, w, dilation=d)
            )
            self.add_module(f"layer{i}", stage)
            c_in = w
        self.widths = tuple(widths)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = self.get_submodule(name)(x)
        return x


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ head on a backbone body with children ``layer1`` (low level) and ``layer4``.

    ``forward(x)`` returns ``OrderedDict(out=logits)`` at the input resolution, like torchvision's
    segmentation models. Children: ``backbone`` (an ``IntermediateLayerGetter``), ``aspp``,
    ``low_proj`` (1×1 conv to ``low_channels_out``), ``decoder`` (two 3×3 conv-BN-ReLU),
    ``classifier`` (1×1 conv).
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        atrous_rates: Sequence[int] = (6, 12, 18),
        aspp_channels: int = 256,
        low_channels_out: int = 48,
        low_layer: str = "layer1",
        high_layer: str = "layer4",
    ) -> None:
        super().__init__()
        self.backbone = IntermediateLayerGetter(
            body, return_layers={low_layer: "low", high_layer: "out"}
        )
        self.aspp = ASPP(high_channels, list(atrous_rates), out_channels=aspp_channels)
        self.low_proj = conv_bn_relu(low_channels, low_channels_out, kernel=1)
        self.decoder = nn.Sequential(
            conv_bn_relu(aspp_channels + low_channels_out, aspp_channels),
            conv_bn_relu(aspp_channels, aspp_channels),
        )
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        low = self.low_proj(feats["low"])
        high = F.interpolate(
            self.aspp(feats["out"]), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        logits = self.classifier(self.decoder(torch.cat([high, low], dim=1)))
        return OrderedDict(
            out=F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        )
