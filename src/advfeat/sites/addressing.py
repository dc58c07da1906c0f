"""Addressing feature sites: the module behind a dotted name, through model wrappers.

A *feature site* is a dotted module name of an unmodified model (``"layer3"``, ``"layer4.0"``,
``"features.4"``). ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile`` wrappers are
transparent; unknown names list close matches.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from advfeat.errors import AdvfeatError, unknown_name

__all__ = [
    "ModelInput",
    "check_disjoint_sites",
    "resolve_site",
    "split_site_name",
    "uncompiled",
    "unwrap_model",
]

ModelInput = Any
"""The model's input: one tensor, or a tuple of positional arguments."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile``."""
    inner = model
    while True:
        if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = inner.module
        elif isinstance(orig := getattr(inner, "_orig_mod", None), nn.Module):
            inner = orig
        else:
            return inner


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` without its ``torch.compile`` wrappers (DDP and DataParallel kept).

    A compiled graph runs the forward hooks it saw when it was traced: hooks registered on a
    submodule afterwards, as every feature capture does, are silently skipped. Passes that
    capture or replace a site's output therefore run the eager module.
    """
    while isinstance(orig := getattr(model, "_orig_mod", None), nn.Module):
        model = orig
    return model


def split_site_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(unwrapped model, name relative to it)``; wrapper prefixes (``module.``) are dropped."""
    if not isinstance(name, str):
        raise AdvfeatError(f"a feature site is a dotted module name (str), got {name!r}")
    inner = model
    while True:
        if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = inner.module
            name = name.removeprefix("module.")
        elif isinstance(orig := getattr(inner, "_orig_mod", None), nn.Module):
            inner = orig
            name = name.removeprefix("_orig_mod.")
        else:
            return inner, name


def resolve_site(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted, e.g. ``"layer4.0"``) of ``model``.

    ``DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers are transparent:
    ``"layer3"`` and ``"module.layer3"`` name the same module. Unknown names raise
    :class:`AdvfeatError` listing close matches among the model's module names.
    """
    inner, rel = split_site_name(model, name)
    if rel == "":
        raise AdvfeatError(
            "a feature site names a submodule (e.g. 'layer3'), not the whole model ('')"
        )
    try:
        return inner.get_submodule(rel)
    except AttributeError:
        names = [n for n, _ in inner.named_modules() if n]
        raise unknown_name("feature site", name, names) from None


def check_disjoint_sites(model: nn.Module, names: list[str]) -> list[str]:
    """Check that ``names`` name distinct sites of ``model`` none of which lies inside another
    (a perturbation of ``layer3`` would overwrite the one of ``layer3.1``); returns the names
    relative to the unwrapped model. Unknown names list close matches (:func:`resolve_site`)."""
    relative = [split_site_name(model, name)[1] for name in names]
    for name in names:
        resolve_site(model, name)
    if len(set(relative)) != len(relative):
        raise AdvfeatError(f"sites must be distinct, got {list(names)}")
    for outer in relative:
        for inner in relative:
            if inner.startswith(outer + "."):
                raise AdvfeatError(
                    f"site {inner!r} lies inside site {outer!r}; perturb modules that do not "
                    f"contain each other"
                )
    return relative


def _as_args(x: ModelInput) -> tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)
