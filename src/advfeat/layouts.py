"""Feature layouts: where the channels of a site's feature are, and what "per channel" means.

Every feature-space statistic of the papers is per channel: A-FAN's adversarial feature
normalization uses "the routine of batch normalization" (A-FAN Eq. 6), AdvBN perturbs "one
scalar entry per channel" of the batch mean and standard deviation (AdvBN Eq. 1-2), and the
feature divergence models each channel as a normal distribution (AdvBN Eq. 4-5). Batch norm
reduces over every dimension but C; which dimensions those are depends on the layout:

* ``channels_first`` — ``(N, C, H, W)`` (or ``(N, C)``, ``(N, C, L)``, ``(N, C, D, H, W)``):
  convolutions and batch norm. Statistics over ``(0, 2, 3)``.
* ``channels_last`` — ``(N, H, W, C)``: inside ConvNeXt blocks (where LayerNorm and the MLP run
  on the last dimension) and Swin stages. Statistics over ``(0, 1, 2)``.
* ``tokens`` — ``(N, L, C)``: ViT / DeiT blocks, with ``prefix_tokens`` class (and
  distillation or register) tokens first. Statistics over ``(0, 1)`` of the patch tokens only:
  a class token is a learned summary, not a position of the image, so it does not enter the
  statistics; the per-channel map they define (A-FAN's re-normalization, AdvBN's multipliers)
  still applies to every token. Declare ``tokens:0`` to count every token.

A site's layout is chosen, in this order, by the method option ``layout`` (default ``"auto"``),
by the model's declaration, a ``feature_layouts`` dict keyed by site name (on the model or on
any module along the site's dotted path, with names relative to it), as timm models declare
``feature_info``::

    model.feature_layouts = {"blocks.11": "tokens:1", "stages.2.blocks.0.norm": "channels_last"}

and otherwise by :func:`infer_layout` from the module's type and output shape; a layout that
is inferred and is not the classic ``(N, C, H, W)`` is reported once per model and site with a
:class:`LayoutInferred` warning (silence it with ``warnings.filterwarnings``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.norm.stats import is_batchnorm_like
from advfeat.sites import resolve_site, split_site_name

__all__ = [
    "AUTO_LAYOUT",
    "CHANNELS_FIRST",
    "LAYOUT_KINDS",
    "FeatureLayout",
    "LayoutInferred",
    "LayoutSpec",
    "declared_layout",
    "infer_layout",
    "parse_layout",
    "site_layout",
]

LayoutKind = Literal["channels_first", "channels_last", "tokens"]
LAYOUT_KINDS: tuple[LayoutKind, ...] = ("channels_first", "channels_last", "tokens")
AUTO_LAYOUT = "auto"
_SHAPES = {
    "channels_first": "(N, C, H, W)",
    "channels_last": "(N, H, W, C)",
    "tokens": "(N, L, C)",
}


class LayoutInferred(UserWarning):
    """advfeat inferred a site's feature layout (not declared by the model or the user)."""


