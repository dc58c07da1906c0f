"""AFA: adaptive feature alignment by fusing two BN branches (Wang et al., afa.md, Sec. 4).

Stage I trains a K-branch model (:func:`afa_branches` names the branches ``eps0`` …
``eps{K-1}``; branch k serves attack strength ε_k, :func:`branch_for_strength`), built with
:func:`~advfeat.norm.convert_multibn`. Stage II (Fig. 4b) keeps BN_0 and BN_{K−1}, freezes the
network and trains only a weight generator (Fig. 5) whose output W_0 fuses the two branches in
every BN layer (Eq. 1–2)::

    W_0 = WG(x),  W_1 = 1 − W_0,  x̂ = W_0·BN_0(x) + W_1·BN_{K−1}(x)

Reading of the paper (ambiguous points, the other reading available as an option):

* **Shape of W_0**: one scalar per sample, shared by every fused layer. Eq. 1 writes a single
  W_0 = WG(x), Sec. 4.3 places *one* generator "at the end of an intermediate layer", and Fig. 6
  plots one W_1 per attack strength. ``per_layer=True`` gives instead one weight per sample *per
  fused layer* (the generator then outputs one value per fused layer).
* **Generator input**: by default the model's input images, so W_0 exists before any BN layer
  runs and every BN layer is fused. ``source="<module name>"`` feeds the generator the output of
  that intermediate module instead (Sec. 4.3); a fused layer that runs before the source has
  produced W_0 needs ``prefix_weight`` (a fixed W_0 for those layers), else it raises.
* **BN_k** is branch k's complete stage-I layer: its running statistics (frozen: with batch
  statistics both branches would normalise by the same mean/variance and only differ by their
  affine part) and its affine parameters (the display BN(x) = (x − μ)/σ omits them; dropping them
  would change the stage-I network). timm's BatchNormAct2d activation is applied after fusion.
* **Last layer of the generator**: Fig. 5 draws both Linear layers as "Linear → ReLU" followed by
  a sigmoid, which would confine W_0 to [0.5, 1); the default omits the final ReLU so W_0 spans
  (0, 1). ``WeightGenerator(..., final_relu=True)`` is the literal figure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.norm.branches import (
    BranchNorm,
    _check_branch,
    branch_layers,
    replace_modules,
    require_default_routing,
    unmake_branched,
)
from advfeat.norm.multibn import MultiBatchNorm
from advfeat.norm.multibn import timm_norm_act as _timm_norm_act
from advfeat.norm.stats import has_running_statistics

__all__ = [
    "AdaptiveFeatureAlignment",
    "FusedDualBN",
    "FusionWeights",
    "WeightGenerator",
    "afa_branches",
    "branch_for_strength",
    "to_fused_dual_bn",
]


def afa_branches(k: int) -> tuple[str, ...]:
    """The K branch names of AFA stage I: ``("eps0", ..., "eps{K-1}")`` (Sec. 4.1, K ≥ 2)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise AdvfeatError(f"AFA needs K >= 2 BN branches (the paper uses K = 5), got {k!r}")
    return tuple(f"eps{i}" for i in range(k))


