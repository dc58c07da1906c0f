"""Detectors and segmenters by name: torchvision Faster R-CNN, DeepLabV3 and our DeepLabV3+.

Every model takes images in ``[0, 1]``. Faster R-CNN normalises inside its own
``GeneralizedRCNNTransform`` (``image_mean``/``image_std`` set from the dataset); segmenters get
advfeat's ``normalize`` child (:func:`advfeat.models.attach_normalize`).

Weights. Nothing downloads unless asked: ``pretrained=True`` uses torchvision's default weights
(downloaded on first use); ``weights=PATH`` loads a full state dict from disk and
``backbone_weights=PATH`` an ImageNet classification state dict into the backbone (its ``fc`` is
ignored). When any pretrained weights are used the ResNet backbone's batch norms are
``FrozenBatchNorm2d`` and only the last three stages train, as torchvision builds its detectors
(``trainable_layers``); from scratch they are ordinary ``BatchNorm2d`` and everything trains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import detection as tv_det
from torchvision.models import resnet as tv_resnet
from torchvision.models import segmentation as tv_seg
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from advfeat.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from advfeat.errors import AdvfeatError
from advfeat.models.normalize import ChannelStats, attach_normalize
from advfeat.registry import Registry
from advfeat.tasks.deeplab_plus import DeepLabV3Plus, TinyResNetBody

__all__ = [
    "DETECTORS",
    "SEGMENTERS",
    "DenseBuild",
    "build_detector",
    "build_segmenter",
    "load_state_file",
    "register_dense",
]


@dataclass(frozen=True)
class DenseBuild:
    """What a detector / segmenter family's builder receives from :func:`build_detector` /
    :func:`build_segmenter` (``options`` go to the torchvision constructor)."""

    name: str
    num_classes: int
    options: dict[str, Any]
    pretrained: bool = False
    backbone_weights: str | Path | None = None
    image_size: int | None = None
    has_weights: bool = False
    """A whole-model ``weights`` file will be loaded after building."""
    output_stride: int = 16
    aux_loss: bool = False


DenseBuilder = Callable[[DenseBuild], nn.Module]

DETECTORS: Registry[DenseBuilder] = Registry("detector")
"""Faster R-CNN detectors by name (``fasterrcnn_tiny`` is advfeat's small CPU model)."""
SEGMENTERS: Registry[DenseBuilder] = Registry("segmenter")
"""DeepLabV3 (torchvision) and DeepLabV3+ segmenters by name."""


def register_dense(
    registry: Registry[DenseBuilder], *names: str
) -> Callable[[DenseBuilder], DenseBuilder]:
    """Function decorator: register one builder under each of ``names`` in ``registry``."""

    def deco(builder: DenseBuilder) -> DenseBuilder:
        for name in names:
            registry.add(name, builder)
        return builder

    return deco


def load_state_file(path: str | Path) -> dict[str, Any]:
    """A state dict from disk (``weights_only=True``); a checkpoint's ``"model"`` entry is used."""
    file = Path(path)
    if not file.is_file():
        raise AdvfeatError(f"weights file {str(file)!r} does not exist")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise AdvfeatError(f"{str(file)!r} does not hold a state dict")
    return state


def _load_into(module: nn.Module, path: str | Path, *, ignore: Sequence[str] = ()) -> None:
    state = {k: v for k, v in load_state_file(path).items() if not k.startswith(tuple(ignore))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise AdvfeatError(
            f"weights {str(path)!r} do not fit {type(module).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise AdvfeatError(
            f"num_classes counts the background and must be an integer >= 2, got {num_classes!r}"
        )


def _tiny_anchors(image_size: int, levels: int) -> AnchorGenerator:
    base = max(image_size // 8, 4)
    sizes = tuple((base * 2**i,) for i in range(levels))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)


def _fasterrcnn_tiny(num_classes: int, image_size: int, **kw: Any) -> tv_det.FasterRCNN:
    body = TinyResNetBody(widths=(8, 16, 24, 32), strides=(1, 2, 2, 2))
    layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    backbone = BackboneWithFPN(body, layers, list(body.widths), out_channels=32)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    opts: dict[str, Any] = {
        "rpn_anchor_generator": _tiny_anchors(image_size, 5),
        "box_roi_pool": pooler,
        "box_head": TwoMLPHead(32 * 7 * 7, 64),
        "box_predictor": FastRCNNPredictor(64, num_classes),
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 200,
        "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 64,
        "box_detections_per_img": 20,
    }
    opts.update(kw)
    return tv_det.FasterRCNN(backbone, num_classes=None, **opts)


def build_detector(
    name: str,
    num_classes: int,
    *,
    image_size: int | None = None,
    mean: ChannelStats = IMAGENET_MEAN,
    std: ChannelStats = IMAGENET_STD,
    pretrained: bool = False,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    **kw: Any,
) -> nn.Module:
    """Faster R-CNN ``name`` (see :data:`DETECTORS`) for ``num_classes`` classes (background
    included), taking a list of ``[0, 1]`` images.

    ``image_size`` sets ``min_size = max_size`` of torchvision's resize (no resize for square
    images of that size) and, below 256 px, anchors scaled to the image; other keyword options go
    to ``torchvision.models.detection.FasterRCNN`` (e.g. ``min_size``, ``box_batch_size_per_image``).
    """
    _check_classes(num_classes)
    builder = DETECTORS.get(name)
    mean_l = [float(v) for v in torch.as_tensor(mean).reshape(-1).tolist()]
    std_l = [float(v) for v in torch.as_tensor(std).reshape(-1).tolist()]
    kw = {"image_mean": mean_l, "image_std": std_l, **kw}
    if image_size is not None:
        kw.setdefault("min_size", image_size)
        kw.setdefault("max_size", image_size)
    spec = DenseBuild(
        name, num_classes, kw, pretrained=pretrained, backbone_weights=backbone_weights,
        image_size=image_size, has_weights=weights is not None,
    )  # fmt: skip
    model = builder(spec)
    if weights is not None:
        _load_into(model, weights)
    return model


@register_dense(DETECTORS, "fasterrcnn_tiny")
def _tiny_detector(spec: DenseBuild) -> nn.Module:
    if spec.pretrained or spec.backbone_weights is not None:
        raise AdvfeatError("fasterrcnn_tiny has no pretrained weights; use weights=PATH of a run")
    return _fasterrcnn_tiny(spec.num_classes, spec.image_size or 64, **spec.options)


@register_dense(DETECTORS, "fasterrcnn_mobilenet_v3_large_fpn")
def _mobilenet_detector(spec: DenseBuild) -> nn.Module:
    if spec.backbone_weights is not None:
        raise AdvfeatError("backbone_weights applies to the ResNet detectors")
    model = tv_det.fasterrcnn_mobilenet_v3_large_fpn(
        weights="DEFAULT" if spec.pretrained else None, weights_backbone=None,
        num_classes=None if spec.pretrained else spec.num_classes, **spec.options,
    )  # fmt: skip
    if spec.pretrained:
        _replace_predictor(model, spec.num_classes)
    return model


@register_dense(
    DETECTORS, "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet101_fpn", "fasterrcnn_resnet18_fpn"
)
def _resnet_detector(spec: DenseBuild) -> nn.Module:
    kw = dict(spec.options)
    if spec.name == "fasterrcnn_resnet50_fpn" and spec.pretrained:
        model = tv_det.fasterrcnn_resnet50_fpn(weights="DEFAULT", **kw)
        _replace_predictor(model, spec.num_classes)
        return model
    if spec.pretrained:
        raise AdvfeatError(
            f"torchvision has no detection weights for {spec.name!r}; use backbone_weights=PATH"
        )
    arch = spec.name.removeprefix("fasterrcnn_").removesuffix("_fpn")
    trained = spec.backbone_weights is not None or spec.has_weights  # frozen BN, early layers
    backbone = resnet_fpn_backbone(
        backbone_name=arch, weights=None,
        norm_layer=FrozenBatchNorm2d if trained else nn.BatchNorm2d,
        trainable_layers=3 if trained else 5,
    )  # fmt: skip
    if spec.backbone_weights is not None:
        _load_into(backbone.body, spec.backbone_weights, ignore=("fc.",))
    if spec.image_size is not None and spec.image_size < 256:
        kw.setdefault("rpn_anchor_generator", _tiny_anchors(spec.image_size, 5))
    return tv_det.FasterRCNN(backbone, num_classes=spec.num_classes, **kw)


def _replace_predictor(model: nn.Module, num_classes: int) -> None:
    roi_heads: Any = model.roi_heads
    roi_heads.box_predictor = FastRCNNPredictor(
        roi_heads.box_predictor.cls_score.in_features, num_classes
    )


def _resnet_body(arch: str, output_stride: int) -> nn.Module:
    dilation = {16: [False, False, True], 8: [False, True, True]}
    if output_stride not in dilation:
        raise AdvfeatError(f"output_stride must be 8 or 16, got {output_stride!r}")
    factory: Callable[..., nn.Module] = getattr(tv_resnet, arch)
    return factory(weights=None, replace_stride_with_dilation=dilation[output_stride])


def build_segmenter(
    name: str,
    num_classes: int,
    *,
    mean: ChannelStats = IMAGENET_MEAN,
    std: ChannelStats = IMAGENET_STD,
    pretrained: bool = False,
    weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
    output_stride: int = 16,
    aux_loss: bool = False,
    **kw: Any,
) -> nn.Module:
    """Segmenter ``name`` (see :data:`SEGMENTERS`); ``model(x)["out"]`` are ``[N, C, H, W]`` logits.

    DeepLabV3 is torchvision's (output stride 8); DeepLabV3+ (:class:`DeepLabV3Plus`) uses a
    dilated ResNet at ``output_stride`` 16 (ASPP rates 6, 12, 18) or 8 (12, 24, 36).
    """
    _check_classes(num_classes)
    builder = SEGMENTERS.get(name)
    spec = DenseBuild(
        name, num_classes, dict(kw), pretrained=pretrained, backbone_weights=backbone_weights,
        has_weights=weights is not None, output_stride=output_stride, aux_loss=aux_loss,
    )  # fmt: skip
    model = builder(spec)
    if weights is not None:
        _load_into(model, weights)
    return attach_normalize(model, mean, std)


@register_dense(SEGMENTERS, "deeplabv3plus_tiny")
def _tiny_deeplab_plus(spec: DenseBuild) -> nn.Module:
    if spec.pretrained:
        raise AdvfeatError("DeepLabV3+ has no torchvision weights; use backbone_weights=PATH")
    body = TinyResNetBody(widths=(8, 16, 24, 32), strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
    return DeepLabV3Plus(
        body, low_channels=8, high_channels=32, num_classes=spec.num_classes,
        atrous_rates=(2, 4, 6), aspp_channels=32, low_channels_out=8, **spec.options,
    )  # fmt: skip


@register_dense(SEGMENTERS, "deeplabv3plus_resnet50", "deeplabv3plus_resnet101")
def _resnet_deeplab_plus(spec: DenseBuild) -> nn.Module:
    if spec.pretrained:
        raise AdvfeatError("DeepLabV3+ has no torchvision weights; use backbone_weights=PATH")
    rates = (6, 12, 18) if spec.output_stride == 16 else (12, 24, 36)
    body = _resnet_body(spec.name.removeprefix("deeplabv3plus_"), spec.output_stride)
    if spec.backbone_weights is not None:
        _load_into(body, spec.backbone_weights)
    return DeepLabV3Plus(
        body, low_channels=256, high_channels=2048, num_classes=spec.num_classes,
        atrous_rates=rates, **spec.options,
    )  # fmt: skip


@register_dense(
    SEGMENTERS, "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"
)
def _torchvision_deeplab(spec: DenseBuild) -> nn.Module:
    factory: Callable[..., nn.Module] = getattr(tv_seg, spec.name)
    model = factory(
        weights="DEFAULT" if spec.pretrained else None, weights_backbone=None,
        num_classes=None if spec.pretrained else spec.num_classes,
        aux_loss=spec.aux_loss or None, **spec.options,
    )  # fmt: skip
    if spec.backbone_weights is not None:
        _load_into(model.backbone, spec.backbone_weights, ignore=("fc.",))  # type: ignore[arg-type]
    if spec.pretrained:
        head: Any = model.classifier
        head[-1] = nn.Conv2d(head[-1].in_channels, spec.num_classes, 1)
    return model
