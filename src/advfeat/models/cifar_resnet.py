"""CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), §4.2.

A 3×3 convolution with 16 filters, then three stages of ``n`` basic blocks with 16, 32 and 64
filters on 32×32, 16×16 and 8×8 maps (stride 2 in the first block of stages 2 and 3), global
average pooling and a fully connected layer: ``6n + 2`` weighted layers (ResNet-20/32/44/56/110
for n = 3/5/7/9/18). Parameter counts match the paper's Table 6 (0.27M … 1.7M).

Shortcuts: option A (the paper's CIFAR choice, the default) is the identity, subsampled with
stride 2 and zero-padded with the extra channels where the shape changes, so it adds no
parameters. The paper does not say where the zeros go; here the new channels are appended after
the existing ones. Option B uses 1×1 projections (convolution + BN) where the shape changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.models.normalize import ChannelStats, Normalize
from advfeat.models.registry import register_model

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PaddedIdentity",
    "init_he_weights",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

Shortcut = Literal["A", "B"]
HALF = (0.5, 0.5, 0.5)


def init_he_weights(model: nn.Module) -> None:
    """Initialization of He et al. 2015/2016 (and Zagoruyko & Komodakis 2016).

    Convolutions: Kaiming normal, ``std = sqrt(2 / (k·k·out_channels))`` (fan-out, as in the
    authors' released code); batch norm: weight 1, bias 0; linear: PyTorch's default weights,
    bias 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class PaddedIdentity(nn.Module):
    """Option A shortcut: ``x[:, :, ::stride, ::stride]`` followed by zero channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus shortcut, ReLU after the addition (He et al. 2016, Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: Shortcut) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PaddedIdentity(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, §4.2), taking images in [0, 1].

    Top-level children, called in this order: ``normalize, conv1, bn1, relu, layer1, layer2,
    layer3, avgpool, flatten, fc``; ``layer3`` is the last residual stage (ALFA's "last block").
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        mean: ChannelStats = HALF,
        std: ChannelStats = HALF,
        shortcut: Shortcut = "A",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise AdvfeatError(
                f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}"
            )
        option = _shortcut_option(shortcut)
        blocks = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _stage(16, 16, blocks, 1, option)
        self.layer2 = _stage(16, 32, blocks, 2, option)
        self.layer3 = _stage(32, 64, blocks, 2, option)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        init_he_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.fc(x)


def _shortcut_option(value: object) -> Shortcut:
    option = str(value).upper()
    if option == "A":
        return "A"
    if option == "B":
        return "B"
    raise AdvfeatError(f"shortcut must be 'A' (zero-padding) or 'B' (projection), got {value!r}")


def _stage(
    in_planes: int, planes: int, blocks: int, stride: int, shortcut: Shortcut
) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride, shortcut)]
    layers += [BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _register_resnet(depth: int, summary: str) -> Callable[..., CifarResNet]:
    """Register factory ``resnet{depth}`` (:class:`CifarResNet` of that depth) and return it;
    its options are its signature."""

    def factory(
        num_classes: int = 10,
        *,
        mean: ChannelStats = HALF,
        std: ChannelStats = HALF,
        shortcut: Shortcut = "A",
        in_channels: int = 3,
    ) -> CifarResNet:
        return CifarResNet(
            depth, num_classes, mean=mean, std=std, shortcut=shortcut, in_channels=in_channels
        )

    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = summary
    return register_model(factory)


resnet20 = _register_resnet(20, "ResNet-20 (n = 3, 0.27M parameters), He et al. 2016 Table 6.")
resnet32 = _register_resnet(32, "ResNet-32 (n = 5, 0.46M parameters), He et al. 2016 Table 6.")
resnet44 = _register_resnet(44, "ResNet-44 (n = 7, 0.66M parameters), He et al. 2016 Table 6.")
resnet56 = _register_resnet(56, "ResNet-56 (n = 9, 0.85M parameters), He et al. 2016 Table 6.")
resnet110 = _register_resnet(110, "ResNet-110 (n = 18, 1.7M parameters), He et al. 2016 Table 6.")
