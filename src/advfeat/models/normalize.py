"""Input normalization as a part of the model, so every model takes images in [0, 1].

Attacks, ε-balls and pixel bounds are defined on [0, 1] images; keeping ``(x − mean) / std``
inside the network (child ``normalize``) means nobody has to convert ε between spaces. The
buffers are not persistent by default, so a model's ``state_dict`` is exactly that of the plain
architecture (a torchvision checkpoint loads as is); exports make them persistent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError

__all__ = ["ChannelStats", "Normalize", "attach_normalize"]

ChannelStats = float | Sequence[float] | Tensor
"""One value for all channels, or one value per channel."""


def _channel_values(label: str, value: ChannelStats) -> list[float]:
    try:
        cpu = torch.as_tensor(value, dtype=torch.float64, device="cpu")
        values = [float(v) for v in cpu.reshape(-1).tolist()]
    except (TypeError, ValueError, RuntimeError):
        raise AdvfeatError(
            f"{label} must be a number or a sequence of numbers (one per channel), got {value!r}"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise AdvfeatError(f"{label} must hold finite numbers (one per channel), got {value!r}")
    return values


class Normalize(nn.Module):
    """Per-channel ``(x − mean) / std`` on images in [0, 1] (NCHW or CHW).

    ``mean`` and ``std`` are a number or one number per channel. The buffers are registered with
    ``persistent=False`` by default: they follow ``.to()`` / ``.half()`` but never appear in a
    state_dict, so a trained model's state_dict is that of the plain architecture.
    ``persistent=True`` (what :mod:`advfeat.export` uses) writes them as ``normalize.mean`` /
    ``normalize.std``, so exported weights carry their own preprocessing.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: ChannelStats, std: ChannelStats, *, persistent: bool = False) -> None:
        super().__init__()
        mean_v = _channel_values("mean", mean)
        std_v = _channel_values("std", std)
        if min(std_v) <= 0:
            raise AdvfeatError(f"std must be positive in every channel, got {std_v}")
        if len(mean_v) != len(std_v) and 1 not in (len(mean_v), len(std_v)):
            raise AdvfeatError(
                f"mean and std must have the same number of channels (or one value), "
                f"got {len(mean_v)} and {len(std_v)}"
            )
        self._repr = f"mean={tuple(mean_v)}, std={tuple(std_v)}"
        # Created on the default device, so ``with torch.device(...)`` construction works.
        self.register_buffer("mean", torch.tensor(mean_v).view(-1, 1, 1), persistent=persistent)
        self.register_buffer("std", torch.tensor(std_v).view(-1, 1, 1), persistent=persistent)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return self._repr


def _normalize_first_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of :func:`attach_normalize` (module-level, so deepcopy and pickle work)."""
    if not args:
        raise AdvfeatError(
            f"{type(module).__name__} normalizes its first positional input; pass the image "
            f"batch positionally (model(x)), not as a keyword"
        )
    normalize = module.get_submodule("normalize")
    return (normalize(args[0]), *args[1:])


def attach_normalize(model: nn.Module, mean: ChannelStats, std: ChannelStats) -> nn.Module:
    """Make ``model`` take [0, 1] images without renaming any of its submodules.

    Adds a child ``normalize`` (:class:`Normalize`, placed first among the children) and a forward
    pre-hook that replaces the first positional input ``x`` by ``model.normalize(x)``. Feature
    sites keep the model's own names (``layer3``, ``features.4``) and its state_dict is unchanged.
    The hook reads ``model.normalize`` at every call, so copies and replacements behave.

    Only ``model(x)`` normalizes: calling ``model.forward(x)`` directly, or a ``torch.fx`` trace of
    the model (which traces ``forward``), skips the hook. An ``nn.Sequential`` gets no hook: being
    its first child, ``normalize`` runs as the first step of the chain (names are kept, integer
    indices shift by one). A model whose own ``forward`` iterates over all its children would run
    ``normalize`` twice; give such a model a ``normalize`` child yourself. Works in place and
    returns ``model``.
    """
    if hasattr(model, "normalize"):
        raise AdvfeatError(
            f"{type(model).__name__} already has an attribute 'normalize'; normalization is "
            f"attached once (change model.normalize to use other statistics)"
        )
    normalize = Normalize(mean, std)
    reference = next(model.parameters(), None)
    if reference is not None:
        normalize = normalize.to(device=reference.device)
    children = dict(model._modules)
    model._modules.clear()
    model._modules["normalize"] = normalize
    model._modules.update(children)
    if not isinstance(model, nn.Sequential):
        model.register_forward_pre_hook(_normalize_first_input, prepend=True)
    return model
