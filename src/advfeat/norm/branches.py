"""Multi-branch normalization for any norm family: conversion, routing, stripping, queries.

AdvProp (Xie et al. 2020, Sec. 4.2 and Algorithm 1) keeps a *main* BN for clean images and an
*auxiliary* BN for adversarial examples; every other layer is shared. Its fine-grained variant
(Sec. 5.4) keeps one auxiliary BN per data source; AFA's stage I (Wang et al., Sec. 4.1) keeps one
branch per attack strength; AdvBN (Shu et al.) routes adversarial features through an aux BN.
This module is the mechanism, apart from any family (:mod:`advfeat.norm.families` says which
layers can be branched and what a branch owns; :mod:`advfeat.norm.multibn` is batch norm's part).

:func:`convert_branches` turns every normalization layer of an *unmodified* model into a
:class:`BranchNorm`, in place:

* the layer object stays the same; its class becomes a subclass of its own class (so it is still
  a ``BatchNorm2d`` / ``LayerNorm`` / timm ``LayerNorm2d`` ...), and its own parameters and
  buffers are the *main* branch (the first branch name): the original ``state_dict`` keys are
  unchanged;
* every other branch is a copy of the original layer stored under ``aux.<branch>``, e.g.
  ``blocks.0.norm1.aux.adv.weight``; what the copy does not own (:data:`~advfeat.norm.AUX_NORMS`)
  is the main branch's tensor itself.

Routing is explicit and lives on each layer (set by context managers, restored on exit, nestable):
:func:`use_branch` sends whole batches through one branch; :func:`split_branches` sends
consecutive chunks of ONE batch through different branches.
"""

from __future__ import annotations

import copy
import importlib
import operator
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.norm.families import (
    NormFamily,
    check_aux_norm,
    norm_families,
    norm_family,
    norm_family_of,
)

