"""The ``torch.fx`` tracer of feature sites, and the order in which sites run.

The site (and any site to be replaced inside the tail) is a leaf, so are the standard
``torch.nn`` layers, batch-norm layers (including advfeat's multi-branch BN), modules carrying
hooks, user-given leaves, and any submodule whose ``forward`` cannot be traced (it is tried, then
kept whole); ancestors of the sites are always traced through.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from advfeat.norm.stats import is_batchnorm_like
from advfeat.sites.addressing import ModelInput, _as_args, resolve_site, split_site_name

__all__ = ["site_order"]


def _norm_leaf_test() -> Callable[[nn.Module], bool] | None:
    try:
        from advfeat.norm import is_norm_leaf
    except ImportError:
        return None
    return is_norm_leaf  # type: ignore[no-any-return]


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    """Modules and functions timm marks as not traceable (only when timm is already loaded)."""
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


class _SiteTracer(fx.Tracer):
    """fx tracer whose leaves are the sites, standard layers, norm layers, hooked modules and
    whatever does not trace; ancestors of the sites are always traced through."""

    def __init__(
        self,
        required: frozenset[str],
        leaf_types: tuple[type, ...],
        leaf_names: frozenset[str],
        autowrap_functions: tuple[Callable[..., Any], ...],
    ) -> None:
        super().__init__(autowrap_functions=autowrap_functions, param_shapes_constant=True)
        self.required = required
        self.protected = frozenset().union(*(_ancestors(n) for n in required))
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.forced: set[str] = set()
        self.norm_leaf = _norm_leaf_test()
        self._param_cache: dict[str, Any] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        name = module_qualified_name
        if name in self.required:
            return True
        if name in self.protected:
            return False
        if name in self.forced or name in self.leaf_names or _has_hooks(m):
            return True
        if is_batchnorm_like(m) or (self.norm_leaf is not None and self.norm_leaf(m)):
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._param_cache = parameter_proxy_cache
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        name = self.path_of_module(m)
        if name in self.protected or self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        known = set(self.graph.nodes)
        module_stack = OrderedDict(self.module_stack)
        num_calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Not traceable: roll the graph back and keep this module whole.
            for node in reversed(list(self.graph.nodes)):
                if node not in known:
                    self.graph.erase_node(node)
            if self._param_cache is not None:
                for key, proxy in list(self._param_cache.items()):
                    if getattr(proxy, "node", None) not in known:
                        del self._param_cache[key]
            self.module_stack.clear()
            self.module_stack.update(module_stack)
            self.num_calls.clear()
            self.num_calls.update(num_calls)
            self.forced.add(name)
            return super().call_module(m, forward, args, kwargs)


def site_order(model: nn.Module, sites: Sequence[str], x: ModelInput | None = None) -> list[str]:
    """``sites`` sorted by when they run in a forward pass (names as given).

    Read from an ``fx`` trace when the model traces; otherwise from one forward pass on ``x``
    (under ``torch.no_grad()``); without ``x``, the order of ``model.named_modules()``.
    """
    inner, _ = split_site_name(model, sites[0]) if sites else (model, "")
    rel = {s: split_site_name(model, s)[1] for s in sites}
    for s in sites:
        resolve_site(model, s)
    try:
        tracer = _SiteTracer(frozenset(rel.values()), (), frozenset(), ())
        graph = tracer.trace(inner)
        first = {}
        for i, n in enumerate(graph.nodes):
            if n.op == "call_module" and n.target not in first:
                first[n.target] = i
        if all(r in first for r in rel.values()):
            return sorted(sites, key=lambda s: first[rel[s]])
    except Exception:  # untraceable: fall through to the hook-based order
        pass
    if x is not None:
        seen: list[str] = []
        hooks = []
        for s in sites:

            def record(_m: nn.Module, _a: Any, _o: Any, s: str = s) -> None:
                if s not in seen:
                    seen.append(s)

            hooks.append(resolve_site(model, s).register_forward_hook(record))
        try:
            with torch.no_grad():
                model(*_as_args(x))
        finally:
            for h in hooks:
                h.remove()
        return seen + [s for s in sites if s not in seen]
    index = {n: i for i, (n, _) in enumerate(inner.named_modules())}
    return sorted(sites, key=lambda s: index[rel[s]])
