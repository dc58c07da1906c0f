"""AFA's adaptive attack (afa.md §5.2, Tab. 3 "PGD+Ada.") and its non-adaptive counterpart.

An AFA model (:class:`advfeat.norm.AdaptiveFeatureAlignment`) fuses two BN branches with a
weight W_0 = WG(x) predicted from the input (Eq. 1-2). The paper's adaptive attack "exposes the
fusing weight W_0 to the attacker": PGD ascends

    w_ce · CE(f(x + δ), y) + w_bce · BCE(W_0(x + δ), t)

through the whole fused model *including the generator*, for seven weightings
(10:1, 5:1, 2:1, 1:1, 1:2, 1:5, 1:10), and the worst result is reported.

Choices (the supplementary with the exact settings is not available):

* the BCE label ``t`` is 0 by default: the generator should send an attacked input to the
  adversarial branch (W_0 → 0, Fig. 6), so ascending BCE(W_0, 0) pushes W_0 towards the clean
  branch, which is not robust. ``adaptive_bce_target=1`` is the other reading.
* the reported adaptive accuracy is the per-sample worst case over the seven weightings (a sample
  counts as robust only if it survives all seven), which is never above the paper's "best of
  seven" number; the per-weighting accuracies are reported too.
* the *non-adaptive* variant attacks with W_0 detached: the gradient does not flow through the
  generator, as for an attacker unaware of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["adaptive_loss", "find_fusion", "fusion_weight_tap"]


def find_fusion(model: nn.Module) -> nn.Module | None:
    """The AFA stage-II module (:class:`advfeat.norm.AdaptiveFeatureAlignment`) of ``model``."""
    try:
        from advfeat.norm import AdaptiveFeatureAlignment
    except ImportError:  # pragma: no cover - norm is part of the package
        return None
    for module in model.modules():
        if isinstance(module, AdaptiveFeatureAlignment):
            return module
    return None


@contextmanager
def fusion_weight_tap(fusion: nn.Module, *, detach: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record W_0 (the generator's output) of every forward run inside the block.

    Yields a dict whose ``"w0"`` entry is the last W_0, with its graph. With ``detach=True`` the
    generator's output is replaced by its detached value, so no gradient reaches the generator
    (the non-adaptive attack) while the forward value is unchanged.
    """
    store: dict[str, Tensor] = {}
    generator: nn.Module = fusion.generator  # type: ignore[assignment]

    def hook(_m: nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        if detach:
            output = output.detach()
            store["w0"] = output
            return output
        store["w0"] = output
        return None

    handle = generator.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def per_sample_w0(w0: Tensor) -> Tensor:
    """W_0 as one number per sample (mean over fused layers when there is one per layer)."""
    return w0.detach().float().reshape(w0.shape[0], -1).mean(dim=1)


def adaptive_loss(
    store: dict[str, Tensor], ce_weight: float, bce_weight: float, target: float
) -> Any:
    """The adaptive attack's objective ``w_ce·CE + w_bce·BCE(W_0, target)`` (summed per sample)."""

    def loss(output: Tensor, y: Tensor) -> Tensor:
        ce = F.cross_entropy(output, y, reduction="sum")
        w0 = store["w0"].clamp(1e-6, 1 - 1e-6)
        bce = F.binary_cross_entropy(w0, torch.full_like(w0, float(target)), reduction="sum")
        return ce_weight * ce + bce_weight * bce

    return loss
