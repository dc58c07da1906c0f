"""torchvision and timm classification models by name, with their own module names kept.

The returned networks are the libraries' unmodified classes (no normalization yet;
:func:`advfeat.models.build_model` attaches it with a pre-hook), so feature sites are the
libraries' dotted names (``layer3``, ``features.4``, ``blocks.5``) and checkpoints stay compatible.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.convnext import CNBlockConfig

from advfeat.errors import AdvfeatError, unknown_name

__all__ = [
    "build_timm",
    "build_torchvision",
    "fixed_input_size",
    "replace_classifier",
    "timm_model_names",
    "torchvision_model_names",
    "use_cifar_stem",
]

TIMM_HINT = "timm models need the optional dependency timm: pip install advfeat[timm]"


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    return tuple(sorted(tv_models.list_models(module=tv_models)))


def torchvision_model_names() -> list[str]:
    """Every torchvision classification model (``torchvision.models.list_models``)."""
    return list(_torchvision_names())


def _import_timm() -> ModuleType:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise AdvfeatError(TIMM_HINT) from None


def timm_model_names() -> list[str]:
    """Every timm architecture name (``timm.list_models()``); needs timm."""
    return list(_import_timm().list_models())


def use_cifar_stem(model: nn.Module) -> nn.Module:
    """Give a torchvision ResNet a stem for small images: 3×3 stride-1 ``conv1``, no max-pool.

    The usual CIFAR adaptation of ImageNet ResNets (e.g. the ResNet-18 of ALFA and of most
    adversarial-training work): a 32×32 input keeps 32×32 maps in ``layer1`` instead of 8×8.
    The new ``conv1`` is Kaiming-initialized (fan-out), as torchvision does. Works in place.
    """
    if not isinstance(model, tv_models.ResNet):
        raise AdvfeatError(
            f"cifar_stem applies to torchvision ResNets (resnet*, resnext*, wide_resnet*), "
            f"not to {type(model).__name__}"
        )
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.conv1.to(device=old.weight.device, dtype=old.weight.dtype)
    model.maxpool = nn.Identity()
    return model


def replace_classifier(model: nn.Module, old_classes: int, num_classes: int) -> int:
    """Replace every output layer with ``old_classes`` outputs by a fresh one with ``num_classes``.

    Output layers are the ``nn.Linear`` (and, for SqueezeNet, 1×1 ``nn.Conv2d``) modules whose
    output size is the pretrained label count, auxiliary heads included. Returns how many were
    replaced; raises :class:`AdvfeatError` when there is none.
    """
    targets: list[tuple[str, nn.Linear | nn.Conv2d]] = [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) and module.out_features == old_classes)
        or (isinstance(module, nn.Conv2d) and module.out_channels == old_classes)
    ]
    if not targets:
        raise AdvfeatError(
            f"found no output layer with {old_classes} outputs in {type(model).__name__}; "
            f"replace its classifier yourself or use num_classes={old_classes}"
        )
    for name, module in targets:
        model.set_submodule(name, _fresh_output_layer(module, num_classes))
    return len(targets)


def _fresh_output_layer(layer: nn.Linear | nn.Conv2d, num_classes: int) -> nn.Module:
    new: nn.Module
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    else:
        new = nn.Conv2d(
            layer.in_channels,
            num_classes,
            layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            bias=layer.bias is not None,
        )
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


def build_torchvision(
    name: str,
    num_classes: int,
    *,
    image_size: int,
    pretrained: bool,
    cifar_stem: bool | None = None,
    **kw: Any,
) -> nn.Module:
    """A torchvision classification model ``name`` (without normalization).

    ``pretrained=True`` loads ``weights="DEFAULT"`` (downloaded on first use) and, when
    ``num_classes`` differs from the weights' label count, replaces the classifier (see
    :func:`replace_classifier`). ``cifar_stem`` (ResNet family only, see :func:`use_cifar_stem`)
    defaults to ``image_size <= 64`` for randomly initialized ResNets and to ``False`` with
    pretrained weights, whose stem it would discard. GoogLeNet and Inception-v3 are built without
    auxiliary heads (``aux_logits=False``) unless asked, so they return logits in train mode too;
    ViTs without pretrained weights are built for ``image_size``; ViTs and ConvNeXts without
    weights take shape options (:data:`VIT_SHAPE_OPTIONS`, :data:`CONVNEXT_SHAPE_OPTIONS`).
    Other options ``kw`` go to the model's constructor.
    """
    if name not in _torchvision_names():
        choices = [f"torchvision:{n}" for n in _torchvision_names()]
        raise unknown_name("torchvision model", f"torchvision:{name}", choices)
    if "weights" in kw:
        raise AdvfeatError("torchvision weights are chosen with pretrained=True, not weights=...")
    options = sorted(kw)
    if name in ("googlenet", "inception_v3"):
        kw.setdefault("aux_logits", False)
        if not pretrained:
            kw.setdefault("init_weights", True)  # today's default, without the FutureWarning
    if name.startswith("vit_") and not pretrained:
        kw.setdefault("image_size", image_size)
    weights_classes = _weights_label_count(name) if pretrained else None
    if weights_classes is None:
        kw["num_classes"] = num_classes
    is_convnext = name.startswith("convnext_")
    if is_convnext:
        _check_convnext_options(name, kw, pretrained=pretrained)
    try:
        if not pretrained and VIT_SHAPE_OPTIONS & set(kw) and name.startswith("vit_"):
            model = _reshaped_vit(name, kw)
        elif is_convnext and not pretrained:
            model = _reshaped_convnext(name, kw, image_size)
        else:
            model = tv_models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    except TypeError as err:
        raise AdvfeatError(
            f"torchvision model {name!r} rejected the options {options}: {err}"
        ) from None
    except AdvfeatError:
        raise
    except (ValueError, AssertionError) as err:
        raise AdvfeatError(f"torchvision model {name!r}: {err or 'invalid options'}") from None
    if weights_classes is not None and weights_classes != num_classes:
        replace_classifier(model, weights_classes, num_classes)
    if cifar_stem is None:
        cifar_stem = isinstance(model, tv_models.ResNet) and image_size <= 64 and not pretrained
    if cifar_stem:
        use_cifar_stem(model)
    return model


VIT_SHAPE_OPTIONS = frozenset({"patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim"})
"""Options that reshape a randomly initialized torchvision ViT (``vit_b_16`` with 2 layers)."""


def _reshaped_vit(name: str, kw: dict[str, Any]) -> nn.Module:
    """torchvision ViT ``name`` with some of :data:`VIT_SHAPE_OPTIONS` changed.

    torchvision's ``vit_*`` builders fix these five; the others keep the named model's values,
    read from a copy built on the meta device (no memory, no initialization).
    """
    with torch.device("meta"):
        stock = tv_models.get_model(name, image_size=kw.get("image_size", 224))
    if not isinstance(stock, tv_models.VisionTransformer):
        raise AdvfeatError(f"{sorted(VIT_SHAPE_OPTIONS)} apply to ViTs, not to {name!r}")
    first = stock.encoder.layers[0]
    shape = {
        "patch_size": stock.patch_size,
        "num_layers": len(stock.encoder.layers),
        "num_heads": first.num_heads,
        "hidden_dim": stock.hidden_dim,
        "mlp_dim": stock.mlp_dim,
    }
    return tv_models.VisionTransformer(**{**shape, **kw})


CONVNEXT_SHAPE_OPTIONS = frozenset({"patch_size", "depths", "dims"})
"""Options that reshape a randomly initialized torchvision ConvNeXt, named as timm names them.

