"""Tail-only execution: :class:`SiteSplit` runs a model from a feature site onwards."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.sites.addressing import ModelInput, _as_args, resolve_site, split_site_name
from advfeat.sites.frontier import _CAPTURES, _Capture
from advfeat.sites.hooks import Replacement, replace_features
from advfeat.sites.plans import _Plan, _plan_for

__all__ = ["SiteSplit"]


class _StopForward(Exception):
    """Raised by :meth:`SiteSplit.head` once the site has produced its output."""


class SiteSplit:
    """Run a model from a feature site onwards (tail-only execution).

    Args:
        model: any ``nn.Module`` (wrappers are unwrapped); submodules are shared, never copied.
        site: dotted name of the submodule whose output is the split point.
        leaves: extra module types or dotted names to keep whole when tracing.
        prefix_grad: let values that jump over the site (skip connections) carry gradients to
            earlier layers: the captured frontier keeps its graph (fast path), the fallback runs
            the part before the site with gradients. The default (``False``) makes them
            constants: only the ``feature`` passed in connects the tail to anything before it.

    ``tail(feature)`` returns the model's output as if the site had output ``feature``;
    ``head(x)`` returns the site's output for input ``x`` (running only up to the site). For a
    site with a :attr:`frontier`, run the clean pass inside
    ``capture_features(model, site, frontier=True)`` and call ``tail(feature, x=x)``.
    """

    def __init__(
        self,
        model: nn.Module,
        site: str,
        *,
        leaves: Iterable[type | str] = (),
        prefix_grad: bool = False,
    ) -> None:
        self.module = resolve_site(model, site)
        self.model, self.site = split_site_name(model, site)
        leaf_list = list(leaves)
        self._leaf_types = tuple(t for t in leaf_list if isinstance(t, type))
        self._leaf_names = frozenset(
            split_site_name(model, n)[1] for n in leaf_list if isinstance(n, str)
        )
        self.prefix_grad = prefix_grad

    def _plan(self, replaced: Iterable[str] = ()) -> _Plan:
        names = frozenset(split_site_name(self.model, r)[1] for r in replaced)
        return _plan_for(self.model, self.site, names, self._leaf_types, self._leaf_names)

    @property
    def is_fast(self) -> bool:
        """``True`` when :meth:`tail` can run only the part of the network after the site.

        When values other than the site's output cross the cut (:attr:`frontier`), the tail is
        tail-only for an input whose clean pass ran inside
        ``capture_features(model, site, frontier=True)``, and falls back otherwise.
        """
        return self._plan().fn is not None

    @property
    def frontier(self) -> tuple[str, ...]:
        """The values from before the site that the tail also needs (names in the ``fx``
        trace, e.g. a residual block's shortcut input); empty for a clean cut."""
        return self._plan().frontier

    @property
    def fallback_reason(self) -> str:
        """Why the tail falls back to a full forward (empty when :attr:`is_fast`)."""
        return self._plan().reason

    def is_fast_for(self, replaced: Iterable[str]) -> bool:
        """Whether :meth:`tail` is fast with replacements at the sites ``replaced``."""
        return self._plan(replaced).fn is not None

    def head(self, x: ModelInput) -> Any:
        """The site's output for input ``x``; the model stops right after the site."""
        store: list[Any] = []

        def stop(_m: nn.Module, _a: Any, output: Any) -> None:
            store.append(output)
            raise _StopForward

        handle = self.module.register_forward_hook(stop)
        try:
            self.model(*_as_args(x))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not store:
            raise AdvfeatError(f"feature site {self.site!r} did not run during the forward pass")
        return store[0]

    def tail(
        self,
        feature: Any,
        replacements: Mapping[str, Replacement] | None = None,
        *,
        x: ModelInput | None = None,
    ) -> Any:
        """The model's output as if the site had output ``feature``.

        Args:
            feature: what the site outputs instead of its own output (gradients flow into it).
            replacements: later sites to replace inside the tail, ``{site: fn or tensor}``
                (L-ALFA perturbs several blocks at once).
            x: the model input; needed only when the tail is not fast (the fallback runs the
                whole model). Pass it whenever you have it.

        ``feature`` itself is never written to (the tail starts from a copy).
        """
        repl = dict(replacements or {})
        plan = self._plan(repl)
        if isinstance(feature, Tensor):
            # The tail may start with an in-place op (ReLU(inplace=True), ``out += identity``):
            # never let it write into the caller's tensor.
            feature = feature.clone()
        capture = self._capture_for(plan, x)
        if plan.fn is not None and (capture is not None or not plan.sources):
            frontier = [] if capture is None else self._frontier_values(plan, capture)
            with replace_features(self.model, repl):
                out = plan.fn(self.model, feature, *frontier)
            if capture is not None and not capture.untouched():
                # the tail wrote into a value from before the site: later calls fall back
                _CAPTURES.get(self.model, {}).pop(self.site, None)
            return out
        if x is None:
            reason = plan.reason or (
                f"it needs values from before the site ({', '.join(plan.frontier)}) that no "
                f"clean pass captured: run that pass inside capture_features(model, site, "
                f"frontier=True)"
            )
            raise AdvfeatError(
                f"the tail after site {self.site!r} cannot run on its own ({reason}); "
                f"pass the model input as tail(feature, x=inputs) to use the full-model fallback"
            )
        return self._full_forward(feature, repl, x)

    def _capture_for(self, plan: _Plan, x: ModelInput | None) -> _Capture | None:
        """The clean pass's record of the values crossing the cut, if it fits this call."""
        if plan.fn is None or not plan.sources:
            return None
        capture = _CAPTURES.get(self.model, {}).get(self.site)
        if capture is None or not capture.matches(x, plan):
            return None
        if self.prefix_grad and torch.is_grad_enabled() and not capture.grad_enabled:
            return None  # the skip path must carry gradients, but was recorded without them
        return capture

    def _frontier_values(self, plan: _Plan, capture: _Capture) -> list[Any]:
        values = [capture.values[s] for s in plan.sources]
        if self.prefix_grad:
            return values
        return [v.detach() if isinstance(v, Tensor) else v for v in values]

    def _full_forward(self, feature: Any, repl: Mapping[str, Replacement], x: ModelInput) -> Any:
        grad_enabled = torch.is_grad_enabled()
        site_calls = 0

        def at_site(_m: nn.Module, _a: Any, output: Any) -> Any:
            nonlocal site_calls
            site_calls += 1
            if site_calls > 1:
                raise AdvfeatError(
                    f"feature site {self.site!r} runs more than once per forward; choose a "
                    f"module that runs once (a block, not a shared activation)"
                )
            torch.set_grad_enabled(grad_enabled)
            return feature

        def check_order(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def pre(_m: nn.Module, _a: Any, _o: Any) -> None:
                if site_calls == 0:
                    raise AdvfeatError(
                        f"feature site {name!r} runs before the split site {self.site!r}; only "
                        f"sites downstream of the split can be replaced in its tail"
                    )

            return pre

        handles = [self.module.register_forward_hook(at_site)]
        for name in repl:
            module = resolve_site(self.model, name)
            handles.append(module.register_forward_hook(check_order(name), prepend=True))
        try:
            with replace_features(self.model, repl):
                torch.set_grad_enabled(grad_enabled and self.prefix_grad)
                out = self.model(*_as_args(x))
        finally:
            torch.set_grad_enabled(grad_enabled)
            for handle in handles:
                handle.remove()
        if site_calls == 0:
            raise AdvfeatError(f"feature site {self.site!r} did not run during the forward pass")
        return out

    def __repr__(self) -> str:
        mode = "fast" if self.is_fast else f"fallback: {self.fallback_reason}"
        return f"SiteSplit({type(self.model).__name__}, {self.site!r}, {mode})"
