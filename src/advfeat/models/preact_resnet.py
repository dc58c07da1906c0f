"""Pre-activation ResNet-18 of He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016).

The CIFAR variant used throughout the adversarial-training literature (PGD-AT, TRADES, MART,
AFA): a 3×3 stride-1 stem with 64 filters, four stages of two pre-activation basic blocks with
64/128/256/512 filters (stride 2 from stage 2 on), a final BN-ReLU, global average pooling and a
linear layer (11.2M parameters). Where a block changes shape, its 1×1 projection shortcut takes the
block's pre-activated input (full pre-activation units, Fig. 4(e)); unlike the paper's ImageNet
models, the stem has no separate BN-ReLU (the first block's pre-activation plays that role).
"""

from __future__ import annotations

from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.models.cifar_resnet import HALF, init_he_weights
from advfeat.models.normalize import ChannelStats, Normalize
from advfeat.models.registry import register_model

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet18"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3 twice plus shortcut (He et al. 2016b, Fig. 4(e)).

    ``dropout`` (Zagoruyko & Komodakis 2016, §2.4) sits between the two convolutions, after the
    second ReLU; 0 disables it. A projection shortcut (1×1 conv) is used when the stride or the
    width changes and then reads the pre-activated input; otherwise the shortcut is the identity.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout < 1
        ):
            raise AdvfeatError(f"dropout must be in [0, 1), got {dropout!r}")
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.has_projection = stride != 1 or in_planes != planes
        if self.has_projection:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        residual = self.shortcut(pre) if self.has_projection else x
        out = self.conv1(pre)
        out = self.dropout(self.relu2(self.bn2(out)))
        return self.conv2(out) + residual


def preact_stage(
    in_planes: int, planes: int, blocks: int, stride: int, dropout: float = 0.0
) -> nn.Sequential:
    """``blocks`` pre-activation blocks, the first with ``stride`` (and the width change)."""
    layers = [PreActBlock(in_planes, planes, stride, dropout)]
    layers += [PreActBlock(planes, planes, 1, dropout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class PreActResNet(nn.Module):
    """Four-stage pre-activation ResNet for 32×32 images, taking images in [0, 1].

    Top-level children, called in this order: ``normalize, conv1, layer1, layer2, layer3, layer4,
    bn, relu, avgpool, flatten, fc``.
    """

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        *,
        mean: ChannelStats = HALF,
        std: ChannelStats = HALF,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = preact_stage(64, 64, blocks[0], 1)
        self.layer2 = preact_stage(64, 128, blocks[1], 2)
        self.layer3 = preact_stage(128, 256, blocks[2], 2)
        self.layer4 = preact_stage(256, 512, blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(512, num_classes)
        init_he_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn(x)
        x = self.relu(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.fc(x)


@register_model
def preact_resnet18(
    num_classes: int = 10,
    *,
    mean: ChannelStats = HALF,
    std: ChannelStats = HALF,
    in_channels: int = 3,
) -> PreActResNet:
    """PreAct ResNet-18 for CIFAR (11.2M parameters), He et al. 2016b."""
    return PreActResNet((2, 2, 2, 2), num_classes, mean=mean, std=std, in_channels=in_channels)
