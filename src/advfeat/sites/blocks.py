"""Stages and blocks of a model: the default feature sites of ALFA, L-ALFA and A-FAN.

Both papers perturb "the last block" by default (ALFA §4.3, A-FAN §7) and L-ALFA one site per
block (ALFA Table 9, "after each skip connection"). What a stage and a block are is read from
the model's structure, never from a hand-kept list of architectures:

* **Batch-norm CNNs** (CIFAR ResNets, WRNs, torchvision ResNets, EfficientNets): a stage is a
  top-level child that contains a convolution (``layer3``, ``features``, ``blocks``); its
  blocks are its children that contain one (``layer3.0`` … ``layer3.2``).
* **Models whose blocks have no batch norm** (ViT, DeiT, Swin, ConvNeXt, MLP-Mixer; any model
  with LayerNorm, GroupNorm or RMSNorm blocks): the blocks are the children of the innermost
  *block stacks*, ``nn.Sequential`` / ``nn.ModuleList`` containers whose children are all of one
  class and hold a convolution or a linear layer (timm ``blocks.0`` … ``blocks.11``, torchvision
  ``encoder.layers.encoder_layer_0`` …, timm ConvNeXt ``stages.3.blocks.0``, torchvision
  ConvNeXt ``features.7.0``). A stack is a stage, named after the module that holds it when that
  module is itself one of a stack of stages (timm ConvNeXt and Swin ``stages.3`` /
  ``layers.3``). The default site is the last stage (``stages.3``, ``features.7``); a model with
  a single stack (a ViT) has one stage, and its default site is the last block (``blocks.11``,
  ``encoder.layers.encoder_layer_11``): the same feature, named as the papers name it.

A model decides the rule with the blocks it has, so batch-norm CNNs keep the sites they always
had.

A model may also declare its sites, a ``feature_sites`` list of dotted module names in execution
order (as it declares ``feature_layouts``, :mod:`advfeat.layouts`)::

    model.feature_sites = ["blocks.3", "blocks.7", "blocks.11"]

Its last declared site is then the default site (:func:`last_stage`) and all of them are the
blocks (:func:`stage_blocks`) and L-ALFA's default sites (:func:`spread_blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd

from advfeat.errors import AdvfeatError
from advfeat.norm.stats import is_batchnorm_like
from advfeat.sites.addressing import resolve_site, unwrap_model
from advfeat.sites.tracing import site_order

__all__ = [
    "block_stacks",
    "declared_sites",
    "first_stage",
    "last_stage",
    "spread_blocks",
    "stage_blocks",
    "stages",
]

_STACK_TYPES = (nn.Sequential, nn.ModuleList)


def declared_sites(model: nn.Module) -> list[str] | None:
    """The sites ``model`` declares (its ``feature_sites`` list, see the module doc), or ``None``.

    Names are relative to the unwrapped model and must name its submodules.
    """
    inner = unwrap_model(model)
    declared = getattr(inner, "feature_sites", None)
    if declared is None:
        return None
    if (
        isinstance(declared, str)
        or not isinstance(declared, Sequence)
        or not declared
        or not all(isinstance(s, str) for s in declared)
    ):
        raise AdvfeatError(
            f"{type(inner).__name__}.feature_sites must be a non-empty list of dotted module "
            f"names (e.g. ['layer3']), got {declared!r}"
        )
    for name in declared:
        resolve_site(inner, name)  # unknown names list close matches
    return list(declared)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, _ConvNd) for m in module.modules())


def _has_layer(module: nn.Module) -> bool:
    return any(isinstance(m, (_ConvNd, nn.Linear)) for m in module.modules())


def _is_container(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _is_stack(module: nn.Module) -> bool:
    """A ``Sequential`` / ``ModuleList`` of containers of one class that hold a layer."""
    if not isinstance(module, _STACK_TYPES):
        return False
    children = list(module.children())
    return (
        bool(children)
        and len({type(c) for c in children}) == 1
        and all(_is_container(c) and _has_layer(c) for c in children)
    )


def block_stacks(model: nn.Module) -> list[str]:
    """The innermost block stacks of ``model`` (see the module doc), in definition order."""
    inner = unwrap_model(model)
    found = [name for name, m in inner.named_modules() if name and _is_stack(m)]
    return [s for s in found if not any(t.startswith(s + ".") for t in found)]


def _blocks_without_batchnorm(model: nn.Module, stacks: list[str]) -> bool:
    return bool(stacks) and not any(
        is_batchnorm_like(m) for s in stacks for m in model.get_submodule(s).modules()
    )


def _stack_stage(model: nn.Module, stack: str) -> str:
    """The stage a stack makes: the module holding it when that is one of a stack of stages."""
    holder, _, _ = stack.rpartition(".")
    if not holder:
        return stack
    outer, _, _ = holder.rpartition(".")
    container = model.get_submodule(outer) if outer else model
    return holder if _is_stack(container) else stack


def _stack_blocks(model: nn.Module) -> list[list[str]] | None:
    """Per stage (in execution order), its blocks; ``None`` for batch-norm CNNs."""
    inner = unwrap_model(model)
    stacks = block_stacks(inner)
    if not _blocks_without_batchnorm(inner, stacks):
        return None
    per_stack = {
        s: [f"{s}.{c}" for c, _ in inner.get_submodule(s).named_children()] for s in stacks
    }
    first = {blocks[0]: s for s, blocks in per_stack.items()}
    ordered = site_order(inner, list(first))
    return [per_stack[first[b]] for b in ordered]


def _cnn_stages(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_children() if _is_container(m) and _has_conv(m)]
    return site_order(model, names) if names else []


def stages(model: nn.Module) -> list[str]:
    """The model's *stages*, in execution order (see the module doc).

    For the CIFAR ResNets this is ``layer1..layer3``, for torchvision ResNets ``layer1..layer4``,
    for torchvision EfficientNets ``features``, for timm EfficientNets ``blocks``; for timm
    ConvNeXts ``stages.0..stages.3``, for torchvision ConvNeXts ``features.1, .3, .5, .7``, for
    a timm ViT ``blocks`` and for torchvision's ``encoder.layers``.
    """
    inner = unwrap_model(model)
    groups = _stack_blocks(inner)
    if groups is None:
        return _cnn_stages(inner)
    return [_stack_stage(inner, g[0].rpartition(".")[0]) for g in groups]


def _no_stage_error(model: nn.Module) -> AdvfeatError:
    inner = unwrap_model(model)
    children = ", ".join(repr(n) for n, _ in inner.named_children()) or "none"
    return AdvfeatError(
        f"cannot choose a default feature site for {type(inner).__name__}: no top-level child "
        f"contains a convolution and no container holds a stack of blocks; pass site=... (or "
        f"sites=[...]) with dotted module names (top-level children: {children})"
    )


def last_stage(model: nn.Module) -> str:
    """The default site of ALFA and A-FAN: the last stage, or a ViT's last block.

    Both papers find the last block before the classifier best (ALFA §4.3, Fig. 2-3; A-FAN §7,
    Fig. S5); its output is the output of the stage's last residual block. A model with a single
    stack of blocks (a ViT: ``blocks``) gives its last block (``blocks.11``); a model that
    declares its sites (``feature_sites``), the last of them.
    """
    inner = unwrap_model(model)
    declared = declared_sites(inner)
    if declared is not None:
        return declared[-1]
    groups = _stack_blocks(inner)
    if groups is not None and len(groups) == 1:
        return groups[0][-1]
    found = stages(inner)
    if not found:
        raise _no_stage_error(model)
    return found[-1]


def first_stage(model: nn.Module) -> str | None:
    """The first stage (``layer1``, ``stages.0``, ``features.1``), or a ViT's first block
    (``blocks.0``); a model that declares its sites, the first of them; ``None`` when the model
    has no stage (the counterpart of :func:`last_stage`, for views of early features)."""
    inner = unwrap_model(model)
    declared = declared_sites(inner)
    if declared is not None:
        return declared[0]
    groups = _stack_blocks(inner)
    if groups is not None and len(groups) == 1:
        return groups[0][0]
    found = stages(inner)
    return found[0] if found else None


def stage_blocks(model: nn.Module) -> list[str]:
    """L-ALFA's default sites: every block of every stage, in execution order.

    A stage whose children are themselves modules with children (residual blocks) contributes
    those children that contain a convolution (``layer1.0`` … ``layer3.2``: the 9 blocks of
    ResNet-20, i.e. "after each skip connection", ALFA Table 9); a stage of plain layers counts
    as one block. Models without batch norm in their blocks give every block of their stacks
    (``blocks.0`` … ``blocks.11``; ``stages.0.blocks.0`` … ``stages.3.blocks.1``). A model that
    declares its sites (``feature_sites``) gives them.
    """
    inner = unwrap_model(model)
    declared = declared_sites(inner)
    if declared is not None:
        return declared
    groups = _stack_blocks(inner)
    if groups is not None:
        return [b for g in groups for b in g]
    blocks: list[str] = []
    for name in _cnn_stages(inner):
        stage = inner.get_submodule(name)
        children = list(stage.named_children())
        if children and all(_is_container(m) for _, m in children):
            blocks += [f"{name}.{c}" for c, m in children if _has_conv(m)]
        else:
            blocks.append(name)
    if not blocks:
        raise _no_stage_error(model)
    return blocks


def spread_blocks(model: nn.Module, count: int) -> list[str]:
    """``count`` of :func:`stage_blocks`, spread evenly over each stage, each stage's last kept.

    L-ALFA's default: dim(η) = 9 in ALFA Table 8 for every ResNet ("after each skip
    connection", Table 9). ResNet-20 has 9 blocks, all kept; ResNet-56 has 27 (3 stages of 9):
    every third block, the last of each group (``layer1.2``, ``layer1.5``, ``layer1.8``, …,
    ``layer3.8``). With fewer than ``count`` blocks, all of them. A model that declares its
    sites (``feature_sites``) gives all of them, whatever ``count``.
    """
    declared = declared_sites(model)
    if declared is not None:
        return declared
    blocks = stage_blocks(model)
    if count >= len(blocks):
        return blocks
    groups: dict[str, list[str]] = {}
    for b in blocks:
        groups.setdefault(b.rsplit(".", 1)[0] if "." in b else b, []).append(b)
    per_stage = [len(g) for g in groups.values()]
    # share ``count`` between stages in proportion to their blocks (largest remainders)
    exact = [count * n / len(blocks) for n in per_stage]
    share = [max(1, math.floor(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in order:
        if sum(share) >= count:
            break
        share[i] += 1
    chosen: list[str] = []
    for group, k in zip(groups.values(), share, strict=True):
        k = min(k, len(group))
        # the last block of each of k equal consecutive groups
        chosen += [group[math.ceil((j + 1) * len(group) / k) - 1] for j in range(k)]
    return chosen