``patch_size``: the stem's kernel and stride (4 in the paper; 1 or 2 keeps 32-px inputs from
shrinking to 1×1 in the last stage); ``depths``: blocks per stage; ``dims``: channels per stage.
They become torchvision's own ``block_setting`` (a ``CNBlockConfig`` per stage); the constructor's
``stochastic_depth_prob`` and ``layer_scale`` are accepted as they are.
"""

_CONVNEXT_OPTIONS = CONVNEXT_SHAPE_OPTIONS | {"stochastic_depth_prob", "layer_scale"}


def _check_convnext_options(name: str, kw: dict[str, Any], *, pretrained: bool) -> None:
    """Refuse what torchvision's ConvNeXt would silently ignore (it takes ``**kwargs``)."""
    unknown = sorted(set(kw) - _CONVNEXT_OPTIONS - {"num_classes", "block", "norm_layer"})
    if unknown:
        raise AdvfeatError(
            f"torchvision model {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(_CONVNEXT_OPTIONS))}"
        )
    shape = sorted(CONVNEXT_SHAPE_OPTIONS & set(kw))
    if pretrained and shape:
        raise AdvfeatError(
            f"{', '.join(shape)} reshape a ConvNeXt built without weights; the pretrained "
            f"{name!r} has its own shape (drop the option, or build without weights)"
        )