__all__ = [
    "BranchModel",
    "BranchNorm",
    "branch_layers",
    "branch_names",
    "branch_parameters",
    "convert_branches",
    "convert_sync_branches",
    "is_norm_leaf",
    "main_branch",
    "shared_parameters",
    "split_branches",
    "strip_branches",
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


class BranchNorm(nn.Module):
    """A normalization layer with several branches (created by :func:`convert_branches` only).

    Each converted layer is an instance of a class ``Multi<Original>`` deriving from this class
    (or a family's subclass of it, e.g. :class:`~advfeat.norm.MultiBatchNorm`) *and* from the
    layer's original class. The layer's own parameters/buffers are the main branch, ``aux[name]``
    the others. A leaf for ``torch.fx`` tracers that use :func:`is_norm_leaf`.
    """

    _advfeat_norm_leaf = True
    _plain_class: type[nn.Module]
    aux: nn.ModuleDict
    _branches: tuple[str, ...]
    _route: Route
    _advfeat_name: str
    _family_name: str
    _aux_norm: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AdvfeatError(
            f"{type(self).__name__} layers are created by advfeat.norm.convert_branches(model, "
            "branches) (or convert_multibn), which converts a model's existing normalization "
            "layers in place"
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

    @property
    def family(self) -> NormFamily:
        """The norm family the layer was converted as."""
        return norm_family(self._family_name)

    @property
    def aux_norm(self) -> str:
        """``"separate"`` or ``"shared"``: the reading of the auxiliary branches."""
        return self._aux_norm

    def branch_parameters(self, name: str) -> list[nn.Parameter]:
        """Parameters owned by branch ``name`` (none for an aux branch that shares them)."""
        _check_branch(name, self._branches)
        main = [p for n, p in self.named_parameters() if not n.startswith("aux.")]
        if name == self.main_branch:
            return main
        of_main = {id(p) for p in main}
        return [p for p in self.aux[name].parameters() if id(p) not in of_main]

    def forward(self, input: Tensor) -> Tensor:
        route = self._route
        if isinstance(route, str):
            return self._run_branch(route, input)
        return self._run_split(route, input)

    def _run_branch(self, name: str, x: Tensor) -> Tensor:
        if name == self._branches[0]:
            return cast(Tensor, super().forward(x))  # the original class's forward
        return self._run_aux(name, x)

    def _run_aux(self, name: str, x: Tensor) -> Tensor:
        """Auxiliary branch ``name`` on ``x`` (a family may add what the layer's flags imply)."""
        return cast(Tensor, self.aux[name](x))

    def _keeps_empty_chunks(self) -> bool:
        """Whether an empty chunk must still run (a layer in a collective, e.g. SyncBN)."""
        return False

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
                f"split_branches sizes {dict(route)} sum to {total}, but normalization layer "
                f"{self._advfeat_name!r} received a batch of {x.shape[0]}; the sizes must add up "
                "to the batch size of every normalization input"
            )
        keep_empty = self._keeps_empty_chunks()
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
        shared = ", aux_norm=shared" if self._aux_norm == "shared" else ""
        return f"{super().extra_repr()}, branches={self._branches}{shared}"


class BranchModel(nn.Module):
    """``model`` with every batch sent through branch ``branch`` (parameters shared): how a
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
    """True for advfeat's routed norm layers (:class:`BranchNorm`, AFA's ``FusedDualBN``).

    Their routing is Python control flow on layer state, so a ``torch.fx`` tracer must keep them
    as leaves: ``class T(fx.Tracer): is_leaf_module = lambda s, m, q: is_norm_leaf(m) or ...``.
    """
    return bool(getattr(type(module), "_advfeat_norm_leaf", False))


# ---------------------------------------------------------------------------------------------
# Dynamic ``Multi<Original>`` classes, registered in this module by name so that pickling works

_BRANCH_CLASSES: dict[tuple[type[nn.Module], type[BranchNorm]], type[BranchNorm]] = {}


def _class_name(plain: type[nn.Module]) -> str:
    """``Multi<Name>`` for torch's classes and batch norms (timm's BatchNormAct2d), else the
    name followed by its module, so that a pickle names the class in any process."""
    if plain.__module__.startswith("torch.") or issubclass(plain, _BatchNorm):
        return "Multi" + plain.__name__
    return f"Multi{plain.__name__}_in_{plain.__module__.replace('.', '_')}"


def branch_class(plain: type[nn.Module], base: type[BranchNorm] = BranchNorm) -> type[BranchNorm]:
    """The class ``Multi<plain>`` deriving from ``base`` and ``plain`` (made once)."""
    key = (plain, base)
    cls = _BRANCH_CLASSES.get(key)
    if cls is None:
        name = _class_name(plain)
        if name in globals():
            name = f"{name}_{len(_BRANCH_CLASSES)}"
        doc = f"{plain.__name__} with several branches (see :class:`{base.__name__}`)."
        namespace = {"__module__": __name__, "__qualname__": name, "__doc__": doc}
        cls = cast(type[BranchNorm], type(name, (base, plain), namespace))
        cls._plain_class = plain
        globals()[name] = cls
        _BRANCH_CLASSES[key] = cls
    return cls


def _known_plain_classes() -> Iterator[type[nn.Module]]:
    for family in norm_families():
        yield from family.classes
    for module_name in ("timm.layers", "torchvision.models.convnext"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # optional packages
            continue
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, nn.Module):
                yield value


def __getattr__(name: str) -> Any:  # lets pickles of converted models load in a new process
    if name.startswith("Multi"):
        for plain in _known_plain_classes():
            family = norm_family_of_class(plain)
            if family is not None and _class_name(plain) == name:
                return branch_class(plain, _family_base(family))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def norm_family_of_class(plain: type[nn.Module]) -> NormFamily | None:
    """The family of a class (``None`` for classes no family registers by class)."""
    for family in norm_families():
        if any(issubclass(plain, cls) for cls in family.classes):
            return family
    return None


def _family_base(family: NormFamily) -> type[BranchNorm]:
    base = family.base or BranchNorm
    if not (isinstance(base, type) and issubclass(base, BranchNorm)):
        raise AdvfeatError(f"norm family {family.name!r}: base must subclass BranchNorm")
    return base


# ---------------------------------------------------------------------------------------------
# Validation and lookup


def validate_branches(branches: Sequence[str]) -> tuple[str, ...]:
    """The branch names as a tuple, checked: at least two distinct identifiers, none reserved."""
    if isinstance(branches, str) or not isinstance(branches, Sequence):
        raise AdvfeatError(
            f"branches must be a sequence of names such as ('clean', 'adv'), got {branches!r}"
        )
    names = tuple(branches)
    if len(names) < 2:
        raise AdvfeatError(
            f"multi-branch normalization needs at least 2 branch names (main first), got {names!r}"
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


def lost_routing_layers(model: nn.Module) -> list[str]:
    """Names of plain norm layers carrying an ``aux`` ModuleDict: a converter (e.g. torch's
    SyncBN converter) rebuilt a converted layer and dropped its routing."""
    return [
        name
        for name, m in model.named_modules()
        if not isinstance(m, BranchNorm)
        and norm_family_of(m) is not None
        and isinstance(getattr(m, "aux", None), nn.ModuleDict)
    ]


def branch_layers(model: nn.Module) -> list[BranchNorm]:
    """Every :class:`BranchNorm` of ``model`` (each once), checked to share one branch list."""
    layers = [m for m in model.modules() if isinstance(m, BranchNorm)]
    if not layers:
        lost = lost_routing_layers(model)
        if lost:
            raise AdvfeatError(
                f"the model's normalization layers (e.g. {lost[0]!r}) hold aux branches but lost "
                "their routing: a converter such as torch.nn.SyncBatchNorm.convert_sync_batchnorm "
                "rebuilt them as plain layers. Use advfeat.norm.convert_sync_multibn(model) (or "
                "convert_multibn(..., sync=True)) instead."
            )
        raise AdvfeatError(
            "the model has no multi-branch BN (nor any other multi-branch norm layer); call "
            "advfeat.norm.convert_branches(model, branches) (or convert_multibn for BN only) first"
        )
    branches = layers[0].branches
    for layer in layers[1:]:
        if layer.branches != branches:
            raise AdvfeatError(
                f"the model mixes multi-branch layers with different branches: {branches} "
                f"and {layer.branches} (layer {layer._advfeat_name!r})"
            )
    return layers


def has_branches(model: nn.Module) -> bool:
    """Whether ``model`` holds a multi-branch normalization layer."""
    return any(isinstance(m, BranchNorm) for m in model.modules())


def require_default_routing(layers: Sequence[BranchNorm], action: str) -> None:
    """Refuse to rebuild layers while a routing context is active (it would restore stale ones)."""
    for layer in layers:
        if layer.route != layer.main_branch:
            raise AdvfeatError(
                f"{action} replaces the model's normalization layers: call it outside use_branch "
                f"/ split_branches (layer {layer._advfeat_name!r} is routed to {layer.route!r})"
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


def branch_copy(layer: nn.Module, owned: Collection[str]) -> nn.Module:
    """An auxiliary branch of the plain ``layer``: a copy without hooks or gradients, owning
    ``owned`` (``"affine"``: its parameters, ``"statistics"``: its buffers); what it does not
    own is the main branch's tensor itself (shared, not copied)."""
    clone = copy.deepcopy(layer)
    for module in clone.modules():
        _clear_hooks(module)
    for p in clone.parameters():
        p.grad = None
    originals = dict(layer.named_modules())
    for name, sub in clone.named_modules():
        source = originals[name]
        if "affine" not in owned:
            sub._parameters.update(source._parameters)
        if "statistics" not in owned:
            sub._buffers.update(source._buffers)
    return clone


