"""Wide ResNets of Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).

WRN-d-k: a 3×3 stem with 16 filters, three groups of ``n = (d − 4) / 6`` pre-activation blocks
B(3,3) with 16k, 32k and 64k filters (stride 2 from group 2 on), a final BN-ReLU, global
average pooling and a linear layer (Table 1). Dropout between the two convolutions of each block
(§2.4; the paper uses 0.3 on CIFAR where dropout is used) is the ``dropout`` option, 0 by default.
WRN-16-8 has 11.0M parameters, WRN-28-10 36.5M (Table 4).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.models.cifar_resnet import HALF, init_he_weights
from advfeat.models.normalize import ChannelStats, Normalize
from advfeat.models.preact_resnet import preact_stage
from advfeat.models.registry import register_model

__all__ = ["WideResNet", "wrn16_8", "wrn28_10", "wrn34_10"]


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32×32 images, taking images in [0, 1].

    Top-level children, called in this order: ``normalize, conv1, layer1, layer2, layer3, bn,
    relu, avgpool, flatten, fc``.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: ChannelStats = HALF,
        std: ChannelStats = HALF,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise AdvfeatError(f"WRN depth must be 6n+4 (16, 22, 28, 34, 40), got {depth}")
        if widen_factor < 1:
            raise AdvfeatError(f"WRN widen_factor must be a positive integer, got {widen_factor}")
        blocks = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.layer1 = preact_stage(16, widths[0], blocks, 1, dropout)
        self.layer2 = preact_stage(widths[0], widths[1], blocks, 2, dropout)
        self.layer3 = preact_stage(widths[1], widths[2], blocks, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_he_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.bn(x)
        x = self.relu(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.fc(x)


def _register_wrn(depth: int, width: int, summary: str) -> Callable[..., WideResNet]:
    """Register factory ``wrn{depth}_{width}`` (WRN-depth-width) and return it; its options are
    its signature."""

    def factory(
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: ChannelStats = HALF,
        std: ChannelStats = HALF,
        in_channels: int = 3,
    ) -> WideResNet:
        return WideResNet(
            depth, width, num_classes, dropout=dropout, mean=mean, std=std, in_channels=in_channels
        )

    factory.__name__ = factory.__qualname__ = f"wrn{depth}_{width}"
    factory.__doc__ = summary
    return register_model(factory)


wrn16_8 = _register_wrn(
    16, 8, "WRN-16-8 (11.0M parameters), AFA's backbone on SVHN and Tiny-ImageNet."
)
wrn28_10 = _register_wrn(28, 10, "WRN-28-10 (36.5M parameters), AFA's backbone on CIFAR-10.")
wrn34_10 = _register_wrn(
    34, 10, "WRN-34-10 (46.2M parameters), the backbone of PGD-AT (Madry et al.), TRADES and MART."
)