def branch_for_strength(eps_values: Sequence[float], eps: float) -> str:
    """The stage-I branch serving attack strength ``eps``: ``eps{k}`` where ε_k = ``eps``.

    ``eps_values`` are the K strengths ξ of Algorithm 1 in increasing order (ξ_0 = 0 for clean
    samples, which go through BN_0; the strongest through BN_{K−1}).
    """
    values = [float(v) for v in eps_values]
    if len(values) < 2 or any(v < 0 for v in values):
        raise AdvfeatError(f"eps_values must hold K >= 2 strengths >= 0, got {values}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise AdvfeatError(f"eps_values must be strictly increasing, got {values}")
    names = afa_branches(len(values))
    for name, value in zip(names, values, strict=True):
        if math.isclose(float(eps), value, rel_tol=1e-6, abs_tol=1e-9):
            return name
    raise AdvfeatError(
        f"attack strength {float(eps)!r} has no stage-I branch; the branches serve {values}"
    )


class FusionWeights(nn.Module):
    """Carries W_0 from the weight generator to every :class:`FusedDualBN` during one forward.

    One instance is shared by all fused layers of a model (a child of each, without parameters),
    so under ``nn.DataParallel`` every replica gets its own. ``value`` is ``(N,)`` (shared W_0) or
    ``(N, L)`` (``per_layer``: column i for the i-th fused layer in ``named_modules`` order).
    """

    def __init__(
        self, num_layers: int = 0, *, per_layer: bool = False, prefix_weight: float | None = None
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.per_layer = per_layer
        self.prefix_weight = prefix_weight
        self.value: Tensor | None = None

    def set(self, weight: Tensor) -> None:
        """Store the generator output for the current forward, checking its shape."""
        if self.per_layer:
            if weight.dim() != 2 or weight.shape[1] != self.num_layers:
                raise AdvfeatError(
                    f"per_layer=True needs one weight per sample and fused layer, shape (N, "
                    f"{self.num_layers}); the generator gave {tuple(weight.shape)} (build it with "
                    f"out_features={self.num_layers})"
                )
            self.value = weight
            return
        if weight.dim() == 2 and weight.shape[1] == 1:
            weight = weight[:, 0]
        if weight.dim() != 1:
            raise AdvfeatError(
                f"the generator must give one W_0 per sample, shape (N,) or (N, 1); got "
                f"{tuple(weight.shape)} (for one weight per fused layer use per_layer=True)"
            )
        self.value = weight

    @contextmanager
    def provide(self, weight: Tensor) -> Iterator[None]:
        """Make ``weight`` the W_0 of fused layers run inside the block (e.g. a traced model)."""
        previous = self.value
        self.set(weight)
        try:
            yield
        finally:
            self.value = previous

    def for_layer(self, index: int, x: Tensor, layer_name: str) -> Tensor:
        """W_0 of fused layer ``index`` for input ``x``, shaped ``(N, 1, ..., 1)`` like ``x``."""
        if self.value is None:
            if self.prefix_weight is None:
                raise AdvfeatError(
                    f"fused BN layer {layer_name!r} ran without a fusion weight W_0: run the model "
                    "through its AdaptiveFeatureAlignment wrapper; if this layer runs before the "
                    "generator's source module, pass prefix_weight to to_fused_dual_bn"
                )
            w = x.new_full((x.shape[0],), self.prefix_weight)
        else:
            w = self.value[:, index] if self.per_layer else self.value
        if w.shape[0] != x.shape[0]:
            raise AdvfeatError(
                f"W_0 has {w.shape[0]} samples but fused BN layer {layer_name!r} got a batch of "
                f"{x.shape[0]}"
            )
        return w.to(x.dtype).reshape((x.shape[0],) + (1,) * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, per_layer={self.per_layer}"


def _supported_forwards() -> set[Any]:
    forwards: set[Any] = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
    norm_act = _timm_norm_act()
    if norm_act is not None:
        forwards |= {norm_act.BatchNormAct2d.forward, norm_act.SyncBatchNormAct.forward}
    return forwards


def _check_fusable(layer: nn.Module, name: str) -> None:
    if not isinstance(layer, _BatchNorm):
        if has_running_statistics(layer):
            raise AdvfeatError(
                f"cannot fuse norm layer {name!r} ({type(layer).__name__}): it has running "
                "statistics but is not a torch batch norm"
            )
        return  # a per-sample norm (LayerNorm, GroupNorm, RMSNorm): its forward is its branch
    cls = type(layer)._plain_class if isinstance(layer, MultiBatchNorm) else type(layer)
    if cls.forward not in _supported_forwards():
        raise AdvfeatError(
            f"cannot fuse BN layer {name!r} ({cls.__name__}): AFA fusion supports "
            "BatchNorm1d/2d/3d, SyncBatchNorm and timm BatchNormAct2d, not layers with their own "
            "forward"
        )
    if layer.running_mean is None or layer.running_var is None:
        raise AdvfeatError(
            f"cannot fuse BN layer {name!r}: it has no running statistics "
            "(track_running_stats=False); AFA fuses the stage-I branch statistics"
        )


def _normalise(bn: _BatchNorm, x: Tensor) -> Tensor:
    """BN_k(x) with branch k's running statistics and affine parameters (no update)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class FusedDualBN(nn.Module):
    """AFA Eq. 2: x̂ = W_0·BN_0(x) + (1 − W_0)·BN_{K−1}(x), both branches frozen.

    ``first`` and ``last`` are plain BN layers (stage-I branches BN_0 and BN_{K−1}); they always
    normalise with their running statistics and are never updated. W_0 comes from the shared
    :class:`FusionWeights`. For timm's BatchNormAct2d the activation follows the fusion. For a
    per-sample norm (LayerNorm, GroupNorm, RMSNorm: no statistics to freeze) the two branches
    are the two frozen layers themselves: x̂ = W_0·LN_0(x) + (1 − W_0)·LN_{K−1}(x).
    A leaf for ``torch.fx`` tracers that use :func:`~advfeat.norm.is_norm_leaf`.
    """

    _advfeat_norm_leaf = True

    def __init__(
        self,
        first: nn.Module,
        last: nn.Module,
        weights: FusionWeights,
        index: int = 0,
        *,
        name: str = "",
    ) -> None:
        super().__init__()
        for layer in (first, last):
            _check_fusable(layer, name)
        widths = [[tuple(t.shape) for t in layer.state_dict().values()] for layer in (first, last)]
        if type(first) is not type(last) or widths[0] != widths[1]:
            raise AdvfeatError(
                f"BN_0 and BN_K-1 of layer {name!r} differ in class or width: {widths[0]} vs "
                f"{widths[1]}"
            )
        self.is_batchnorm = isinstance(first, _BatchNorm)
        self.first = first.eval().requires_grad_(False)
        self.last = last.eval().requires_grad_(False)
        self.weights = weights
        self.index = index
        self.layer_name = name
        norm_act = _timm_norm_act()
        self.applies_act = norm_act is not None and isinstance(
            first, (norm_act.BatchNormAct2d, norm_act.SyncBatchNormAct)
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.is_batchnorm:
            w0 = self.weights.for_layer(self.index, x, self.layer_name)
            return cast(Tensor, w0 * self.first(x) + (1 - w0) * self.last(x))
        first, last = cast(_BatchNorm, self.first), cast(_BatchNorm, self.last)
        first._check_input_dim(x)
        w0 = self.weights.for_layer(self.index, x, self.layer_name)
        fused = w0 * _normalise(first, x) + (1 - w0) * _normalise(last, x)
        if self.applies_act:
            act = cast(Any, self.first)
            fused = act.act(act.drop(fused))
        return fused

    def extra_repr(self) -> str:
        return f"index={self.index}"


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class WeightGenerator(nn.Module):
    """AFA's weight generator WG (Fig. 5, Eq. 1): W_0 = WG(x).

    2 × (Conv3×3 → BN → ReLU), global average pooling, Linear → ReLU, Linear, sigmoid; output
    ``(N, out_features)`` in (0, 1). ``final_relu=True`` adds the ReLU Fig. 5 draws after the
    last Linear (W_0 then lies in [0.5, 1)). Input: images or an intermediate feature map with
    ``in_channels`` channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_features: int = 1,
        *,
        channels: int = 64,
        hidden: int = 64,
        final_relu: bool = False,
    ) -> None:
        super().__init__()
        for label, value in (
            ("in_channels", in_channels),
            ("out_features", out_features),
            ("channels", channels),
            ("hidden", hidden),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdvfeatError(f"WeightGenerator {label} must be an int >= 1, got {value!r}")
        self.in_channels = in_channels
        self.out_features = out_features
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, channels), _conv_bn_relu(channels, channels)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        last: list[nn.Module] = [nn.Linear(hidden, out_features)]
        if final_relu:
            last.append(nn.ReLU())
        self.head = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), *last)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.pool(self.features(x)).flatten(1)))


