"""Norm families: which normalization layers can be given branches, and what a branch owns.

AdvProp (Xie et al. 2020, Sec. 4.2) gives adversarial examples an auxiliary *batch norm*; the
branch mechanism of :mod:`advfeat.norm.branches` (routing, the explicit branch, stripping at
export, SyncBN per branch) works for any normalization layer. A *family* says which layers it
covers and what each branch of such a layer owns:

* ``"statistics"`` — its buffers (BN's running mean / variance and batch counter);
* ``"affine"`` — its parameters (the affine weight / bias, and those of an attached activation).

Batch norm owns both (registered by :mod:`advfeat.norm.multibn`); LayerNorm, GroupNorm and
RMSNorm have no running statistics, so a branch owns only their affine parameters. torch's,
torchvision's and timm's layers are registered here; a user's own norm class is one call::

    register_norm_family(MyNorm, owned=("affine",))

Two predicates answer two questions: :func:`can_have_branches` (any registered family) and
:func:`advfeat.norm.stats.has_running_statistics` (BN-like layers whose statistics attacks
freeze). A LayerNorm can be given branches but has no running statistics.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from advfeat.errors import AdvfeatError, unknown_name

__all__ = [
    "AUX_NORMS",
    "OWNED_STATE",
    "NormFamily",
    "can_have_branches",
    "norm_families",
    "norm_family",
    "norm_family_of",
    "register_norm_family",
    "unregister_norm_family",
]

OWNED_STATE = ("statistics", "affine")
"""What a branch can own: ``"statistics"`` (the layer's buffers), ``"affine"`` (its parameters)."""

AUX_NORMS = ("separate", "shared")
"""Readings of an auxiliary branch: ``"separate"`` — the branch owns everything its family
declares; ``"shared"`` — the affine parameters stay the main branch's (only statistics, where the
family has them, are per branch: on a LayerNorm model the branches then differ only in routing)."""

Selector = Callable[[nn.Module], bool]
SyncConverter = Callable[[nn.Module, Any], nn.Module]
T = TypeVar("T")


@dataclass(frozen=True)
class NormFamily:
    """A family of normalization layers that can be given branches.

    ``selects(module)`` recognises its layers; ``owned`` is what a separate branch owns (a subset
    of :data:`OWNED_STATE`); ``sync`` turns a layer into its cross-process variant sharing its
    tensors (BN's SyncBatchNorm; ``None`` for per-sample norms, which need none); ``base`` is the
    branch class the converted layers derive from (default :class:`~advfeat.norm.BranchNorm`).
    """

    name: str
    selects: Selector
    owned: frozenset[str]
    sync: SyncConverter | None = None
    base: type[nn.Module] | None = None
    classes: tuple[type[nn.Module], ...] = ()

    def owned_by_aux(self, aux_norm: str) -> frozenset[str]:
        """What an auxiliary branch owns under the reading ``aux_norm`` (:data:`AUX_NORMS`)."""
        check_aux_norm(aux_norm)
        return self.owned if aux_norm == "separate" else self.owned - {"affine"}


_FAMILIES: list[NormFamily] = []


def check_aux_norm(aux_norm: str) -> str:
    """``aux_norm`` if it is one of :data:`AUX_NORMS`, else a clear error."""
    if aux_norm not in AUX_NORMS:
        raise unknown_name("aux_norm reading", str(aux_norm), AUX_NORMS)
    return aux_norm


def register_norm_family(
    cls_or_predicate: T,
    *,
    owned: Iterable[str] = ("affine",),
    name: str | None = None,
    sync: SyncConverter | None = None,
    base: type[nn.Module] | None = None,
) -> T:
    """Make layers of a class (and its subclasses), or layers a predicate accepts, branchable.

    ``owned`` lists what a branch owns (:data:`OWNED_STATE`). The layer's own forward is used by
    every branch, so any class whose state is its parameters and buffers works. Registering a
    ``name`` again replaces that family; the latest registration is consulted first. Returns
    ``cls_or_predicate`` (usable as a class decorator).
    """
    owned_set = frozenset(owned)
    unknown = sorted(owned_set - set(OWNED_STATE))
    if unknown or isinstance(owned, str):
        raise AdvfeatError(
            f"owned must be a collection of {OWNED_STATE}, got {owned!r}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    if isinstance(cls_or_predicate, type):
        if not issubclass(cls_or_predicate, nn.Module):
            raise TypeError(
                f"register_norm_family needs an nn.Module class, got {cls_or_predicate!r}"
            )
        classes: tuple[type[nn.Module], ...] = (cls_or_predicate,)
        plain = cls_or_predicate

        def selects(module: nn.Module) -> bool:
            return isinstance(module, plain)

        label = name or cls_or_predicate.__name__
    elif callable(cls_or_predicate):
        classes = ()
        selects = cls_or_predicate
        label = name or str(getattr(cls_or_predicate, "__name__", repr(cls_or_predicate)))
    else:
        raise TypeError(
            f"register_norm_family needs an nn.Module class or a predicate, got {cls_or_predicate!r}"
        )
    family = NormFamily(label, selects, owned_set, sync=sync, base=base, classes=classes)
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != label]
    _FAMILIES.append(family)
    return cls_or_predicate


def unregister_norm_family(name: str) -> None:
    """Remove the family ``name`` (tests; a user undoing a registration)."""
    norm_family(name)
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]


def norm_families() -> tuple[NormFamily, ...]:
    """Every registered family, the one consulted first first."""
    return tuple(reversed(_FAMILIES))


def norm_family(name: str) -> NormFamily:
    """The registered family called ``name``."""
    for family in _FAMILIES:
        if family.name == name:
            return family
    raise unknown_name("norm family", str(name), [f.name for f in _FAMILIES])


def norm_family_of(module: nn.Module, among: Collection[str] | None = None) -> NormFamily | None:
    """The family ``module`` belongs to (the latest matching registration), or ``None``.

    ``among`` restricts the search to the families of those names.
    """
    for family in norm_families():
        if (among is None or family.name in among) and family.selects(module):
            return family
    return None


def can_have_branches(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer of a registered family (BN, LayerNorm,
    GroupNorm, RMSNorm, a user's class): what multi-branch conversion converts."""
    return norm_family_of(module) is not None


# ---------------------------------------------------------------------------------------------
# torch's, torchvision's and timm's families (BN is registered by advfeat.norm.multibn)


def _timm_rms_classes() -> tuple[type[nn.Module], ...]:
    """timm's RMS-style norms (not subclasses of torch's), only once timm has been imported."""
    layers = sys.modules.get("timm.layers")
    if layers is None:
        return ()
    names = ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d")
    return tuple(cls for n in names if isinstance(cls := getattr(layers, n, None), type))


def rms_norm(module: nn.Module) -> bool:
    """torch's ``nn.RMSNorm`` and timm's RmsNorm / RmsNorm2d / SimpleNorm (and subclasses)."""
    torch_rms = getattr(nn, "RMSNorm", None)
    if torch_rms is not None and isinstance(module, torch_rms):
        return True
    return isinstance(module, _timm_rms_classes())


# nn.LayerNorm covers timm's LayerNorm, LayerNorm2d, LayerNormAct* and torchvision's LayerNorm2d
# (ConvNeXt); nn.GroupNorm covers timm's GroupNorm, GroupNorm1 and GroupNormAct.
register_norm_family(nn.LayerNorm, owned=("affine",), name="layernorm")
register_norm_family(nn.GroupNorm, owned=("affine",), name="groupnorm")
register_norm_family(rms_norm, owned=("affine",), name="rmsnorm")
