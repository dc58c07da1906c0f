"""Frontier capture: the values from before a site that its tail needs, recorded in the
clean pass (model inputs and outputs of module calls) and handed to ``SiteSplit.tail(..., x=x)``
for the same input ``x`` (the same tensor or an alias of it, not written to since)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.sites.addressing import (
    ModelInput,
    _as_args,
    resolve_site,
    split_site_name,
    unwrap_model,
)
from advfeat.sites.plans import Source, _Plan, _plan_for

__all__ = ["frontier_capture"]


def _first_tensor(values: Iterable[Any]) -> Tensor | None:
    return next((v for v in values if isinstance(v, Tensor)), None)


def _input_key(x: Tensor) -> tuple[Any, ...]:
    """What identifies the data of ``x`` (and its detached aliases): memory, layout, version."""
    return (
        x.untyped_storage().data_ptr(),
        x.storage_offset(),
        tuple(x.shape),
        x.stride(),
        x.dtype,
        x.device,
        x._version,
    )


@dataclass
class _Capture:
    """The values crossing a site's cut, recorded during one forward pass on ``input_ref()``."""

    input_ref: weakref.ref[Tensor]
    input_key: tuple[Any, ...]
    values: dict[Source, Any]
    versions: dict[Source, int]
    calls: dict[str, int]
    grad_enabled: bool

    def matches(self, x: ModelInput | None, plan: _Plan) -> bool:
        key = _first_tensor(_as_args(x)) if x is not None else None
        if key is None or self.input_ref() is None or _input_key(key) != self.input_key:
            return False
        for source, count in zip(plan.sources, plan.source_calls, strict=True):
            value = self.values.get(source, _MISSING)
            if value is _MISSING:
                return False
            if source[0] == "module" and self.calls.get(source[1]) != count:
                return False
            if isinstance(value, Tensor) and value._version != self.versions[source]:
                return False
        return True

    def untouched(self) -> bool:
        return all(
            v._version == self.versions[s] for s, v in self.values.items() if isinstance(v, Tensor)
        )


_MISSING = object()
_FRONTIER_CAPTURE = [True]


@contextmanager
def frontier_capture(enabled: bool) -> Iterator[None]:
    """Inside the block, ``capture_features(..., frontier=True)`` records frontiers only when
    ``enabled``; with ``False`` a site inside a residual block takes the full-model fallback, as
    before frontiers were captured (benchmarks measure what tail-only execution saves)."""
    saved = _FRONTIER_CAPTURE[0]
    _FRONTIER_CAPTURE[0] = bool(enabled)
    try:
        yield
    finally:
        _FRONTIER_CAPTURE[0] = saved


_CAPTURES: WeakKeyDictionary[nn.Module, dict[str, _Capture]] = WeakKeyDictionary()


def _forget_when_freed(store: dict[str, _Capture], site: str) -> Callable[[Any], None]:
    """Weakref callback: once the input is gone, so are the values captured with it."""

    def forget(ref: Any) -> None:
        capture = store.get(site)
        if capture is not None and capture.input_ref is ref:
            del store[site]

    return forget


@contextmanager
def _capture_frontier(model: nn.Module, sites: Sequence[str]) -> Iterator[None]:
    """Record, in the forward passes run inside the block, the values that cross each site's
    cut (:class:`SiteSplit`); the last forward's values are kept for ``tail(..., x=x)``."""
    inner = unwrap_model(model)
    plans: dict[str, _Plan] = {}
    for name in sites:
        resolve_site(model, name)
    for name in sites:
        site = split_site_name(model, name)[1]
        try:
            plan = _plan_for(inner, site, frozenset(), (), frozenset())
        except AdvfeatError:
            continue  # a site that never runs: the caller's capture reports it
        if plan.fn is not None and plan.sources:
            plans[site] = plan
    if not plans:
        yield
        return
    wanted: dict[str, set[int]] = {}
    for plan in plans.values():
        for kind, target, index in plan.sources:
            if kind == "module":
                wanted.setdefault(target, set()).add(index)
    counts: dict[str, int] = {}
    values: dict[Source, Any] = {}
    versions: dict[Source, int] = {}
    state: dict[str, Any] = {}

    def start(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        counts.clear()
        values.clear()
        versions.clear()
        key = _first_tensor([*args, *kwargs.values()])
        state["input"] = key
        state["key"] = None if key is None else _input_key(key)
        state["grad"] = torch.is_grad_enabled()

    def inputs(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for plan in plans.values():
            for source in plan.sources:
                kind, name, index = source
                if kind == "input":
                    value = args[index] if index < len(args) else kwargs.get(name, _MISSING)
                    if value is not _MISSING:
                        values[source] = value
                    if isinstance(value, Tensor):
                        versions[source] = value._version

    def recorder(target: str, indices: set[int]) -> Callable[[nn.Module, Any, Any], None]:
        def record(_m: nn.Module, _a: Any, output: Any) -> None:
            k = counts.get(target, 0)
            counts[target] = k + 1
            if k in indices:
                source = ("module", target, k)
                if isinstance(output, Tensor):
                    # a copy: the rest of the forward may write into the output
                    # (torchvision's ``out += identity``, which fx records as ``out + identity``)
                    output = output.clone()
                    versions[source] = output._version
                values[source] = output

        return record

    handles = [
        inner.register_forward_pre_hook(start, with_kwargs=True, prepend=True),
        inner.register_forward_pre_hook(inputs, with_kwargs=True),
    ]
    handles += [
        inner.get_submodule(t).register_forward_hook(recorder(t, i)) for t, i in wanted.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    key_tensor = state.get("input")
    if key_tensor is None:
        return
    # a value written in place after it was recorded is not handed over (the tail falls back)
    kept = {
        s: v
        for s, v in values.items()
        if not isinstance(v, Tensor) or v._version == versions.get(s)
    }
    store = _CAPTURES.setdefault(inner, {})
    for site, plan in plans.items():
        store[site] = _Capture(
            weakref.ref(key_tensor, _forget_when_freed(store, site)),
            state["key"],
            {s: kept[s] for s in plan.sources if s in kept},
            versions,
            dict(counts),
            state["grad"],
        )