def make_branched(
    layer: nn.Module,
    branches: tuple[str, ...],
    qualname: str,
    family: NormFamily,
    aux_norm: str,
    aux: dict[str, nn.Module] | None = None,
) -> BranchNorm:
    """Turn the plain ``layer`` into a :class:`BranchNorm` in place (``aux``: given branches)."""
    if "aux" in layer._modules or "aux" in layer.__dict__:
        raise AdvfeatError(
            f"cannot convert normalization layer {qualname!r}: it already has an 'aux' attribute"
        )
    if aux is None:
        owned = family.owned_by_aux(aux_norm)
        aux = {name: branch_copy(layer, owned) for name in branches[1:]}
    layer.__class__ = branch_class(type(layer), _family_base(family))
    multi = cast(BranchNorm, layer)
    multi.aux = nn.ModuleDict(aux)
    multi._branches = branches
    multi._route = branches[0]
    multi._advfeat_name = qualname or "<root>"
    multi._family_name = family.name
    multi._aux_norm = aux_norm
    return multi


def unmake_branched(layer: BranchNorm) -> dict[str, nn.Module]:
    """Undo the conversion of ``layer`` in place; returns every branch as a plain layer."""
    aux = dict(layer.aux.items())
    branches = layer.branches
    del layer.aux
    for attr in ("_branches", "_route", "_advfeat_name", "_family_name", "_aux_norm"):
        layer.__dict__.pop(attr, None)
    plain: nn.Module = layer
    plain.__class__ = type(layer)._plain_class
    return {branches[0]: plain, **aux}


