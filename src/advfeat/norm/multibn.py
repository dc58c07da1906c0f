"""Multi-branch batch normalization: AdvProp's auxiliary BN, generalised to any number of branches.

AdvProp (Xie et al. 2020, Sec. 4.2 and Algorithm 1) keeps a *main* BN for clean images and an
*auxiliary* BN for adversarial examples; every other layer is shared. Its fine-grained variant
(Sec. 5.4) keeps one auxiliary BN per data source; AFA's stage I (Wang et al., Sec. 4.1) keeps one
BN branch per attack strength; AdvBN (Shu et al.) routes adversarial features through an aux BN.

:func:`convert_multibn` turns every batch-norm layer of an *unmodified* model into a
:class:`MultiBatchNorm`, in place:

* the layer object stays the same; its class becomes a subclass of its own class (so it is still a
  ``torch.nn.modules.batchnorm._BatchNorm``, still a ``BatchNorm2d`` / ``SyncBatchNorm`` / timm
  ``BatchNormAct2d`` with its activation), and its own parameters and buffers are the *main*
  branch (the first branch name): the original ``state_dict`` keys are unchanged;
* every other branch is a copy of the original layer (same statistics, same affine parameters,
  same activation) stored under ``aux.<branch>``, e.g. ``layer1.0.bn1.aux.adv.weight``.

Routing is explicit and lives on each layer (set by context managers, restored on exit, nestable):
:func:`use_branch` sends whole batches through one branch (AdvProp attacks through its aux BN, and
any branch can be chosen at inference); :func:`split_branches` sends consecutive chunks of ONE
batch through different branches, each chunk normalised with its own batch statistics. Unlike
timm's ``SplitBatchNorm2d`` this works for any chunk sizes, BatchNorm1d/3d, SyncBN (every branch a
``SyncBatchNorm`` with ``sync=True``) and under ``nn.DataParallel`` for :func:`use_branch`.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.norm.stats import is_batchnorm_like

__all__ = [
    "BranchModel",
    "MultiBatchNorm",
    "branch_names",
    "branch_parameters",
    "convert_multibn",
    "convert_sync_multibn",
    "is_norm_leaf",
    "main_branch",
    "shared_parameters",
    "split_branches",
    "strip_aux_bn",
    "use_branch",
]

#: A layer's routing: one branch name (whole batches), or ``((name, size), ...)`` (split mode).
Route = str | tuple[tuple[str, int], ...]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class MultiBatchNorm(_BatchNorm):
    """A batch-norm layer with several branches of statistics and affine parameters.

    Created by :func:`convert_multibn` (never directly): each converted layer is an instance of a
    class ``Multi<Original>`` deriving from this class *and* from the layer's original class.
    The layer's own parameters/buffers are the main branch, ``aux[name]`` the others.
    ``track_running_stats`` switched off on the layer applies to every branch (each aux branch
    also honours its own flag, which is what :func:`~advfeat.norm.frozen_bn_statistics` toggles).
    A leaf for ``torch.fx`` tracers that use :func:`is_norm_leaf`.
    """

    _advfeat_norm_leaf = True
    _plain_class: type[_BatchNorm]
    aux: nn.ModuleDict
    _branches: tuple[str, ...]
    _route: Route
    _advfeat_name: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AdvfeatError(
            "MultiBatchNorm layers are created by advfeat.norm.convert_multibn(model, branches), "
            "which converts a model's existing batch-norm layers in place"
        )

    @property
    def branches(self) -> tuple[str, ...]:
        """Branch names, the main branch first."""
        return self._branches

    @property
    def main_branch(self) -> str:
        """The branch whose parameters are the layer's own (original ``state_dict`` keys)."""
        return self._branches[0]

    @property
    def route(self) -> Route:
        """The current routing (set by :func:`use_branch` / :func:`split_branches`)."""
        return self._route

    def branch_parameters(self, name: str) -> list[nn.Parameter]:
        """Parameters (BN affine, plus any of a timm activation) of branch ``name``."""
        _check_branch(name, self._branches)
        if name == self.main_branch:
            return [p for n, p in self.named_parameters() if not n.startswith("aux.")]
        return list(self.aux[name].parameters())

    def forward(self, input: Tensor) -> Tensor:
        route = self._route
        if isinstance(route, str):
            return self._run_branch(route, input)
        return self._run_split(route, input)

    def _run_branch(self, name: str, x: Tensor) -> Tensor:
        if name == self._branches[0]:
            return super().forward(x)
        branch = cast(_BatchNorm, self.aux[name])
        if self.track_running_stats or not branch.track_running_stats:
            return branch(x)
        branch.track_running_stats = False  # the layer-level switch covers every branch
        try:
            return branch(x)
        finally:
            branch.track_running_stats = True

    def _run_split(self, route: tuple[tuple[str, int], ...], x: Tensor) -> Tensor:
        if getattr(self, "_is_replica", False):
            raise AdvfeatError(
                "split_branches cannot be used under nn.DataParallel: a replica only sees a slice "
                "of the batch and cannot know where each branch's chunk lies. Use "
                "DistributedDataParallel (each process splits its own batch) or run each chunk "
                "with use_branch(model, name)."
            )
        total = sum(size for _, size in route)
        if total != x.shape[0]:
            raise AdvfeatError(
                f"split_branches sizes {dict(route)} sum to {total}, but batch-norm layer "
                f"{self._advfeat_name!r} received a batch of {x.shape[0]}; the sizes must add up "
                "to the batch size of every batch-norm input"
            )
        # SyncBN in a process group must take part in every collective, even with an empty chunk.
        keep_empty = (
            isinstance(self, nn.SyncBatchNorm)
            and self.training
            and dist.is_available()
            and dist.is_initialized()
        )
        outputs: list[Tensor] = []
        start = 0
        for name, size in route:
            if size > 0 or keep_empty:
                outputs.append(self._run_branch(name, x.narrow(0, start, size)))
            start += size
        if not outputs:
            return self._run_branch(self._branches[0], x)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branches={self._branches}"


