"""Tail plans: an ``fx`` trace cut after a site, compiled to run against the live model.

The graph is cut after the site's node. The tail is compiled from the graph but runs against the
live model (``self`` is the model itself), so it shares every submodule, parameter and buffer.
Traces are cached per model and redone when module types, train/eval flags or the presence of
hooks change (Python state read by non-leaf modules, e.g. ``if self.training``, is frozen into a
trace). When the tail also needs values from before the site, they are its *frontier*
(:mod:`advfeat.sites.frontier` records them during the clean pass).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from torch import fx, nn

from advfeat.errors import AdvfeatError
from advfeat.sites.tracing import _ancestors, _has_hooks, _SiteTracer, _timm_notrace

__all__: list[str] = []

_PLAN_CACHE_SIZE = 32


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
