"""Feature sites: capture, replace and re-run the output of a named submodule.

A *feature site* is a dotted module name of an unmodified model (``"layer3"``, ``"layer4.0"``,
``"features.4"``). Feature-space methods (ALFA, A-FAN, AdvBN) perturb the output of a site and
run only the part of the network after it — "the gradient is only back-propagated to the i-th
layer without going further" (ALFA §3.2; A-FAN §4, "partial backpropagation"; AdvBN §4, "we do
not need to backpropagate through the first half of the network").

* :func:`resolve_site` — the module behind a name (``DataParallel``/DDP/compiled wrappers are
  transparent); unknown names list close matches.
* :func:`capture_features` / :func:`replace_features` — forward hooks, as context managers.
* :class:`SiteSplit` — *tail-only execution*: the model's output as if the site had produced a
  given tensor, running only what comes after the site.

How the tail is built. ``nn.Sequential`` models split at a top-level child directly. Other models
are traced with ``torch.fx``: the site (and any site to be replaced inside the tail) is a leaf, so
are the standard ``torch.nn`` layers, batch-norm layers (including advfeat's multi-branch BN),
modules carrying hooks, user-given leaves, and any submodule whose ``forward`` cannot be traced
(it is tried, then kept whole). The graph is cut after the site's node; the cut is *clean* when the
site's output is the only input-dependent value the rest of the graph uses. The tail is compiled
from the graph but runs against the live model (``self`` is the model itself), so it shares every
submodule, parameter and buffer — training through the tail trains the model, and swapping a
submodule, ``.to(device)`` or BN-branch routing are seen at once. Traces are cached per model and
redone when module types, train/eval flags or the presence of hooks change (Python state read by
non-leaf modules, e.g. ``if self.training``, is frozen into a trace).

Fallback (model not traceable, cut not clean — e.g. a skip connection jumping over the site —, a
hooked ancestor of the site, forward hooks on the root): the whole model runs on the input ``x``
with the site's output replaced by a forward hook; the part before the site runs under
``torch.no_grad()`` (grad mode is switched back on by the site hook). Slower, equally correct.
Check :attr:`SiteSplit.is_fast`.

Root forward *pre*-hooks (e.g. :func:`advfeat.models.attach_normalize`) are part of the head and
are not run by a fast tail, which starts after the site.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.conv import _ConvNd

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.norm.stats import is_batchnorm_like

__all__ = [
    "FeatureFn",
    "SiteSplit",
    "capture_features",
    "last_stage",
    "replace_features",
    "resolve_site",
    "site_order",
    "split_site_name",
    "spread_blocks",
    "stage_blocks",
    "stages",
    "unwrap_model",
]

FeatureFn = Callable[[Any], Any]
"""``fn(feature) -> new feature``: what a replaced site outputs instead of its own output."""

Replacement = FeatureFn | Tensor
ModelInput = Any
"""The model's input: one tensor, or a tuple of positional arguments."""

_PLAN_CACHE_SIZE = 32


# ----------------------------------------------------------------------------------- names


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


# ------------------------------------------------------------------------- capture/replace