class AdaptiveFeatureAlignment(nn.Module):
    """AFA stage II (Fig. 4b): a frozen fused-dual-BN model plus its trainable weight generator.

    ``forward(x)`` computes W_0 with the generator (from ``x``, or from the output of module
    ``source``), makes it reach every :class:`FusedDualBN`, and returns the model's output
    (with ``return_weight=True``: ``(output, W_0)``, e.g. for the paper's adaptive attack; W_0 is
    ``(N,)``, or ``(N, L)`` with ``per_layer``; ``last_weight`` keeps a detached copy).
    ``train()`` only switches the generator: the frozen model always stays in eval mode.
    Built by :func:`to_fused_dual_bn`.
    """

    def __init__(
        self,
        model: nn.Module,
        generator: nn.Module,
        weights: FusionWeights,
        *,
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.generator = generator
        self.weights = weights
        self.source = source
        self.last_weight: Tensor | None = None
        self.model.eval()

    def train(self, mode: bool = True) -> AdaptiveFeatureAlignment:
        super().train(mode)
        self.model.eval()
        return self

    @property
    def fused_layers(self) -> list[FusedDualBN]:
        """The fused layers, in the order of the columns of a per-layer W_0."""
        return [m for m in self.model.modules() if isinstance(m, FusedDualBN)]

    def forward(self, x: Tensor, *, return_weight: bool = False) -> Any:
        self.weights.value = None
        try:
            if self.source is None:
                self.weights.set(self.generator(x))
                out = self.model(x)
            else:
                out = self._forward_from_source(self.source, x)
            w0 = cast(Tensor, self.weights.value)
        finally:
            self.weights.value = None
        self.last_weight = w0.detach()
        return (out, w0) if return_weight else out

    def _forward_from_source(self, source: str, x: Tensor) -> Any:
        if getattr(self, "_is_replica", False):
            raise AdvfeatError(
                "a weight generator reading an intermediate module (source=...) cannot run inside "
                "nn.DataParallel; use DistributedDataParallel or source=None"
            )
        produced: list[bool] = []

        def tap(module: nn.Module, args: Any, output: Any) -> None:
            if produced:
                return
            if not isinstance(output, Tensor):
                raise AdvfeatError(
                    f"source module {source!r} returns {type(output).__name__}, not a tensor"
                )
            self.weights.set(self.generator(output))
            produced.append(True)

        handle = self.model.get_submodule(source).register_forward_hook(tap)
        try:
            out = self.model(x)
        finally:
            handle.remove()
        if not produced:
            raise AdvfeatError(f"source module {source!r} did not run during the forward pass")
        return out


def to_fused_dual_bn(
    model: nn.Module,
    generator: nn.Module,
    first: str | None = None,
    last: str | None = None,
    *,
    source: str | None = None,
    per_layer: bool = False,
    prefix_weight: float | None = None,
) -> AdaptiveFeatureAlignment:
    """Turn a stage-I multi-branch model into AFA's stage-II model (Sec. 4.3, Fig. 4b).

    Every multi-branch layer (:class:`~advfeat.norm.BranchNorm`) becomes a :class:`FusedDualBN`
    of branches ``first`` (BN_0, default: the main branch) and ``last`` (BN_{K−1}, default: the
    last branch); the other branches are dropped. The model is changed in place and frozen
    (``requires_grad=False``, eval mode); only ``generator`` is trainable. ``source``,
    ``per_layer`` and ``prefix_weight`` select the other readings described in the module
    docstring.
    """
    layers = branch_layers(model)
    require_default_routing(layers, "to_fused_dual_bn")
    branches = layers[0].branches
    first = branches[0] if first is None else first
    last = branches[-1] if last is None else last
    _check_branch(first, branches)
    _check_branch(last, branches)
    if first == last:
        raise AdvfeatError(f"first and last must be two different branches, both are {first!r}")
    generator_params = {id(p) for p in generator.parameters()}
    if any(m is generator for m in model.modules()) or any(
        id(p) in generator_params for p in model.parameters()
    ):
        raise AdvfeatError("the weight generator must not be part of the model it weights")
    if source is not None:
        names = [n for n, _ in model.named_modules() if n]
        if source not in names:
            raise unknown_name("source module", source, names)
    if prefix_weight is not None and not 0.0 <= float(prefix_weight) <= 1.0:
        raise AdvfeatError(f"prefix_weight must lie in [0, 1], got {prefix_weight!r}")
    for layer in layers:
        for name in (first, last):
            branch = layer if name == branches[0] else layer.aux[name]
            _check_fusable(branch, layer._advfeat_name)
    expected = len(layers) if per_layer else 1
    out_features = getattr(generator, "out_features", None)
    if isinstance(out_features, int) and out_features != expected:
        raise AdvfeatError(
            f"the generator outputs {out_features} value(s) per sample but "
            f"{'per_layer=True needs one per fused layer' if per_layer else 'a shared W_0 needs 1'}"
            f" ({expected})"
        )

    weights = FusionWeights(
        per_layer=per_layer, prefix_weight=None if prefix_weight is None else float(prefix_weight)
    )
    count = 0

    def fuse(module: nn.Module, qualname: str) -> nn.Module:
        nonlocal count
        plain = unmake_branched(cast(BranchNorm, module))  # the selector picked these only
        fused = FusedDualBN(plain[first], plain[last], weights, count, name=qualname)
        count += 1
        return fused

    model = replace_modules(model, lambda m: isinstance(m, BranchNorm), fuse)
    weights.num_layers = count
    model.requires_grad_(False)
    generator.requires_grad_(True)
    return AdaptiveFeatureAlignment(model, generator, weights, source=source)