def _reshaped_convnext(name: str, kw: dict[str, Any], image_size: int) -> nn.Module:
    """torchvision ConvNeXt ``name`` without weights, with :data:`CONVNEXT_SHAPE_OPTIONS` applied.

    Unset options keep the named model's values (depths, widths and stochastic depth are read
    from a copy built on the meta device). The stem of another ``patch_size`` is a fresh
    ``Conv2d(3, dims[0], patch_size, stride=patch_size)`` initialized as torchvision does, so the
    module names (and the state_dict's keys) stay torchvision's.
    """
    patch_size = _positive_int(name, "patch_size", kw.pop("patch_size", 4))
    depths, dims = kw.pop("depths", None), kw.pop("dims", None)
    if depths is None and dims is None:
        model = tv_models.get_model(name, weights=None, **kw)
    else:
        with torch.device("meta"):
            stock = tv_models.get_model(name, weights=None)
        stages = list(stock.features[1::2])
        # the last block's rate is the model's (torchvision scales it linearly up to the last)
        kw.setdefault("stochastic_depth_prob", round(stages[-1][-1].stochastic_depth.p, 6))
        depths = _positive_ints(name, "depths", depths, [len(stage) for stage in stages])
        dims = _positive_ints(
            name, "dims", dims, [stage[0].block[0].in_channels for stage in stages]
        )
        if len(depths) != len(dims):
            raise AdvfeatError(
                f"torchvision model {name!r}: depths {depths} and dims {dims} must have one "
                f"value per stage, as many of each"
            )
        outputs: list[int | None] = [*dims[1:], None]
        setting = [
            CNBlockConfig(width, out, depth)
            for width, out, depth in zip(dims, outputs, depths, strict=True)
        ]
        model = tv_models.ConvNeXt(setting, **kw)
    smallest = patch_size * 2 ** (len(model.features[1::2]) - 1)
    if image_size < smallest:
        raise AdvfeatError(
            f"torchvision model {name!r} with patch_size {patch_size} and "
            f"{len(model.features[1::2])} stages needs images of at least {smallest} px, got "
            f"{image_size}; set model_options.patch_size smaller or use fewer stages"
        )
    if patch_size != 4:
        old = model.features[0][0]
        stem = nn.Conv2d(3, old.out_channels, patch_size, stride=patch_size)
        nn.init.trunc_normal_(stem.weight, std=0.02)
        nn.init.zeros_(stem.bias)  # type: ignore[arg-type]
        model.features[0][0] = stem
    return model


def _positive_int(name: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdvfeatError(
            f"torchvision model {name!r}: {option} must be a positive integer, got {value!r}"
        )
    return value


def _positive_ints(name: str, option: str, value: Any, default: list[int]) -> list[int]:
    if value is None:
        return default
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise AdvfeatError(
            f"torchvision model {name!r}: {option} must be a list of positive integers, one per "
            f"stage (e.g. [2, 2, 6, 2]), got {value!r}"
        )
    return [_positive_int(name, option, v) for v in value]


def _weights_label_count(name: str) -> int:
    weights = tv_models.get_model_weights(name).DEFAULT  # type: ignore[attr-defined]
    return len(weights.meta["categories"])


def build_timm(
    name: str, num_classes: int, *, pretrained: bool, image_size: int | None = None, **kw: Any
) -> nn.Module:
    """A timm model ``name`` (without normalization); timm itself resets the classifier.

    A model built for one input size (ViT, DeiT, Swin: a patch embedding of fixed size) is built
    for ``image_size`` unless ``img_size`` is among the options (timm resamples pretrained
    position embeddings to it).
    """
    if "cifar_stem" in kw:
        raise AdvfeatError("cifar_stem applies to torchvision ResNets only, not to timm models")
    timm = _import_timm()
    is_hub = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if not is_hub and not timm.is_model(name):
        raise unknown_name("timm model", f"timm:{name}", [f"timm:{n}" for n in timm.list_models()])
    try:
        if image_size is not None and "img_size" not in kw:
            fixed = _timm_input_size(timm, name, num_classes, kw)
            if fixed is not None and fixed != (image_size, image_size):
                kw["img_size"] = image_size
        model: nn.Module = timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, **kw
        )
    except TypeError as err:
        raise AdvfeatError(
            f"timm model {name!r} rejected the options {sorted(kw)}: {err}"
        ) from None
    return model


def _timm_input_size(
    timm: ModuleType, name: str, num_classes: int, kw: dict[str, Any]
) -> tuple[int, int] | None:
    """:func:`fixed_input_size` of timm model ``name``, built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            stock = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    except Exception:  # the real build reports what is wrong with the options
        return None
    return fixed_input_size(stock)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The ``(height, width)`` that a model's fixed-size patch embedding requires, if any.

    timm's patch embeddings refuse other sizes (``strict_img_size``); torchvision's ViT checks
    its ``image_size``. ``None`` for models that take any size (CNNs).
    """
    size = getattr(model, "image_size", None)
    if isinstance(model, tv_models.VisionTransformer) and isinstance(size, int):
        return (size, size)
    for module in model.modules():
        img_size = getattr(module, "img_size", None)
        if getattr(module, "strict_img_size", False) and isinstance(img_size, (tuple, list)):
            return (int(img_size[0]), int(img_size[1]))
    return None