@contextmanager
def capture_features(
    model: nn.Module, sites: str | Sequence[str], *, detach: bool = False, clone: bool = False
) -> Iterator[dict[str, Any]]:
    """Record the output of each site during the forward passes run inside the block.

    Yields a dict ``{site: output}`` filled by forward hooks (keys as given). Outputs keep their
    autograd graph unless ``detach=True``. A site that runs several times per forward keeps its
    last output. The stored tensor *is* the site's output: if the model later modifies it in
    place (a BN site followed by ``out += identity`` or ``ReLU(inplace=True)``), pass
    ``clone=True`` — block outputs (``layer3``, ``layer4.0``) are not modified that way.
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    store: dict[str, Any] = {}
    handles = []
    try:
        for name in names:
            module = resolve_site(model, name)

            def hook(_m: nn.Module, _a: Any, output: Any, name: str = name) -> None:
                if isinstance(output, Tensor):
                    output = output.detach() if detach else output
                    output = output.clone() if clone else output
                store[name] = output

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


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


# ---------------------------------------------------------------------------------- tracing


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


# ------------------------------------------------------------------------------------ plans

TailFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class _Plan:
    """How to run the tail: ``fn(model, feature)`` when fast, else ``reason`` for the fallback."""

    fn: TailFn | None
    reason: str = ""


def _call_module_nodes(graph: fx.Graph, target: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_module" and n.target == target]


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _cut_graph(model: nn.Module, graph: fx.Graph, site: str, replaced: frozenset[str]) -> _Plan:
    site_nodes = _call_module_nodes(graph, site)
    if not site_nodes:
        raise AdvfeatError(f"feature site {site!r} is not called during the model's forward pass")
    if len(site_nodes) > 1:
        return _Plan(None, f"site {site!r} runs {len(site_nodes)} times per forward")
    site_node = site_nodes[0]
    after = _descendants(site_node)
    output = next(n for n in graph.nodes if n.op == "output")
    if output not in after:
        raise AdvfeatError(f"the model's output does not depend on feature site {site!r}")
    input_dependent: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in input_dependent for a in n.all_input_nodes):
            input_dependent.add(n)
    constants: set[fx.Node] = set()
    crossing: list[str] = []
    for n in after:
        for a in n.all_input_nodes:
            if a is site_node or a in after:
                continue
            if a in input_dependent:
                crossing.append(a.name)
            else:
                stack = [a]
                while stack:
                    c = stack.pop()
                    if c not in constants:
                        constants.add(c)
                        stack.extend(c.all_input_nodes)
    if crossing:
        names = ", ".join(sorted(set(crossing))[:5])
        return _Plan(None, f"values other than the site's output cross the cut ({names})")
    for r in sorted(replaced):
        nodes = _call_module_nodes(graph, r)
        if not nodes:
            raise AdvfeatError(f"feature site {r!r} is not called during the forward pass")
        if any(n not in after for n in nodes):
            raise AdvfeatError(
                f"feature site {r!r} does not run after the split site {site!r}; only sites "
                f"downstream of the split can be replaced in its tail"
            )
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {site_node: tail.placeholder("feature")}
    for n in graph.nodes:
        if n in after or n in constants:
            env[n] = tail.node_copy(n, lambda a: env[a])
    compiled = fx.GraphModule(model, tail)
    compiled.graph.eliminate_dead_code()
    compiled.graph.lint()
    compiled.recompile()
    # The generated forward only reads ``self.<qualified name>``: run it against the live model.
    return _Plan(type(compiled).forward)


def _sequential_plan(model: nn.Sequential, site: str, replaced: frozenset[str]) -> _Plan | None:
    names = list(model._modules)
    if "." in site or site not in names:
        return None
    index = names.index(site)
    for r in replaced:
        top = r.split(".")[0]
        if names.index(top) <= index:
            raise AdvfeatError(
                f"feature site {r!r} does not run after the split site {site!r}; only sites "
                f"downstream of the split can be replaced in its tail"
            )
    later = names[index + 1 :]

    def run(seq: nn.Module, feature: Any) -> Any:
        for child in later:
            feature = seq._modules[child](feature)  # type: ignore[misc]
        return feature

    return _Plan(run)


def _build_plan(
    model: nn.Module,
    site: str,
    replaced: frozenset[str],
    leaf_types: tuple[type, ...],
    leaf_names: frozenset[str],
) -> _Plan:
    required = replaced | {site}
    for r in replaced:
        if r == site or r.startswith(site + "."):
            raise AdvfeatError(
                f"feature site {r!r} is (inside) the split site {site!r}; replacements in the "
                f"tail must be sites that run after it"
            )
    if model._forward_hooks:
        return _Plan(None, "the model has forward hooks on its root module")
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        plan = _sequential_plan(model, site, replaced)
        if plan is not None:
            return plan
    protected = frozenset().union(*(_ancestors(n) for n in required))
    for name in sorted(protected):
        if _has_hooks(model.get_submodule(name)):
            return _Plan(None, f"module {name!r}, which contains a site, has hooks")
    if any(r in protected for r in replaced):
        return _Plan(None, "a replaced site contains another site")
    notrace_types, notrace_fns = _timm_notrace()
    tracer = _SiteTracer(required, leaf_types + notrace_types, leaf_names, notrace_fns)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # any tracing failure means: use the hook-based fallback
        return _Plan(None, f"torch.fx cannot trace the model ({type(err).__name__}: {err})")
    return _cut_graph(model, graph, site, replaced)


_PLANS: WeakKeyDictionary[nn.Module, OrderedDict[Any, _Plan]] = WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """What a trace depends on: module types, train/eval flags and where hooks are."""
    return tuple((n, type(m), m.training, _has_hooks(m)) for n, m in model.named_modules())


def _plan_for(
    model: nn.Module,
    site: str,
    replaced: frozenset[str],
    leaf_types: tuple[type, ...],
    leaf_names: frozenset[str],
) -> _Plan:
    key = (site, replaced, leaf_types, leaf_names, _fingerprint(model))
    plans = _PLANS.setdefault(model, OrderedDict())
    plan = plans.get(key)
    if plan is None:
        plan = _build_plan(model, site, replaced, leaf_types, leaf_names)
        plans[key] = plan
        while len(plans) > _PLAN_CACHE_SIZE:
            plans.popitem(last=False)
    else:
        plans.move_to_end(key)
    return plan


# ---------------------------------------------------------------------------------- SiteSplit


class _StopForward(Exception):
    """Raised by :meth:`SiteSplit.head` once the site has produced its output."""


def _as_args(x: ModelInput) -> tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)


class SiteSplit:
    """Run a model from a feature site onwards (tail-only execution).

    Args:
        model: any ``nn.Module`` (wrappers are unwrapped); submodules are shared, never copied.
        site: dotted name of the submodule whose output is the split point.
        leaves: extra module types or dotted names to keep whole when tracing.
        prefix_grad: fallback only — run the part before the site with gradients enabled, so
            values that jump over the site (skip connections) carry gradients to earlier layers.
            The default (``False``) gives the same gradients as the fast path, where only the
            ``feature`` passed in connects the tail to anything before the site.

    ``tail(feature)`` returns the model's output as if the site had output ``feature``;
    ``head(x)`` returns the site's output for input ``x`` (running only up to the site).
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
        """``True`` when :meth:`tail` runs only the part of the network after the site."""
        return self._plan().fn is not None

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
        if plan.fn is not None:
            with replace_features(self.model, repl):
                return plan.fn(self.model, feature)
        if x is None:
            raise AdvfeatError(
                f"the tail after site {self.site!r} cannot run on its own ({plan.reason}); "
                f"pass the model input as tail(feature, x=inputs) to use the full-model fallback"
            )
        return self._full_forward(feature, repl, x)

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


