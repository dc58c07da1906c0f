"""Shared parts of the auxiliary-BN methods ``advprop``, ``fast-advprop`` and ``advbn``.

AdvProp (Xie et al. 2020, Sec. 4.2-4.3, Algorithm 1) keeps a *main* BN for clean images and an
*auxiliary* BN for adversarial examples; every other layer is shared, and the aux BNs are dropped
at test time. Its fine-grained variant (Sec. 5.4, Table 5) keeps one more aux BN per extra data
source. Fast AdvProp (Mei et al. 2022) and AdvBN (Shu et al. 2021, Sec. 4) reuse the design.

* :class:`AuxBNMethod` — base class: BN conversion in :meth:`~AuxBNMethod.prepare`, evaluation
  with one branch (:meth:`~AuxBNMethod.eval_model`, aux BNs dropped by
  :func:`advfeat.norm.strip_branches`), option checks. Any norm family can be branched
  (LayerNorm on a ViT too); ``aux_norm`` chooses what an auxiliary branch owns.
* :func:`branch_forward` — "clean through the main BN, adversarial through the aux BN": chunks
  of images, each through its own BN branch, in one forward pass (``split``, via
  :func:`advfeat.norm.split_branches`) or one pass per chunk (``separate``). Both give the same
  outputs, losses and running statistics: in split mode every chunk is normalised with its own
  batch statistics and updates only its own branch.
* :func:`strong_augment` and :data:`EXTRA_SOURCES` — the extra data source of fine-grained
  AdvProp (a strongly augmented copy of the batch, standing in for the paper's AutoAugment).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from weakref import WeakSet

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.methods.base import Method, unwrap
from advfeat.norm import (
    AUX_NORMS,
    BranchNorm,
    branch_layers,
    branch_names,
    can_have_branches,
    convert_branches,
    has_branches,
    split_branches,
    strip_branches,
    use_branch,
)
from advfeat.options import Choice

__all__ = [
    "ADV",
    "AUX_NORM_OPTION",
    "EXTRA_SOURCES",
    "MAIN",
    "PIXEL_LEVELS",
    "ROUTINGS",
    "AuxBNMethod",
    "branch_forward",
    "prepare_branches",
    "resolve_routing",
    "strong_augment",
]

MAIN = "clean"
"""The main BN branch (clean images; kept at test time)."""
ADV = "adv"
"""The auxiliary BN branch of adversarial examples / features."""
ROUTINGS = ("auto", "split", "separate")
AUX_NORM_OPTION = Choice(*AUX_NORMS)
"""The ``aux_norm`` option: what an auxiliary branch owns beyond routing. ``"separate"``: its own
affine parameters (and, for BN, statistics); ``"shared"``: the main branch's affine parameters
(BN keeps per-branch statistics; a LayerNorm model's branches then differ only in routing). The
papers only know batch norm, so for LayerNorm / GroupNorm models neither reading is theirs."""
PIXEL_LEVELS = "in 0-255 pixel levels"
"""The unit of AdvProp's budgets: ``eps=4`` means 4/255."""


# ---------------------------------------------------------------------------- conversion
def prepare_branches(
    model: nn.Module, branches: Sequence[str], *, method: str, aux_norm: str = "separate"
) -> nn.Module:
    """Give every normalization layer of ``model`` the branches ``branches`` (AdvProp Sec. 4.2).

    Batch norm (the papers' case), LayerNorm, GroupNorm, RMSNorm and any registered family
    (:func:`advfeat.norm.can_have_branches`); ``aux_norm`` is the reading of the auxiliary
    branches (:data:`AUX_NORM_OPTION`). Idempotent for a model already converted the same way; a
    model without any such layer raises :class:`AdvfeatError`.
    """
    inner = unwrap(model)
    if has_branches(inner):
        have = branch_names(inner)
        if have != tuple(branches):
            raise AdvfeatError(
                f"{method}: the model already has norm branches {have}, this method needs "
                f"{tuple(branches)}; start from the plain model"
            )
        readings = {layer.aux_norm for layer in branch_layers(inner)}
        if readings != {aux_norm}:
            raise AdvfeatError(
                f"{method}: the model's aux branches were made with aux_norm={sorted(readings)}, "
                f"this method asks for {aux_norm!r}; start from the plain model"
            )
        return model
    if not any(can_have_branches(m) for m in inner.modules()):
        raise AdvfeatError(
            f"{method} trains adversarial examples through an auxiliary normalization branch, "
            f"but {type(inner).__name__} has no batch-norm layer nor any other norm that can be "
            "given branches (LayerNorm, GroupNorm, RMSNorm, or a class given to "
            "advfeat.norm.register_norm_family); use such a model, or a method without "
            "auxiliary branches (e.g. pgd-at)"
        )
    convert_branches(inner, tuple(branches), aux_norm=aux_norm)
    return model


_PREPARED: WeakSet[nn.Module] = WeakSet()


def require_branches(model: nn.Module, method: str) -> nn.Module:
    """The unwrapped model, checked (once per model) to carry multi-branch BN layers."""
    inner = unwrap(model)
    if inner not in _PREPARED:
        if not any(isinstance(m, BranchNorm) for m in inner.modules()):
            raise AdvfeatError(
                f"{method}: the model has no auxiliary norm branch; call model = method.prepare(model) "
                "before training"
            )
        _PREPARED.add(inner)
    return inner


# ---------------------------------------------------------------------------- forwarding
def resolve_routing(routing: str, model: nn.Module, images: Tensor) -> str:
    """``"auto"`` → ``"split"`` on GPUs and under DDP (one larger forward keeps the device busy;
    DDP expects one forward per backward), ``"separate"`` on CPUs, where two passes of half the
    batch are faster than one pass of the whole (measured with ``advfeat bench``)."""
    if routing != "auto":
        return routing
    if images.is_cuda or isinstance(model, nn.parallel.DistributedDataParallel):
        return "split"
    return "separate"


def branch_forward(
    model: nn.Module, chunks: Sequence[tuple[str, Tensor]], *, routing: str = "auto"
) -> list[Tensor]:
    """Model outputs for ``[(branch, images), ...]``, each chunk through its own BN branch.

    AdvProp Algorithm 1: the clean mini-batch through the main BNs, the adversarial mini-batch
    through the auxiliary BNs. ``routing="split"`` concatenates the chunks and runs ONE forward
    pass of the (possibly wrapped) model with :func:`advfeat.norm.split_branches`;
    ``"separate"`` runs one pass per chunk with :func:`advfeat.norm.use_branch`; ``"auto"`` picks
    with :func:`resolve_routing`. Outputs,
    gradients and running statistics are the same either way. Empty chunks are skipped.
    """
    inner = unwrap(model)
    present = [(name, images) for name, images in chunks if images.shape[0] > 0]
    if not present:
        raise AdvfeatError("branch_forward needs at least one non-empty chunk of images")
    routing = resolve_routing(routing, model, present[0][1])
    if routing == "separate" or len(present) == 1:
        outputs = []
        for name, images in present:
            with use_branch(inner, name):
                outputs.append(model(images))
    elif routing == "split":
        sizes = [(name, int(images.shape[0])) for name, images in present]
        with split_branches(inner, sizes):
            joint = model(torch.cat([images for _, images in present]))
        outputs = list(joint.split([size for _, size in sizes]))
    else:
        raise unknown_name("routing", str(routing), ROUTINGS)
    by_name = {name: out for (name, _), out in zip(present, outputs, strict=True)}
    return [by_name.get(name, _empty_like(outputs[0])) for name, _ in chunks]


def _empty_like(output: Tensor) -> Tensor:
    return output.new_zeros((0, *output.shape[1:]))


# --------------------------------------------------------------------------- extra sources
def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def strong_augment(
    x: Tensor, generator: torch.Generator | None = None, *, magnitude: float = 1.0
) -> Tensor:
    """A strong, label-preserving augmentation of a batch of images in [0, 1], per image.

    The extra data source of fine-grained AdvProp (Sec. 5.4): the paper gives its second aux BN
    to AutoAugment images (rotations, shears, colour operations). This is a simple fixed policy
    in that spirit, applied on the batch (any device), each image with its own random draw:

    1. affine: rotation by U(−30°, 30°)·m, shear U(−0.3, 0.3)·m, translation U(−0.1, 0.1)·m of
       the image size, grey (0.5) fill, bilinear sampling;
    2. colour: brightness, contrast and saturation factors each U(1 − 0.5m, 1 + 0.5m);
    3. cutout: one grey square of side ⌈size/4⌉ at a uniform position (may be clipped).

    ``m`` is ``magnitude`` (0 keeps the image). Random numbers come from ``generator`` (CPU) or
    the global generator. Returns a new tensor in [0, 1] of ``x``'s shape and dtype.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise AdvfeatError(
            f"strong_augment expects images (N, 1 or 3, H, W), got shape {tuple(x.shape)}"
        )
    n, _, h, w = x.shape
    m = float(magnitude)
    img = x.detach().float()
    angle = _uniform(n, -math.pi / 6 * m, math.pi / 6 * m, generator)
    shear = _uniform(n, -0.3 * m, 0.3 * m, generator)
    shift = _uniform(2 * n, -0.2 * m, 0.2 * m, generator).view(n, 2)  # ±0.1 of size in [-1, 1]
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [
            torch.stack([cos, cos * shear - sin, shift[:, 0]], dim=1),
            torch.stack([sin, sin * shear + cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    ).to(device=img.device, dtype=img.dtype)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img = img + 0.5

    def factor(low: float, high: float) -> Tensor:
        return _uniform(n, low, high, generator).to(img.device, img.dtype).view(n, 1, 1, 1)

    lo, hi = 1 - 0.5 * m, 1 + 0.5 * m
    img = img * factor(lo, hi)
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * factor(lo, hi) + mean
    if img.shape[1] == 3:
        grey = (img * img.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        img = (img - grey) * factor(lo, hi) + grey
    img = img.clamp(0, 1)
    if m > 0:
        side = math.ceil(min(h, w) / 4)
        cy = (_uniform(n, 0, 1, generator) * h).long().to(img.device).view(n, 1, 1, 1)
        cx = (_uniform(n, 0, 1, generator) * w).long().to(img.device).view(n, 1, 1, 1)
        rows = torch.arange(h, device=img.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=img.device).view(1, 1, 1, w)
        hole = ((rows - cy).abs() <= side // 2) & ((cols - cx).abs() <= side // 2)
        img = torch.where(hole, torch.full_like(img, 0.5), img)
    return img.to(x.dtype)


EXTRA_SOURCES: dict[str, Callable[[Tensor], Tensor]] = {"strong_aug": strong_augment}
"""Extra data sources of fine-grained AdvProp: name → ``fn(clean batch) -> batch``."""


# ------------------------------------------------------------------------------ base class
class AuxBNMethod(Method):
    """Base of the auxiliary-BN methods: BN branches, evaluation branch, forward routing.

    Subclass options include ``eval_branch`` (the BN branch kept for evaluation: ``"clean"``,
    the main BN, by default — AdvProp drops the aux BNs at test time, Sec. 4.3; AdvBN may
    evaluate with the aux BN, its Appendix A.3).
    """

    def branches(self) -> tuple[str, ...]:
        """The BN branches this method trains, the main one first."""
        return (MAIN, ADV)

    def validate_options(self) -> None:
        Choice(*self.branches())(self.name, "eval_branch", self.opts.eval_branch)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Give every norm layer the branches of :meth:`branches` (clear error without one)."""
        return prepare_branches(model, self.branches(), method=self.name, aux_norm=self.aux_norm)

    @property
    def aux_norm(self) -> str:
        """The reading of the auxiliary branches (the ``aux_norm`` option; ``"separate"``)."""
        return str(getattr(self.opts, "aux_norm", "separate"))

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The plain model with BN branch ``eval_branch`` in every layer (aux BNs dropped).

        A copy of the original architecture (:func:`advfeat.norm.strip_branches`): its
        ``state_dict`` loads into a fresh, unconverted model.
        """
        return strip_branches(unwrap(model), keep=self.opts.eval_branch)
