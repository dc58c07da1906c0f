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
(it is tried, then kept whole). The graph is cut after the site's node. The tail is compiled
from the graph but runs against the live model (``self`` is the model itself), so it shares every
submodule, parameter and buffer — training through the tail trains the model, and swapping a
submodule, ``.to(device)`` or BN-branch routing are seen at once. Traces are cached per model and
redone when module types, train/eval flags or the presence of hooks change (Python state read by
non-leaf modules, e.g. ``if self.training``, is frozen into a trace).

The frontier. When the tail also needs values from before the site — a site inside a residual
block, whose block input the shortcut adds back; a dense block, whose later layers concatenate
earlier outputs — those values (the *frontier*: model inputs and outputs of module calls, with
the function calls between them and the tail replayed) are recorded during the clean pass by
``capture_features(model, sites, frontier=True)`` and handed to the tail when it is called with
the same input ``x`` (the same tensor or an alias of it, not written to since). The tail is then
tail-only at any site of a traceable model. The frontier keeps its autograd graph: with
``prefix_grad=True`` gradients reach the layers before the site through it, as they do through the
skip connection of the full model; by default it is a constant of the tail, like the fallback's
prefix.

Fallback (model not traceable, a frontier that no clean pass captured for this input, a hooked
ancestor of the site, forward hooks on the root): the whole model runs on the input ``x`` with
the site's output replaced by a forward hook; the part before the site runs under
``torch.no_grad()`` (grad mode is switched back on by the site hook). Slower, equally correct.
Check :attr:`SiteSplit.is_fast` and :attr:`SiteSplit.frontier`.

Root forward *pre*-hooks (e.g. :func:`advfeat.models.attach_normalize`) are part of the head and
are not run by a fast tail, which starts after the site.
"""

from __future__ import annotations

import operator
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, fx, nn

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.norm.stats import is_batchnorm_like

__all__ = [
    "FeatureFn",
    "SiteSplit",
    "capture_features",
    "frontier_capture",
    "replace_features",
    "resolve_site",
    "site_order",
    "split_site_name",
    "uncompiled",
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


# ------------------------------------------------------------------------- capture/replace


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

TailFn = Callable[..., Any]

_INPLACE_OPERATORS = frozenset(
    {
        operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
        operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
        operator.ilshift, operator.irshift, operator.imatmul,
    }
)  # fmt: skip


Source = tuple[str, str, int]
"""Where a value crossing the cut comes from: ``("input", name, i)`` (the i-th model input) or
``("module", name, k)`` (the output of the k-th call of that module in a forward)."""


@dataclass(frozen=True)
class _Plan:
    """How to run the tail: ``fn(model, feature, *frontier)`` when fast, else ``reason`` for the
    fallback. ``sources`` say where the frontier values come from (empty for a clean cut)."""

    fn: TailFn | None
    reason: str = ""
    sources: tuple[Source, ...] = ()
    frontier: tuple[str, ...] = ()
    source_calls: tuple[int, ...] = ()


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


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in found for a in n.all_input_nodes):
            found.add(n)
    return found


def _writes_in_place(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` may write into its first argument (``+=``, ``relu_``, ``inplace=True``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(model.get_submodule(str(node.target)), "inplace", False) is True
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = str(node.target)
    else:
        return False
    return name.endswith("_") and not name.endswith("__")


def _frontier(
    graph: fx.Graph, after: set[fx.Node], site_node: fx.Node
) -> tuple[list[fx.Node], set[fx.Node], set[fx.Node]]:
    """What the tail needs from before the cut: ``(sources, replayed, constants)``.

    *Sources* are values the clean pass can hand over: the model's inputs (placeholders) and
    outputs of module calls. Function and method calls between them and the tail (a shortcut's
    ``x[:, :, ::2, ::2]``, a dense block's ``torch.cat``) are *replayed* in the tail from their
    sources; values that do not depend on the input are *constants* (copied as they are).
    """
    dependent = _input_dependent(graph)
    sources: list[fx.Node] = []
    replayed: set[fx.Node] = set()
    constants: set[fx.Node] = set()
    stack = [a for n in after for a in n.all_input_nodes if a is not site_node and a not in after]
    while stack:
        a = stack.pop()
        if a in constants or a in replayed or a in sources:
            continue
        if a not in dependent:
            constants.add(a)
            stack.extend(a.all_input_nodes)
        elif a.op in ("placeholder", "call_module"):
            sources.append(a)
        else:
            replayed.add(a)
            stack.extend(a.all_input_nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    sources.sort(key=order.__getitem__)
    return sources, replayed, constants


def _source_of(graph: fx.Graph, node: fx.Node) -> Source:
    """How the clean pass hands over ``node``: the i-th model input, or the k-th call of a module."""
    if node.op == "placeholder":
        index = [n for n in graph.nodes if n.op == "placeholder"].index(node)
        return ("input", str(node.target), index)
    calls = _call_module_nodes(graph, str(node.target))
    return ("module", str(node.target), calls.index(node))


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
    for r in sorted(replaced):
        nodes = _call_module_nodes(graph, r)
        if not nodes:
            raise AdvfeatError(f"feature site {r!r} is not called during the forward pass")
        if any(n not in after for n in nodes):
            raise AdvfeatError(
                f"feature site {r!r} does not run after the split site {site!r}; only sites "
                f"downstream of the split can be replaced in its tail"
            )
    sources, replayed, constants = _frontier(graph, after, site_node)
    copied = after | replayed
    written: set[fx.Node] = set()  # sources the tail writes into: it gets a copy of each
    for n in graph.nodes:
        if n in copied and n.args and _writes_in_place(n, model):
            first = n.args[0]
            if not isinstance(first, fx.Node) or (first not in sources and first not in replayed):
                continue
            if first in replayed or [u for u in first.users if u in copied] != [n]:
                return _Plan(
                    None,
                    f"{n.name} writes in place into {first.name}, a value from before the site",
                )
            written.add(first)
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {site_node: tail.placeholder("feature")}
    for i, n in enumerate(sources):
        env[n] = tail.placeholder(f"frontier_{i}")
    for n in sources:
        if n in written:  # e.g. ``h.add_(out)`` in the tail, with ``h`` from before the site
            env[n] = tail.call_method("clone", (env[n],))
    for n in graph.nodes:
        if n in copied or n in constants:
            env[n] = tail.node_copy(n, lambda a: env[a])
    compiled = fx.GraphModule(model, tail)
    compiled.graph.eliminate_dead_code()
    compiled.graph.lint()
    compiled.recompile()
    # The generated forward only reads ``self.<qualified name>``: run it against the live model.
    return _Plan(
        type(compiled).forward,
        sources=tuple(_source_of(graph, n) for n in sources),
        frontier=tuple(n.name for n in sources),
        source_calls=tuple(
            len(_call_module_nodes(graph, str(n.target))) if n.op == "call_module" else 0
            for n in sources
        ),
    )


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


# ------------------------------------------------------------------------ frontier capture


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
_MOVED_TO_BLOCKS = frozenset({"last_stage", "spread_blocks", "stage_blocks", "stages"})


def __getattr__(name: str) -> Any:
    """The default-site helpers live in :mod:`advfeat.blocks` (still importable from here)."""
    if name in _MOVED_TO_BLOCKS:
        from advfeat import blocks

        return getattr(blocks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