def _check_convertible(layer: nn.Module, qualname: str) -> None:
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        raise AdvfeatError(
            f"normalization layer {qualname!r} is a lazy layer that has not seen an input yet; "
            "run one forward pass before converting it"
        )


def convert_branches(
    model: nn.Module,
    branches: Sequence[str] = ("clean", "adv"),
    *,
    aux_norm: str = "separate",
    families: Collection[str] | None = None,
    sync: bool = False,
) -> nn.Module:
    """Give every normalization layer of ``model`` one branch per name (AdvProp Sec. 4.2), in place.

    Converts the layers of every registered family (:mod:`advfeat.norm.families`: batch norm,
    LayerNorm, GroupNorm, RMSNorm from torch, torchvision and timm, a user's class), or of the
    families named in ``families``. ``branches[0]`` is the main branch (the layer's own tensors;
    ``state_dict`` keys unchanged); the others start as copies. ``aux_norm="separate"``: an aux
    branch owns what its family declares (BN: statistics and affine parameters; LayerNorm:
    affine parameters); ``"shared"``: the affine parameters stay the main branch's (the papers
    do not say which reading a LayerNorm model needs). Eval outputs are unchanged bit for bit.
    ``sync=True`` makes every branch of a family with a cross-process variant use it (SyncBN).
    Returns ``model`` (a new object only when ``model`` itself is a layer rebuilt by ``sync``).
    """
    names = validate_branches(branches)
    check_aux_norm(aux_norm)
    if families is not None:
        families = [norm_family(name).name for name in families]
    converted = [m for m in model.modules() if isinstance(m, BranchNorm)]
    if converted:
        raise AdvfeatError(
            f"the model is already converted to multi-branch normalization (branches "
            f"{converted[0].branches}); convert once with every branch you need, or "
            "strip_branches(model) first"
        )
    lost = lost_routing_layers(model)
    if lost:
        raise AdvfeatError(
            f"normalization layer {lost[0]!r} holds aux branches without routing (rebuilt by a "
            "sync-BN converter); convert the original model, then use convert_sync_multibn"
        )

    def selects(module: nn.Module) -> bool:
        return norm_family_of(module, families) is not None

    if not any(selects(m) for m in model.modules()):
        looked = families if families is not None else [f.name for f in norm_families()]
        raise AdvfeatError(
            f"{type(model).__name__} has no normalization layer that can be given branches "
            f"(families {sorted(looked)}; a class of your own: advfeat.norm.register_norm_family)"
        )

    def convert(layer: nn.Module, qualname: str) -> nn.Module:
        family = norm_family_of(layer, families)
        if family is None:  # the selector picked layers of a family only
            raise AssertionError(qualname)
        _check_convertible(layer, qualname)
        if sync and family.sync is not None:
            layer = family.sync(layer, None)
        return make_branched(layer, names, qualname, family, aux_norm)

    return replace_modules(model, selects, convert)