class BranchModel(nn.Module):
    """``model`` with every batch sent through BN branch ``branch`` (parameters shared): how a
    multi-branch model is evaluated on one branch (AFA stage I, AdvBN's choice at inference)."""

    def __init__(self, model: nn.Module, branch: str) -> None:
        super().__init__()
        self.model = model
        self.branch = branch

    def forward(self, x: Tensor) -> Any:
        with use_branch(self.model, self.branch):
            return self.model(x)

    def extra_repr(self) -> str:
        return f"branch={self.branch!r}"


def is_norm_leaf(module: nn.Module) -> bool:
    """True for advfeat's routed norm layers (:class:`MultiBatchNorm`, AFA's ``FusedDualBN``).

    Their routing is Python control flow on layer state, so a ``torch.fx`` tracer must keep them
    as leaves: ``class T(fx.Tracer): is_leaf_module = lambda s, m, q: is_norm_leaf(m) or ...``.
    """
    return bool(getattr(type(module), "_advfeat_norm_leaf", False))


# ---------------------------------------------------------------------------------------------
# Dynamic ``Multi<Original>`` classes (registered here by name so that pickling works)

_MULTI_CLASSES: dict[type[_BatchNorm], type[MultiBatchNorm]] = {}


def _multi_class(plain: type[_BatchNorm]) -> type[MultiBatchNorm]:
    cls = _MULTI_CLASSES.get(plain)
    if cls is None:
        name = "Multi" + plain.__name__
        if name in globals():
            name = f"{name}_{len(_MULTI_CLASSES)}"
        doc = f"{plain.__name__} with several BN branches (see :class:`MultiBatchNorm`)."
        namespace = {"__module__": __name__, "__qualname__": name, "__doc__": doc}
        cls = cast(type[MultiBatchNorm], type(name, (MultiBatchNorm, plain), namespace))
        cls._plain_class = plain
        globals()[name] = cls
        _MULTI_CLASSES[plain] = cls
    return cls


