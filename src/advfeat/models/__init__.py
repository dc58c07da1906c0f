"""Models by name; every model takes images in [0, 1] and normalizes inside (child ``normalize``).

Names:

- our own CIFAR architectures, registered in :data:`MODELS`: ``resnet20/32/44/56/110``
  (He et al. 2016), ``preact_resnet18`` (He et al. 2016b), ``wrn16_8``, ``wrn28_10``,
  ``wrn34_10`` (Zagoruyko & Komodakis 2016). Their forward is a plain chain of their top-level
  children, so ``torch.fx`` traces them and they split after any top-level child;
- any torchvision classification model: ``torchvision:resnet18``, or the bare torchvision name
  when it is not one of ours (``resnet18``, ``efficientnet_b0``);
- any timm model when timm is installed: ``timm:efficientnet_b0``.

Feature sites are plain dotted module names: ``layer3`` (ours, torchvision ResNets),
``features.4`` (torchvision EfficientNet), ``blocks.5`` (timm EfficientNet).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.models.cifar_resnet import CifarResNet
from advfeat.models.external import (
    build_timm,
    build_torchvision,
    timm_model_names,
    torchvision_model_names,
)
from advfeat.models.normalize import ChannelStats, Normalize, attach_normalize
from advfeat.models.preact_resnet import PreActResNet
from advfeat.models.registry import MODELS, ModelFactory, register_model
from advfeat.models.wide_resnet import WideResNet
from advfeat.registry import import_submodules

__all__ = [
    "MODELS",
    "ChannelStats",
    "CifarResNet",
    "ModelFactory",
    "Normalize",
    "PreActResNet",
    "WideResNet",
    "attach_normalize",
    "build_model",
    "model_names",
    "register_model",
]

import_submodules(__name__, __path__, skip=("registry",))

SOURCES = ("torchvision", "timm")
HALF = (0.5, 0.5, 0.5)


def model_names(*, include_timm: bool = False) -> list[str]:
    """Our own model names, then ``torchvision:NAME`` for every torchvision classification model.

    timm models (``timm:NAME``, over a thousand of them) are accepted by :func:`build_model`
    whenever timm is installed; they are listed only with ``include_timm=True``.
    """
    names = MODELS.names() + [f"torchvision:{n}" for n in torchvision_model_names()]
    if include_timm:
        names += [f"timm:{n}" for n in timm_model_names()]
    return names


def build_model(
    name: str,
    num_classes: int = 10,
    *,
    mean: ChannelStats = HALF,
    std: ChannelStats = HALF,
    image_size: int = 32,
    pretrained: bool = False,
    **kw: Any,
) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes, taking images in [0, 1].

    Normalization with ``mean``/``std`` is part of the model (child ``normalize``, not in the
    state_dict). Our own models have it as their first layer; torchvision and timm models get it
    from :func:`attach_normalize` (a forward pre-hook), which keeps their module names.
    ``image_size`` picks defaults for external models (torchvision ResNets get ``cifar_stem``
    when it is at most 64 and the model is not pretrained). ``pretrained=True`` downloads the
    default weights of a torchvision/timm model (only then) and replaces the classifier when
    ``num_classes`` differs. Other keyword options go to the architecture (``shortcut="B"`` for
    CIFAR ResNets, ``dropout`` for WRNs, ``cifar_stem`` for torchvision ResNets, ...).
    """
    if not isinstance(name, str) or not name:
        raise AdvfeatError(f"model name must be a non-empty string, got {name!r}")
    _check_int("num_classes", num_classes)
    _check_int("image_size", image_size)
    source, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if source and source not in SOURCES:
        raise AdvfeatError(
            f"unknown model source {source!r} in {name!r}; use a name of ours or "
            f"'torchvision:NAME' / 'timm:NAME'"
        )
    model: nn.Module
    if source == "timm":
        model = build_timm(bare, num_classes, pretrained=pretrained, image_size=image_size, **kw)
    elif source == "torchvision" or (
        not source and bare not in MODELS and bare in torchvision_model_names()
    ):
        model = build_torchvision(
            bare, num_classes, image_size=image_size, pretrained=pretrained, **kw
        )
    elif bare in MODELS:
        model = _build_own(bare, num_classes, mean=mean, std=std, pretrained=pretrained, **kw)
    else:
        err = unknown_name("model", name, MODELS.names() + torchvision_model_names())
        raise AdvfeatError(f"{err}; timm models are 'timm:NAME'") from None
    if not hasattr(model, "normalize"):
        attach_normalize(model, mean, std)
    return model


def _build_own(
    name: str,
    num_classes: int,
    *,
    mean: ChannelStats,
    std: ChannelStats,
    pretrained: bool,
    **kw: Any,
) -> nn.Module:
    if pretrained:
        raise AdvfeatError(
            f"advfeat ships no pretrained weights for {name!r}; load a checkpoint instead, or use "
            f"a torchvision/timm model with pretrained=True"
        )
    factory = MODELS.get(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = sorted(set(params) - {"num_classes", "mean", "std"})
        unknown = sorted(set(kw) - set(accepted))
        if unknown:
            raise AdvfeatError(
                f"model {name!r} does not accept option(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
    return factory(num_classes, mean=mean, std=std, **kw)


def _check_int(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdvfeatError(f"{label} must be a positive integer, got {value!r}")