# ---------------------------------------------------------------------------------- stages
def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, _ConvNd) for m in module.modules())


def _is_container(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def stages(model: nn.Module) -> list[str]:
    """The model's *stages*: top-level children that contain submodules and a convolution.

    For the CIFAR ResNets this is ``layer1..layer3``, for torchvision ResNets ``layer1..layer4``,
    for torchvision EfficientNets ``features``, for timm EfficientNets ``blocks``; single layers
    (``conv1``, ``bn``), pooling and classifier heads are not stages. Sorted in execution order.
    """
    inner = unwrap_model(model)
    names = [n for n, m in inner.named_children() if _is_container(m) and _has_conv(m)]
    return site_order(inner, names) if names else []


def _no_stage_error(model: nn.Module) -> AdvfeatError:
    children = ", ".join(repr(n) for n, _ in unwrap_model(model).named_children()) or "none"
    return AdvfeatError(
        f"cannot choose a default feature site for {type(unwrap_model(model)).__name__}: no top-level "
        f"child contains a convolution; pass site=... (or sites=[...]) with dotted module names "
        f"(top-level children: {children})"
    )


def last_stage(model: nn.Module) -> str:
    """The default site of ALFA and A-FAN: the last stage (see :func:`stages`).

    Both papers find the last block before the classifier best (ALFA §4.3, Fig. 2-3; A-FAN §7,
    Fig. S5); its output is the output of the stage's last residual block.
    """
    found = stages(model)
    if not found:
        raise _no_stage_error(model)
    return found[-1]


def stage_blocks(model: nn.Module) -> list[str]:
    """L-ALFA's default sites: every block of every stage, in execution order.

    A stage whose children are themselves modules with children (residual blocks) contributes
    those children that contain a convolution (``layer1.0`` … ``layer3.2``: the 9 blocks of
    ResNet-20, i.e. "after each skip connection", ALFA Table 9); a stage of plain layers counts
    as one block.
    """
    inner = unwrap_model(model)
    blocks: list[str] = []
    for name in stages(inner):
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
    ``layer3.8``). With fewer than ``count`` blocks, all of them.
    """
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