for _plain in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    _multi_class(_plain)


def __getattr__(name: str) -> Any:  # lets pickles of converted timm models load in a new process
    if name in ("MultiBatchNormAct2d", "MultiSyncBatchNormAct"):
        from timm.layers import norm_act

        return _multi_class(getattr(norm_act, name[len("Multi") :]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Validation and lookup


def _validate_branches(branches: Sequence[str]) -> tuple[str, ...]:
    if isinstance(branches, str) or not isinstance(branches, Sequence):
        raise AdvfeatError(
            f"branches must be a sequence of names such as ('clean', 'adv'), got {branches!r}"
        )
    names = tuple(branches)
    if len(names) < 2:
        raise AdvfeatError(
            f"multi-branch BN needs at least 2 branch names (main first), got {names!r}"
        )
    reserved = set(dir(nn.ModuleDict))
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise AdvfeatError(
                f"branch names must be non-empty Python identifiers (e.g. 'clean', 'adv', "
                f"'eps0'), got {name!r} in {names!r}"
            )
        if name in reserved:
            raise AdvfeatError(
                f"branch name {name!r} is reserved (an attribute of nn.ModuleDict); choose another"
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AdvfeatError(f"branch names must be distinct; repeated: {duplicates} in {names!r}")
    return names


def _check_branch(name: str, branches: tuple[str, ...]) -> None:
    if name not in branches:
        raise unknown_name("BN branch", str(name), branches)


def _lost_routing_layers(model: nn.Module) -> list[str]:
    """Names of plain BN layers carrying an ``aux`` ModuleDict: a converter dropped the routing."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        and not isinstance(m, MultiBatchNorm)
        and isinstance(getattr(m, "aux", None), nn.ModuleDict)
    ]


def multibn_layers(model: nn.Module) -> list[MultiBatchNorm]:
    """Every :class:`MultiBatchNorm` of ``model`` (each once), checked to share one branch list."""
    layers = [m for m in model.modules() if isinstance(m, MultiBatchNorm)]
    if not layers:
        lost = _lost_routing_layers(model)
        if lost:
            raise AdvfeatError(
                f"the model's batch-norm layers (e.g. {lost[0]!r}) hold aux branches but lost "
                "their routing: a converter such as torch.nn.SyncBatchNorm.convert_sync_batchnorm "
                "rebuilt them as plain layers. Use advfeat.norm.convert_sync_multibn(model) (or "
                "convert_multibn(..., sync=True)) instead."
            )
        raise AdvfeatError(
            "the model has no multi-branch BN layer; call advfeat.norm.convert_multibn(model, "
            "branches) first"
        )
    branches = layers[0].branches
    for layer in layers[1:]:
        if layer.branches != branches:
            raise AdvfeatError(
                f"the model mixes multi-branch BN layers with different branches: {branches} "
                f"and {layer.branches} (layer {layer._advfeat_name!r})"
            )
    return layers


def require_default_routing(layers: Sequence[MultiBatchNorm], action: str) -> None:
    """Refuse to rebuild layers while a routing context is active (it would restore stale ones)."""
    for layer in layers:
        if layer.route != layer.main_branch:
            raise AdvfeatError(
                f"{action} replaces the model's BN layers: call it outside use_branch / "
                f"split_branches (layer {layer._advfeat_name!r} is routed to {layer.route!r})"
            )


# ---------------------------------------------------------------------------------------------
# Conversion


def replace_modules(
    model: nn.Module,
    selects: Callable[[nn.Module], bool],
    convert: Callable[[nn.Module, str], nn.Module],
) -> nn.Module:
    """Replace every selected submodule by ``convert(module, dotted_name)``; returns the root.

    Selected modules are not searched further; a module shared by several parents is converted
    once (at its first name) and the same result is put in every place.
    """
    done: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qualname = f"{prefix}{name}"
            if id(child) in done:
                new = done[id(child)]
            elif selects(child):
                new = convert(child, qualname)
                done[id(child)] = new
            else:
                done[id(child)] = child
                visit(child, qualname + ".")
                continue
            if new is not child:
                setattr(parent, name, new)

    if selects(model):
        return convert(model, "")
    visit(model, "")
    return model


def _clear_hooks(module: nn.Module) -> None:
    for attr in _HOOK_DICTS:
        hooks = getattr(module, attr, None)
        if hooks is not None:
            hooks.clear()


def _branch_copy(layer: _BatchNorm) -> _BatchNorm:
    """A fresh copy of a plain BN layer (statistics, affine, activation), without hooks/grads."""
    clone = copy.deepcopy(layer)
    for module in clone.modules():
        _clear_hooks(module)
    for p in clone.parameters():
        p.grad = None
    return clone


def _make_multi(
    layer: _BatchNorm,
    branches: tuple[str, ...],
    qualname: str,
    aux: dict[str, _BatchNorm] | None = None,
) -> MultiBatchNorm:
    if "aux" in layer._modules or "aux" in layer.__dict__:
        raise AdvfeatError(
            f"cannot convert batch-norm layer {qualname!r}: it already has an 'aux' attribute"
        )
    if aux is None:
        aux = {name: _branch_copy(layer) for name in branches[1:]}
    layer.__class__ = _multi_class(type(layer))
    multi: MultiBatchNorm = layer  # type: ignore[assignment]
    multi.aux = nn.ModuleDict(aux)
    multi._branches = branches
    multi._route = branches[0]
    multi._advfeat_name = qualname or "<root>"
    return multi


def _unmake_multi(layer: MultiBatchNorm) -> dict[str, _BatchNorm]:
    """Undo the conversion of ``layer`` in place; returns every branch as a plain layer."""
    aux = dict(layer.aux.items())
    branches = layer.branches
    del layer.aux
    for attr in ("_branches", "_route", "_advfeat_name"):
        layer.__dict__.pop(attr, None)
    plain: _BatchNorm = layer
    plain.__class__ = type(layer)._plain_class
    return {branches[0]: plain, **{name: cast(_BatchNorm, m) for name, m in aux.items()}}


def _timm_norm_act() -> Any:
    try:
        from timm.layers import norm_act
    except ImportError:  # timm is optional
        return None
    return norm_act


def _sync_variant(layer: _BatchNorm, process_group: Any = None) -> _BatchNorm:
    """``layer`` as a SyncBatchNorm sharing its parameters/buffers (timm BatchNormAct2d → SyncBatchNormAct)."""
    if isinstance(layer, nn.SyncBatchNorm):
        return layer
    norm_act = _timm_norm_act()
    if norm_act is not None and isinstance(layer, norm_act.BatchNormAct2d):
        synced = norm_act.convert_sync_batchnorm(layer, process_group)
    else:
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(layer, process_group)
    return synced  # type: ignore[no-any-return]


def _convertible(module: nn.Module) -> bool:
    """A batch-norm-like layer that :class:`MultiBatchNorm` can rebuild: one of torch's
    ``_BatchNorm`` classes (BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d, ...)."""
    return is_batchnorm_like(module) and isinstance(module, _BatchNorm)


def _check_convertible(layer: _BatchNorm, qualname: str) -> None:
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        raise AdvfeatError(
            f"batch-norm layer {qualname!r} is a lazy layer that has not seen an input yet; run "
            "one forward pass before convert_multibn"
        )


def convert_multibn(
    model: nn.Module, branches: Sequence[str] = ("clean", "adv"), *, sync: bool = False
) -> nn.Module:
    """Give every batch-norm layer of ``model`` one BN branch per name (AdvProp Sec. 4.2), in place.

    Converts BatchNorm1d/2d/3d, SyncBatchNorm and timm's BatchNormAct2d (activation kept in every
    branch). ``branches[0]`` is the main branch (the layer's own parameters; ``state_dict`` keys
    unchanged); the others start as copies of the layer's statistics and affine parameters.
    Eval outputs are unchanged bit for bit. With ``sync=True`` every branch is a
    ``SyncBatchNorm`` (for DistributedDataParallel; timm's BatchNormAct2d becomes its
    SyncBatchNormAct). Returns ``model`` (a new object only when ``model`` itself is a
    batch-norm layer converted with ``sync=True``). Converted models deep-copy and pickle (for
    torch's and timm's BN classes); checkpoints should still be ``state_dict`` s.
    """
    names = _validate_branches(branches)
    converted = [m for m in model.modules() if isinstance(m, MultiBatchNorm)]
    if converted:
        raise AdvfeatError(
            f"the model is already converted to multi-branch BN (branches {converted[0].branches});"
            " convert once with every branch you need, or strip_aux_bn(model) first"
        )
    lost = _lost_routing_layers(model)
    if lost:
        raise AdvfeatError(
            f"batch-norm layer {lost[0]!r} holds aux branches without routing (rebuilt by a "
            "sync-BN converter); convert the original model, then use convert_sync_multibn"
        )
    if not any(_convertible(m) for m in model.modules()):
        raise AdvfeatError(
            f"{type(model).__name__} has no batch-norm layer to convert (looked for "
            "BatchNorm1d/2d/3d, SyncBatchNorm and timm BatchNormAct2d)"
        )

    def convert(layer: nn.Module, qualname: str) -> nn.Module:
        bn = cast(_BatchNorm, layer)  # the selector picked _BatchNorm layers only
        _check_convertible(bn, qualname)
        if sync:
            bn = _sync_variant(bn)
        return _make_multi(bn, names, qualname)

    return replace_modules(model, _convertible, convert)


def convert_sync_multibn(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every branch of an already converted model a ``SyncBatchNorm``, keeping the routing.

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (and timm's) must not be used on a converted
    model: it rebuilds each layer as a plain ``SyncBatchNorm`` and silently drops the routing
    (advfeat then raises, naming this function). Parameters and buffers are shared, not copied, so
    optimizer parameter groups stay valid. In place; returns ``model``.
    """
    require_default_routing(multibn_layers(model), "convert_sync_multibn")

    def convert(layer: nn.Module, qualname: str) -> nn.Module:
        multi_in = cast(MultiBatchNorm, layer)  # the selector picked MultiBatchNorm layers only
        branches = multi_in.branches
        plain = _unmake_multi(multi_in)
        main = _sync_variant(plain[branches[0]], process_group)
        aux = {name: _sync_variant(plain[name], process_group) for name in branches[1:]}
        return _make_multi(main, branches, qualname, aux=aux)

    return replace_modules(model, lambda m: isinstance(m, MultiBatchNorm), convert)


def strip_aux_bn(model: nn.Module, keep: str | None = None, *, inplace: bool = False) -> nn.Module:
    """The plain model of the original architecture, with branch ``keep`` in every BN layer.

    AdvProp drops its auxiliary BNs at test time (Sec. 4.3); AdvBN may keep the aux one.
    ``keep`` defaults to the main branch; with an aux branch its statistics and affine
    parameters move into the main slot. The result's ``state_dict`` loads (``strict=True``) into a
    fresh instance of the original architecture (layers converted with ``sync=True`` stay
    ``SyncBatchNorm``, whose keys are the same). Works on a deep copy unless ``inplace=True``.
    """
    layers = multibn_layers(model)
    branches = layers[0].branches
    main = branches[0]
    keep = main if keep is None else keep
    _check_branch(keep, branches)
    if inplace:
        require_default_routing(layers, "strip_aux_bn(..., inplace=True)")
    target = model if inplace else copy.deepcopy(model)

    def strip(layer: nn.Module, qualname: str) -> nn.Module:
        plain = _unmake_multi(cast(MultiBatchNorm, layer))  # the selector picked these only
        kept = plain[main]
        if keep != main:
            kept.load_state_dict(plain[keep].state_dict())
        return kept

    return replace_modules(target, lambda m: isinstance(m, MultiBatchNorm), strip)


# ---------------------------------------------------------------------------------------------
# Routing


@contextmanager
def _routed(layers: list[MultiBatchNorm], route: Route) -> Iterator[None]:
    saved = [(layer, layer._route) for layer in layers]
    for layer in layers:
        layer._route = route
    try:
        yield
    finally:
        for layer, previous in saved:
            layer._route = previous


@contextmanager
def use_branch(model: nn.Module, name: str) -> Iterator[None]:
    """Send whole batches through BN branch ``name`` (AdvProp Alg. 1: attack and L^a via aux BN).

    Nestable; the previous routing is restored on exit. Works under ``nn.DataParallel``.
    """
    layers = multibn_layers(model)
    _check_branch(name, layers[0].branches)
    with _routed(layers, name):
        yield


@contextmanager
def split_branches(model: nn.Module, chunks: Sequence[tuple[str, int]]) -> Iterator[None]:
    """Route consecutive chunks of ONE batch through different branches, e.g. ``[clean | adv]``.

    ``chunks`` is ``[(branch, size), ...]`` in batch order; the sizes (any, zero allowed) must add
    up to the batch size seen by every BN layer. Each chunk is normalised with its own batch
    statistics and updates only its branch's running statistics, exactly as if the chunks were run
    separately with :func:`use_branch`. Not available inside ``nn.DataParallel`` (use DDP).
    """
    layers = multibn_layers(model)
    branches = layers[0].branches
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence) or not chunks:
        raise AdvfeatError(
            f"chunks must be a non-empty list of (branch, size) pairs, e.g. [('clean', 64), "
            f"('adv', 64)], got {chunks!r}"
        )
    route: list[tuple[str, int]] = []
    for item in chunks:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise AdvfeatError(f"each chunk must be a (branch, size) pair, got {item!r}")
        name, size = item
        _check_branch(name, branches)
        try:
            count = operator.index(size)
        except TypeError:
            count = -1
        if isinstance(size, bool) or count < 0:
            raise AdvfeatError(f"chunk size for branch {name!r} must be an int >= 0, got {size!r}")
        route.append((name, count))
    names = [name for name, _ in route]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdvfeatError(f"each branch may appear once in split_branches; repeated: {repeated}")
    with _routed(layers, tuple(route)):
        yield


# ---------------------------------------------------------------------------------------------
# Queries


def branch_names(model: nn.Module) -> tuple[str, ...]:
    """The BN branch names of a converted model, the main branch first."""
    return multibn_layers(model)[0].branches


def main_branch(model: nn.Module) -> str:
    """The main branch of a converted model (the one whose keys are the original ones)."""
    return branch_names(model)[0]


def branch_parameters(model: nn.Module, branch: str) -> list[nn.Parameter]:
    """The parameters of BN branch ``branch`` in every layer (a per-branch parameter group).

    The groups of all branches and :func:`shared_parameters` partition ``model.parameters()``.
    """
    layers = multibn_layers(model)
    _check_branch(branch, layers[0].branches)
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for layer in layers:
        for p in layer.branch_parameters(branch):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that belongs to no BN branch (convolutions, linear, ...)."""
    layers = multibn_layers(model)
    owned = {
        id(p) for layer in layers for name in layer.branches for p in layer.branch_parameters(name)
    }
    return [p for p in model.parameters() if id(p) not in owned]
