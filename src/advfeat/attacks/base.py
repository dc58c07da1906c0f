"""The attack contract, enforced once for every attack.

An :class:`Attack` is called like a function, ``x_adv = attack(x, y)``, and guarantees:

* the input tensor is never mutated;
* the result lies in the threat model's ε-ball around the input (and in ``[0, 1]`` for images);
* the model's train/eval flags, every ``requires_grad`` flag, every parameter's ``.grad`` and
  every BN running statistic are exactly as they were before the call;
* gradients are computed only with respect to what is attacked, never the weights;
* which BN mode (``bn_mode``: ``"eval"``, ``"train"`` or ``"keep"``) and which BN branch
  (``branch``, for models converted with :func:`advfeat.convert_multibn`) the attack runs the
  model in are explicit options.

Subclasses implement :meth:`Attack.perturb` and may assume the guard is active.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.modes import restored_train_flags
from advfeat.norm.stats import frozen_bn_statistics

__all__ = [
    "Attack",
    "AttackOptions",
    "BNMode",
    "ImageRange",
    "LossFn",
    "attack_guard",
    "check_image_range",
    "deferred_finite_checks",
    "deferred_image_checks",
    "finite_checks_deferred",
]

BNMode = Literal["eval", "train", "keep"]
LossFn = Callable[[Any, Tensor], Tensor]
"""``loss_fn(output, target) -> per-sample loss (B,) or scalar``; the attack *maximises* it."""


class AttackOptions(TypedDict, total=False):
    """The keyword arguments every attack takes besides its threat model and steps, declared
    once (:class:`Attack`'s ``loss_fn``, ``targeted``, ``bn_mode``, ``branch``, ``seed``); an
    attack's constructor passes them on as ``**options: Unpack[AttackOptions]``."""

    loss_fn: LossFn | None
    targeted: bool
    bn_mode: BNMode
    branch: str | None
    seed: int | None


def default_loss(output: Tensor, target: Tensor) -> Tensor:
    """Summed cross-entropy: per-sample gradients independent of the batch size."""
    return F.cross_entropy(output, target, reduction="sum")


_DEFERRED_FINITE_CHECKS: ContextVar[bool] = ContextVar("deferred_finite_checks", default=False)


@contextmanager
def deferred_finite_checks() -> Iterator[None]:
    """Within this block, attacks leave out their check that a result is finite (a host
    synchronisation per attack): for a caller that checks what the result flows into, as the
    trainer watches every step's loss on the device."""
    token = _DEFERRED_FINITE_CHECKS.set(True)
    try:
        yield
    finally:
        _DEFERRED_FINITE_CHECKS.reset(token)


def finite_checks_deferred() -> bool:
    """Whether the caller checks finiteness itself (:func:`deferred_finite_checks`)."""
    return _DEFERRED_FINITE_CHECKS.get()


class ImageRange:
    """The lowest and the highest value of the images checked inside
    :func:`deferred_image_checks`, kept on ``device`` and updated in place (no host read per
    batch, so a captured training step can check its images); :meth:`check` reads them."""

    def __init__(self, device: torch.device) -> None:
        self.bounds = torch.tensor([math.inf, -math.inf], device=device)
        """``[min, max]`` so far; ``[inf, -inf]`` while no image was seen."""

    def observe(self, x: Tensor) -> None:
        values = x.detach()
        seen = torch.stack([values.min(), values.max()]).float()
        low, high = torch.minimum(self.bounds[0], seen[0]), torch.maximum(self.bounds[1], seen[1])
        self.bounds.copy_(torch.stack([low, high]))  # NaN wins both: it is reported

    def check(self, *, tol: float = 1e-6) -> None:
        """Raise what :func:`check_image_range` would have for the images seen (one copy to
        the host)."""
        lo, hi = self.bounds.tolist()
        if lo == math.inf and hi == -math.inf:
            return
        refusal = _range_refusal(lo, hi, tol)
        if refusal is not None:
            raise AdvfeatError(refusal)


_DEFERRED_IMAGE_CHECKS: ContextVar[ImageRange | None] = ContextVar(
    "deferred_image_checks", default=None
)


@contextmanager
def deferred_image_checks(seen: ImageRange) -> Iterator[None]:
    """Within this block, :func:`check_image_range` notes the range of the images in ``seen``
    instead of reading it (a host synchronisation per attack): for a caller that checks
    ``seen`` itself, as the trainer does after the first step and at the end of each epoch."""
    token = _DEFERRED_IMAGE_CHECKS.set(seen)
    try:
        yield
    finally:
        _DEFERRED_IMAGE_CHECKS.reset(token)


def _range_refusal(lo: float, hi: float, tol: float) -> str | None:
    """What is wrong with images whose values lie in ``[lo, hi]``, or ``None``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "images contain NaN or infinite values; attacks need finite images in [0, 1]"
    if lo < -tol or hi > 1 + tol:
        return (
            f"images must lie in [0, 1] (normalization belongs inside the model), got values in "
            f"[{lo:.3g}, {hi:.3g}]; pass un-normalized images or wrap the model with "
            f"advfeat.models.Normalize"
        )
    return None


def check_image_range(x: Tensor, *, tol: float = 1e-6, strict: bool = True) -> None:
    """Images must be finite and lie in [0, 1] (normalization lives inside the model); inside
    :func:`deferred_image_checks` the range is noted for the caller to check."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise AdvfeatError(
            f"images must be a floating-point tensor with values in [0, 1], got {got} "
            f"(convert uint8 images with x.float() / 255)"
        )
    if x.numel() == 0:
        return
    deferred = _DEFERRED_IMAGE_CHECKS.get()
    if deferred is not None:
        deferred.observe(x)
        return
    # one copy to the host: min and max are NaN / infinite exactly when some value is
    lo, hi = torch.stack([x.detach().min(), x.detach().max()]).tolist()
    refusal = _range_refusal(lo, hi, tol)
    if refusal is None:
        return
    if strict:
        raise AdvfeatError(refusal)
    warnings.warn(refusal, stacklevel=3)