def convert_sync_branches(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every branch of a converted model use its family's cross-process variant (SyncBN),
    keeping the routing; layers of families without one (LayerNorm, GroupNorm) stay as they are.

    Parameters and buffers are shared, not copied, so optimizer parameter groups stay valid.
    In place; returns ``model``.
    """
    require_default_routing(branch_layers(model), "convert_sync_multibn")

    def selects(module: nn.Module) -> bool:
        return isinstance(module, BranchNorm) and module.family.sync is not None

    def convert(layer: nn.Module, qualname: str) -> nn.Module:
        multi_in = cast(BranchNorm, layer)  # the selector picked BranchNorm layers only
        branches, family, aux_norm = multi_in.branches, multi_in.family, multi_in.aux_norm
        sync = cast(Callable[[nn.Module, Any], nn.Module], family.sync)
        plain = unmake_branched(multi_in)
        main = sync(plain[branches[0]], process_group)
        aux = {name: sync(plain[name], process_group) for name in branches[1:]}
        return make_branched(main, branches, qualname, family, aux_norm, aux=aux)

    return replace_modules(model, selects, convert)


def strip_branches(
    model: nn.Module, keep: str | None = None, *, inplace: bool = False
) -> nn.Module:
    """The plain model of the original architecture, with branch ``keep`` in every layer.

    AdvProp drops its auxiliary BNs at test time (Sec. 4.3); AdvBN may keep the aux one.
    ``keep`` defaults to the main branch; with an aux branch its tensors move into the main
    slot. The result's ``state_dict`` loads (``strict=True``) into a fresh instance of the
    original architecture (layers converted with ``sync=True`` stay ``SyncBatchNorm``, whose keys
    are the same). Works on a deep copy unless ``inplace=True``.
    """
    layers = branch_layers(model)
    branches = layers[0].branches
    main = branches[0]
    keep = main if keep is None else keep
    _check_branch(keep, branches)
    if inplace:
        require_default_routing(layers, "strip_aux_bn(..., inplace=True)")
    target = model if inplace else copy.deepcopy(model)

    def strip(layer: nn.Module, qualname: str) -> nn.Module:
        plain = unmake_branched(cast(BranchNorm, layer))  # the selector picked these only
        kept = plain[main]
        if keep != main:
            kept.load_state_dict(plain[keep].state_dict())
        return kept

    return replace_modules(target, lambda m: isinstance(m, BranchNorm), strip)


# ---------------------------------------------------------------------------------------------
# Routing


@contextmanager
def _routed(layers: list[BranchNorm], route: Route) -> Iterator[None]:
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
    """Send whole batches through branch ``name`` (AdvProp Alg. 1: attack and L^a via aux BN).

    Nestable; the previous routing is restored on exit. Works under ``nn.DataParallel``.
    """
    layers = branch_layers(model)
    _check_branch(name, layers[0].branches)
    with _routed(layers, name):
        yield


@contextmanager
def split_branches(model: nn.Module, chunks: Sequence[tuple[str, int]]) -> Iterator[None]:
    """Route consecutive chunks of ONE batch through different branches, e.g. ``[clean | adv]``.

    ``chunks`` is ``[(branch, size), ...]`` in batch order; the sizes (any, zero allowed) must add
    up to the batch size seen by every converted layer. Each chunk is normalised on its own (BN:
    its own batch statistics, updating only its branch's running statistics), exactly as if the
    chunks were run separately with :func:`use_branch`. Not available inside ``nn.DataParallel``.
    """
    layers = branch_layers(model)
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
    """The branch names of a converted model, the main branch first."""
    return branch_layers(model)[0].branches


def main_branch(model: nn.Module) -> str:
    """The main branch of a converted model (the one whose keys are the original ones)."""
    return branch_names(model)[0]


def branch_parameters(model: nn.Module, branch: str) -> list[nn.Parameter]:
    """The parameters owned by branch ``branch`` in every layer (a per-branch parameter group).

    The groups of all branches and :func:`shared_parameters` partition ``model.parameters()``
    (an aux branch that shares the main branch's affine parameters owns none).
    """
    layers = branch_layers(model)
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
    """Every parameter of ``model`` that belongs to no branch (convolutions, linear, ...)."""
    layers = branch_layers(model)
    owned = {
        id(p) for layer in layers for name in layer.branches for p in layer.branch_parameters(name)
    }
    return [p for p in model.parameters() if id(p) not in owned]