@dataclass(frozen=True)
class FeatureLayout:
    """Where the channel dimension of a feature ``(N, ...)`` is (module docstring).

    ``prefix_tokens`` (tokens only): how many leading tokens (class, distillation, register
    tokens) are left out of the per-channel statistics.
    """

    kind: LayoutKind = "channels_first"
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise unknown_name("feature layout", str(self.kind), list(LAYOUT_KINDS))
        count = self.prefix_tokens
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AdvfeatError(f"prefix_tokens must be an integer >= 0, got {count!r}")
        if count and self.kind != "tokens":
            raise AdvfeatError(f"only a tokens layout has prefix tokens, not {self.kind}")

    def __str__(self) -> str:
        return f"tokens:{self.prefix_tokens}" if self.kind == "tokens" else self.kind

    def describe(self) -> str:
        """E.g. ``"tokens (N, L, C) with 1 prefix token"``."""
        text = f"{self.kind} {_SHAPES[self.kind]}"
        if self.kind == "tokens":
            s = "" if self.prefix_tokens == 1 else "s"
            text += f" with {self.prefix_tokens} prefix token{s}"
        return text

    # ------------------------------------------------------------------------- dimensions
    def check(self, feature: Tensor) -> None:
        """Raise :class:`AdvfeatError` unless ``feature`` can have this layout."""
        shape = tuple(feature.shape)
        if self.kind == "channels_first" and feature.ndim < 2:
            raise AdvfeatError(f"a channels_first feature is (N, C, ...), got shape {shape}")
        if self.kind == "channels_last" and feature.ndim < 3:
            raise AdvfeatError(f"a channels_last feature is (N, ..., C), got shape {shape}")
        if self.kind == "tokens":
            if feature.ndim != 3:
                raise AdvfeatError(f"a tokens feature is (N, L, C), got shape {shape}")
            if self.prefix_tokens >= shape[1]:
                raise AdvfeatError(
                    f"{self.prefix_tokens} prefix tokens leave no patch token in a feature of "
                    f"shape {shape}"
                )

    def channel_dim(self, ndim: int) -> int:
        """The (non-negative) index of C in a feature with ``ndim`` dimensions."""
        return 1 if self.kind == "channels_first" else ndim - 1

    def channels(self, feature: Tensor) -> int:
        """C, the number of channels of ``feature``."""
        self.check(feature)
        return int(feature.shape[self.channel_dim(feature.ndim)])

    def reduce_dims(self, ndim: int, *, per_sample: bool = False) -> tuple[int, ...]:
        """The dimensions that per-channel statistics reduce: every one but C (and N with
        ``per_sample``, the instance statistics of AdaIN); ``(0, 2, 3)`` for (N, C, H, W)."""
        channel = self.channel_dim(ndim)
        return tuple(d for d in range(1 if per_sample else 0, ndim) if d != channel)

    def positional_dims(self, ndim: int) -> tuple[int, ...]:
        """The dimension of the statistics over the channels at each sample and position."""
        return (self.channel_dim(ndim),)

    def statistics_part(self, feature: Tensor) -> Tensor:
        """The part of ``feature`` that per-channel statistics are taken over: the patch tokens
        of a tokens feature (a view), the whole feature otherwise (``feature`` itself)."""
        if self.kind == "tokens" and self.prefix_tokens:
            return feature[:, self.prefix_tokens :]
        return feature

    def channel_shape(self, feature: Tensor, *, per_sample: bool = False) -> list[int]:
        """The shape of a per-channel (``per_sample``: per-sample, per-channel) statistic kept
        with ``keepdim``, which broadcasts against ``feature``: ``[1, C, 1, 1]`` for NCHW."""
        shape = [1] * feature.ndim
        channel = self.channel_dim(feature.ndim)
        shape[channel] = feature.shape[channel]
        if per_sample:
            shape[0] = feature.shape[0]
        return shape

    def broadcast(self, per_channel: Tensor, feature: Tensor) -> Tensor:
        """A vector of C values (one per channel) shaped to broadcast against ``feature``."""
        channels = self.channels(feature)
        if per_channel.numel() != channels:
            raise AdvfeatError(
                f"expected one value per channel ({channels}), got shape {tuple(per_channel.shape)}"
            )
        return per_channel.reshape(self.channel_shape(feature))

    def channel_mean_var(
        self, feature: Tensor, *, per_sample: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-channel mean and biased variance (as batch norm in training), over the batch or
        (``per_sample``) per sample, kept to broadcast against ``feature``."""
        self.check(feature)
        dims = self.reduce_dims(feature.ndim, per_sample=per_sample)
        if not dims:
            raise AdvfeatError(
                f"per-sample statistics need dimensions beyond batch and channel, got shape "
                f"{tuple(feature.shape)}"
            )
        var, mean = torch.var_mean(
            self.statistics_part(feature), dim=dims, keepdim=True, correction=0
        )
        return mean, var

    def channel_rows(self, feature: Tensor) -> Tensor:
        """``(C, M)``: every value of each channel in one row (the statistics part only)."""
        self.check(feature)
        part = self.statistics_part(feature)
        channel = self.channel_dim(part.ndim)
        return part.movedim(channel, 0).reshape(part.shape[channel], -1)

    def to_channels_first(self, feature: Tensor) -> Tensor:
        """``feature`` with C moved to dimension 1 (all tokens kept)."""
        self.check(feature)
        return feature.movedim(self.channel_dim(feature.ndim), 1)


CHANNELS_FIRST = FeatureLayout()
"""(N, C, H, W): what every feature-space operation assumed before layouts existed."""


# ------------------------------------------------------------------------------ specifications
LayoutSpecValue = str | FeatureLayout
_TOKENS = re.compile(r"tokens(?::(\d+))?")


def parse_layout(spec: LayoutSpecValue) -> tuple[LayoutKind, int | None] | None:
    """``(kind, prefix tokens or None: from the model)`` of a layout specification, or ``None``
    for ``"auto"``. Specifications: ``"auto"``, ``"channels_first"``, ``"channels_last"``,
    ``"tokens"`` (the number of prefix tokens taken from the model), ``"tokens:N"``, or a
    :class:`FeatureLayout`."""
    if isinstance(spec, FeatureLayout):
        return spec.kind, spec.prefix_tokens
    if not isinstance(spec, str):
        raise AdvfeatError(f"a feature layout is a string or a FeatureLayout, got {spec!r}")
    if spec == AUTO_LAYOUT:
        return None
    if spec in ("channels_first", "channels_last"):
        return spec, 0  # type: ignore[return-value]
    found = _TOKENS.fullmatch(spec)
    if found is None:
        raise unknown_name(
            "feature layout", spec, [AUTO_LAYOUT, *LAYOUT_KINDS, "tokens:<prefix tokens>"]
        )
    return "tokens", None if found.group(1) is None else int(found.group(1))


@dataclass(frozen=True)
class LayoutSpec:
    """Option check (:mod:`advfeat.options`): a layout specification (:func:`parse_layout`)."""

    hint: str = "auto, channels_first, channels_last, tokens or tokens:N"

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        try:
            parse_layout(value)
        except AdvfeatError as err:
            where = f"{owner}: {name}" if owner else name
            raise AdvfeatError(f"{where} must be {self.hint}, got {value!r} ({err})") from None
        return value


# ------------------------------------------------------------------------------- inference
_CHANNELS_FIRST_LEAVES: tuple[type[nn.Module], ...] = (
    _ConvNd,
    nn.GroupNorm,
    _AvgPoolNd,
    _MaxPoolNd,
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
)
_LAST_DIM_NORMS: tuple[type[nn.Module], ...] = tuple(
    c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if isinstance(c, type)
)
_FORMATS: dict[str, LayoutKind] = {
    "NCHW": "channels_first",
    "NCL": "channels_first",
    "NHWC": "channels_last",
    "NLC": "tokens",
}


def _acts_on_last_dim(module: nn.Module, output: Tensor) -> bool:
    """A Linear, or a LayerNorm / RMSNorm over the last dimension (not a ``...2d`` variant,
    which permutes to normalise over C of an NCHW feature)."""
    if isinstance(module, nn.Linear):
        return True
    if "2d" in type(module).__name__.lower():
        return False
    shape = getattr(module, "normalized_shape", None)
    if isinstance(module, _LAST_DIM_NORMS) or shape is not None:
        return tuple(shape or ()) == (output.shape[-1],)
    return False


def _declared_format(module: nn.Module, output: Tensor) -> LayoutKind | None:
    """A format the module states and its output has: timm's ``output_fmt`` (a timm patch
    embedding that flattens its output states ``NCHW`` and outputs tokens), torchvision's
    ``Permute``."""
    if output.ndim == 3 and getattr(module, "flatten", None) is True:
        return "tokens"
    fmt = getattr(module, "output_fmt", None)
    value = str(getattr(fmt, "value", fmt)) if fmt is not None else ""
    if value in _FORMATS and len(value) == output.ndim:
        return _FORMATS[value]
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, list | tuple):
        if list(dims) == [0, 2, 3, 1]:
            return "channels_last"
        if list(dims) == [0, 3, 1, 2]:
            return "channels_first"
    return None


def _inferred_kind(module: nn.Module, output: Tensor) -> LayoutKind:
    declared = _declared_format(module, output)
    if declared is not None:
        return declared
    if output.ndim <= 2:
        return "channels_first"
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return _inferred_kind(module[-1], output)  # a Sequential outputs its last child's output
    if isinstance(module, _CHANNELS_FIRST_LEAVES) or is_batchnorm_like(module):
        return "channels_first"
    if _acts_on_last_dim(module, output):
        return "tokens" if output.ndim == 3 else "channels_last"
    subs = list(module.modules())[1:]
    if output.ndim == 3:
        # (N, C, L) of 1-D convolutions; otherwise transformer blocks, attention, MLPs
        return "channels_first" if any(isinstance(m, nn.Conv1d) for m in subs) else "tokens"
    if any(isinstance(m, _ConvNd) for m in subs):
        return "channels_first"  # ResNet stages; ConvNeXt blocks permute back to NCHW
    if any(_acts_on_last_dim(m, output) for m in subs):
        return "channels_last"  # Swin blocks and stages, a ConvNeXt MLP of Linear layers
    return "channels_first"


def _path(model: nn.Module, site: str) -> list[tuple[nn.Module, str]]:
    """``(module, site name relative to it)`` from the model down to the site's parent."""
    inner, rel = split_site_name(model, site)
    out = [(inner, rel)]
    parts = rel.split(".")
    module = inner
    for i, part in enumerate(parts[:-1]):
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            break
        module = child
        out.append((module, ".".join(parts[i + 1 :])))
    return out