@contextmanager
def attack_guard(
    model: nn.Module, *, bn_mode: BNMode = "eval", branch: str | None = None
) -> Iterator[None]:
    """Put ``model`` in the state an attack runs in, and restore everything afterwards.

    Parameters stop requiring gradients (so no weight gradient is ever built and ``.grad`` is
    untouched), BN statistics are frozen, the BN mode and branch are as asked.
    """
    if bn_mode not in ("eval", "train", "keep"):
        raise AdvfeatError(f"bn_mode must be 'eval', 'train' or 'keep', got {bn_mode!r}")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    with restored_train_flags(model.modules()):
        try:
            for p in params:
                p.requires_grad_(False)
            if bn_mode == "eval":
                model.eval()
            elif bn_mode == "train":
                model.train()
            with ExitStack() as stack:
                stack.enter_context(frozen_bn_statistics(model))
                if branch is not None:
                    from advfeat.norm import use_branch

                    stack.enter_context(use_branch(model, branch))
                yield
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)


class Attack(ABC):
    """Base class of every attack (pixel or feature space).

    Args:
        model: the network attacked; images in [0, 1] go in, logits (or a task output) come out.
        loss_fn: ``loss_fn(output, target)`` to maximise (minimise when ``targeted``); defaults to
            summed cross-entropy. Detection and segmentation losses plug in here.
        targeted: minimise ``loss_fn`` towards ``target`` instead of maximising it.
        bn_mode: ``"eval"`` (running statistics, the default), ``"train"`` (batch statistics,
            running statistics still untouched) or ``"keep"`` (the model's current flags).
        branch: BN branch to attack through (AdvProp attacks through its auxiliary BN).
        seed: seed of the attack's own random generator (random starts, noise), so attacks are
            reproducible without touching the global RNG.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: LossFn | None = None,
        targeted: bool = False,
        bn_mode: BNMode = "eval",
        branch: str | None = None,
        seed: int | None = None,
    ) -> None:
        if bn_mode not in ("eval", "train", "keep"):
            raise AdvfeatError(f"bn_mode must be 'eval', 'train' or 'keep', got {bn_mode!r}")
        self.model = model
        self.loss_fn: LossFn = loss_fn or default_loss
        self.targeted = targeted
        self.bn_mode: BNMode = bn_mode
        self.branch = branch
        self.seed = seed
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The attack's random generator on ``device`` (``None`` → the global RNG)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def objective(self, output: Any, target: Tensor) -> Tensor:
        """Scalar to *ascend*: the loss, negated for targeted attacks."""
        loss = self.loss_fn(output, target)
        if loss.ndim > 0:
            loss = loss.sum()
        return -loss if self.targeted else loss

    def __call__(self, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise AdvfeatError(
                "attacks need input gradients: call them outside torch.inference_mode() "
                "(inside torch.no_grad() is fine)"
            )
        self.validate(x)
        with (
            attack_guard(self.model, bn_mode=self.bn_mode, branch=self.branch),
            torch.enable_grad(),
        ):
            result = self.perturb(x.detach(), y.detach() if isinstance(y, Tensor) else y, **kwargs)
        return self.finalize(x.detach(), result.detach())

    def validate(self, x: Tensor) -> None:
        """Check the input; pixel attacks require images in [0, 1]."""
        check_image_range(x)

    def finalize(self, x: Tensor, result: Tensor) -> Tensor:
        """Enforce the output invariant once more (ε-ball and [0, 1]); subclasses refine."""
        return result.clamp(0, 1)

    @abstractmethod
    def perturb(self, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        """Return the attacked version of ``x`` (called inside the guard)."""

    def __repr__(self) -> str:
        keys = ("eps", "alpha", "steps", "norm", "bn_mode", "branch", "targeted")
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys if hasattr(self, k))
        return f"{type(self).__name__}({args})"
