"""Capture and replace the output of feature sites with forward hooks, as context managers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.sites.addressing import resolve_site
from advfeat.sites.frontier import _FRONTIER_CAPTURE, _capture_frontier

__all__ = ["FeatureFn", "Replacement", "capture_features", "replace_features"]

FeatureFn = Callable[[Any], Any]
"""``fn(feature) -> new feature``: what a replaced site outputs instead of its own output."""

Replacement = FeatureFn | Tensor


@contextmanager
def capture_features(
    model: nn.Module,
    sites: str | Sequence[str],
    *,
    detach: bool = False,
    clone: bool = False,
    frontier: bool = False,
) -> Iterator[dict[str, Any]]:
    """Record the output of each site during the forward passes run inside the block.

    Yields a dict ``{site: output}`` filled by forward hooks (keys as given). Outputs keep their
    autograd graph unless ``detach=True``. A site that runs several times per forward keeps its
    last output. Without ``clone`` the stored tensor *is* the site's output, and the rest of the
    forward may write into it: a BN site followed by ``out += identity`` or
    ``ReLU(inplace=True)``, the inner ``block`` of a MobileNetV3 ``InvertedResidual``
    (``result += input``). ``clone=True`` stores a copy taken when the site returns (it keeps
    the autograd graph; ``detach=True`` alone shares the memory and does not protect). Both
    apply to the tensors inside a dict, list or tuple output (a backbone's feature dict).

    ``frontier=True`` also records, for each site whose tail needs more than the site's output
    (a site inside a residual block: the block's input, used by the shortcut), the values that
    cross the cut, so that ``SiteSplit(model, site).tail(feature, x=x)`` with the same input
    ``x`` runs only the part after the site (see :class:`SiteSplit`).
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    store: dict[str, Any] = {}
    handles = []
    capture = frontier and _FRONTIER_CAPTURE[0]
    with _capture_frontier(model, names) if capture else nullcontext():
        try:
            for name in names:
                module = resolve_site(model, name)

                def hook(_m: nn.Module, _a: Any, output: Any, name: str = name) -> None:
                    store[name] = _stored(output, detach=detach, clone=clone)

                handles.append(module.register_forward_hook(hook))
            yield store
        finally:
            for handle in handles:
                handle.remove()


def _stored(output: Any, *, detach: bool, clone: bool) -> Any:
    """``output`` with each tensor (also inside a dict, list or tuple) detached and/or copied."""
    if isinstance(output, Tensor):
        output = output.detach() if detach else output
        return output.clone() if clone else output
    if not (detach or clone):
        return output
    if isinstance(output, dict):
        items = [(k, _stored(v, detach=detach, clone=clone)) for k, v in output.items()]
        return OrderedDict(items) if isinstance(output, OrderedDict) else dict(items)
    if isinstance(output, (list, tuple)):
        values = [_stored(v, detach=detach, clone=clone) for v in output]
        if isinstance(output, list):
            return values
        if hasattr(output, "_make"):  # a named tuple
            return output._make(values)
        return type(output)(values)  # a tuple, or torch's named return types
    return output


def _replacement_hook(name: str, value: Replacement) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(_m: nn.Module, _a: Any, output: Any) -> Any:
        if callable(value) and not isinstance(value, Tensor):
            return value(output)
        if isinstance(output, Tensor) and output.shape != value.shape:
            raise AdvfeatError(
                f"replacement for site {name!r} has shape {tuple(value.shape)}, but the site "
                f"outputs {tuple(output.shape)}; replace a feature by one of the same shape"
            )
        return value

    return hook


@contextmanager
def replace_features(model: nn.Module, replacements: Mapping[str, Replacement]) -> Iterator[None]:
    """Inside the block, each site outputs ``fn(its output)`` (callable) or the given tensor.

    Implemented with forward hooks, so gradients flow through whatever the replacement is built
    from. Tensor replacements must have the shape of the site's output.
    """
    handles = []
    try:
        for name, value in replacements.items():
            if not (callable(value) or isinstance(value, Tensor)):
                raise AdvfeatError(
                    f"replacement for site {name!r} must be a tensor or a callable "
                    f"fn(feature) -> feature, got {type(value).__name__}"
                )
            module = resolve_site(model, name)
            handles.append(module.register_forward_hook(_replacement_hook(name, value)))
        yield
    finally:
        for handle in handles:
            handle.remove()