def _prefix_tokens(model: nn.Module | None, site: str | None, length: int) -> int:
    """The class / distillation / register tokens ahead of the patch tokens of a sequence of
    ``length`` tokens, from the nearest module on the site's path that says how many it adds
    (timm's ``num_prefix_tokens``, torchvision's ``class_token``, a ``cls_token``); none for
    a sequence of exactly the patch tokens (a patch embedding's output)."""
    if model is None or site is None:
        return 0
    for owner, _ in reversed(_path(model, site)):
        count = getattr(owner, "num_prefix_tokens", None)
        if count is None:
            tokens = [getattr(owner, n, None) for n in ("class_token", "cls_token", "dist_token")]
            if not any(isinstance(t, Tensor) for t in tokens):
                continue
            count = sum(isinstance(t, Tensor) for t in tokens)
        count = int(count)
        patches = getattr(getattr(owner, "patch_embed", None), "num_patches", None)
        seq_length = getattr(owner, "seq_length", None)
        if patches is None and isinstance(seq_length, int):
            patches = seq_length - count  # torchvision: patches + class token
        if isinstance(patches, int) and length == patches:
            return 0
        return count if length > count else 0
    return 0


def infer_layout(
    module: nn.Module, output: Tensor, model: nn.Module | None = None, site: str | None = None
) -> FeatureLayout:
    """The layout of ``output``, the feature of ``module``, guessed from its type and shape.

    * 2-D outputs, convolutions, batch/group norms and pools (``(N, C, L)`` of a Conv1d too):
      ``channels_first``; a module that states its output format (timm's ``output_fmt``,
      torchvision's ``Permute``) is taken at its word; an ``nn.Sequential`` as its last child.
    * A Linear or a LayerNorm / RMSNorm over the last dimension (not ``LayerNorm2d``):
      ``tokens`` for 3-D outputs, ``channels_last`` for 4-D ones (inside ConvNeXt blocks).
    * Other 3-D outputs (ViT / DeiT blocks, attention, MLPs) are ``tokens`` unless the module
      holds convolutions; other 4-D outputs are ``channels_last`` when the module holds Linear
      or LayerNorm layers on the last dimension and no convolution (Swin blocks), else
      ``channels_first`` (ResNet, ConvNeXt blocks, which permute back to NCHW).
    * Prefix tokens of a tokens layout come from ``model`` (with ``site``, its name in it).

    Elementwise modules (activations, dropout) cannot tell their layout: declare it.
    """
    kind = _inferred_kind(module, output)
    if kind != "tokens":
        return FeatureLayout(kind)
    return FeatureLayout("tokens", _prefix_tokens(model, site, int(output.shape[1])))


def declared_layout(model: nn.Module, site: str) -> LayoutSpecValue | None:
    """The layout that ``model`` declares for ``site``: a ``feature_layouts`` dict on the model
    or on a module along the site's path (keyed by names relative to that module)."""
    for owner, rel in _path(model, site):
        table = getattr(owner, "feature_layouts", None)
        if isinstance(table, Mapping) and rel in table:
            value: LayoutSpecValue = table[rel]
            return value
    return None


_RESOLVED: WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], FeatureLayout]] = WeakKeyDictionary()


def site_layout(
    model: nn.Module, site: str, feature: Tensor, layout: LayoutSpecValue = AUTO_LAYOUT
) -> FeatureLayout:
    """The layout of ``feature``, the output of ``site`` in ``model``.

    ``layout`` (a method's option) wins unless ``"auto"``; then the model's declaration
    (:func:`declared_layout`); then :func:`infer_layout`, reported once per model and site with
    a :class:`LayoutInferred` warning unless it is the classic ``(N, C, H, W)`` / ``(N, C)``.
    ``"tokens"`` without a count takes the prefix tokens from the model. Cached per model.
    """
    inner, _ = split_site_name(model, site)
    key = (site, str(layout), tuple(feature.shape[1:]))
    cache = _RESOLVED.setdefault(inner, {})
    found = cache.get(key)
    if found is not None:
        return found
    parsed = parse_layout(layout)
    declared = declared_layout(inner, site) if parsed is None else None
    if parsed is None and declared is not None:
        parsed = parse_layout(declared)
    if parsed is not None:
        kind, prefix = parsed
        if prefix is None:
            prefix = _prefix_tokens(inner, site, int(feature.shape[1])) if feature.ndim == 3 else 0
        resolved = FeatureLayout(kind, prefix)
    else:
        resolved = infer_layout(resolve_site(inner, site), feature, inner, site)
        if resolved != CHANNELS_FIRST or feature.ndim not in (2, 4):
            warnings.warn(
                f"feature site {site!r} of {type(inner).__name__}: layout inferred as "
                f"{resolved.describe()}; per-channel statistics reduce over "
                f"{resolved.reduce_dims(feature.ndim)} (declare it with the model's "
                f"feature_layouts or the method option layout=)",
                LayoutInferred,
                stacklevel=2,
            )
    resolved.check(feature)
    cache[key] = resolved
    return resolved
