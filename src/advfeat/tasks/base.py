"""What a dense-prediction task provides to methods, trainers and evaluation.

A :class:`DenseTask` turns ``(model, images, targets)`` into a scalar training loss (optionally
with feature sites replaced, for feature augmentation), knows which loss the attacks ascend,
checks user data, collates batches, predicts and evaluates. :class:`advfeat.tasks.DetectionTask`
and :class:`advfeat.tasks.SegmentationTask` implement it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.modes import restored_train_flags
from advfeat.norm.stats import batchnorm_modules
from advfeat.sites import replace_features

__all__ = ["DenseTask", "Replacements", "RngReplay", "batchnorm_eval", "check_images"]

Replacements = Mapping[str, Callable[[Any], Any]]
"""``{site: fn(feature) -> feature}``, applied with :func:`advfeat.sites.replace_features`."""


def check_images(images: Any, *, stacked: bool) -> None:
    """Images are float tensors ``[3, H, W]`` (a list) or ``[N, 3, H, W]`` with values in [0, 1]."""
    items = [images] if stacked else images
    if stacked and (not isinstance(images, Tensor) or images.ndim != 4):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise AdvfeatError(f"images must be a float tensor [N, C, H, W] in [0, 1], got {got}")
    if not stacked and (
        isinstance(images, Tensor) or not isinstance(images, Sequence) or not images
    ):
        raise AdvfeatError(
            "detection images must be a non-empty list of [C, H, W] tensors in [0, 1]"
        )
    for x in items:
        if (
            not isinstance(x, Tensor)
            or not x.is_floating_point()
            or x.ndim != (4 if stacked else 3)
        ):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise AdvfeatError(
                f"each image must be a float tensor {'[N, C, H, W]' if stacked else '[C, H, W]'}, got {got}"
            )
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise AdvfeatError(
                f"images must lie in [0, 1] (normalization lives inside the model), got values in [{lo:.3g}, {hi:.3g}]"
            )


@contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """Every BN layer in eval mode (running statistics) while the rest keeps its mode."""
    layers = batchnorm_modules(model)
    with restored_train_flags(layers):
        for m in layers:
            m.eval()
        yield


class RngReplay:
    """The global RNG state taken before a clean pass, to replay for the passes that follow.

    Faster R-CNN samples anchors and proposals (``BalancedPositiveNegativeSampler``) and
    DeepLab's ASPP has dropout: replaying the clean pass's random stream makes each attack and
    adversarial pass see the same sampled proposals / dropout masks as the clean pass, so a
    perturbation of a ROI-head feature refers to the same regions. The global RNG is left as
    the clean pass left it.
    """

    def __init__(self, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if self.devices else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.devices[0])
            yield


class DenseTask(ABC):
    """Base of the detection and segmentation tasks (see the module docstring)."""

    name = ""
    stacked_images = True

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise AdvfeatError(
                f"num_classes counts the background and must be an integer >= 2, got {num_classes!r}"
            )
        self.num_classes = num_classes

    # ------------------------------------------------------------------------------ losses
    @abstractmethod
    def loss_parts(self, model: nn.Module, images: Any, targets: Any) -> dict[str, Tensor]:
        """The model's training loss terms on a batch (model in training mode)."""

    @abstractmethod
    def attack_terms(self, parts: dict[str, Tensor]) -> Tensor:
        """The scalar that feature and image attacks ascend, from the loss terms."""

    def loss(
        self, model: nn.Module, images: Any, targets: Any, replacements: Replacements | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(training loss, its terms)``; ``replacements`` replace site outputs during the pass."""
        ctx: AbstractContextManager[Any] = (
            replace_features(model, replacements) if replacements else nullcontext()
        )
        with ctx:
            parts = self.loss_parts(model, images, targets)
        return torch.stack(list(parts.values())).sum(), parts

    def attack_objective(
        self, model: nn.Module, images: Any, targets: Any, replacements: Replacements | None = None
    ) -> Tensor:
        """What attacks ascend (a scalar)."""
        ctx: AbstractContextManager[Any] = (
            replace_features(model, replacements) if replacements else nullcontext()
        )
        with ctx:
            return self.attack_terms(self.loss_parts(model, images, targets))

    # --------------------------------------------------------------------------- data, model
    @abstractmethod
    def check(self, images: Any, targets: Any) -> None:
        """Raise :class:`AdvfeatError` when a batch does not fit the task or the model."""

    @abstractmethod
    def collate(self, batch: Sequence[tuple[Tensor, Any]]) -> tuple[Any, Any]:
        """DataLoader ``collate_fn``."""

    @abstractmethod
    def to_device(self, images: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
        """Move a collated batch."""

    @abstractmethod
    def default_sites(self, model: nn.Module) -> list[str]:
        """A-FAN's sites: the last backbone stage, then the task head (ROI box head / decoder)."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        loader: Any,
        *,
        device: torch.device | str = "cpu",
        attack: Any = None,
    ) -> dict[str, Any]:
        """Metrics of ``model`` on ``loader`` (on images attacked by ``attack`` when given)."""

    def attack_mode(self, model: nn.Module, bn_mode: str) -> AbstractContextManager[Any]:
        """Mode in which attacks run the model: training mode (losses available), BN as asked.

        Call inside :func:`advfeat.attacks.base.attack_guard` with ``bn_mode="train"`` (which
        freezes running statistics and restores every flag afterwards).
        """
        model.train()
        return batchnorm_eval(model) if bn_mode == "eval" else nullcontext()


def last_child(model: nn.Module, parent: str) -> str:
    """``parent.<its last child>`` (``backbone.body.layer4`` for a ResNet body)."""
    module = model.get_submodule(parent)
    names = [n for n, _ in module.named_children()]
    if not names:
        raise AdvfeatError(f"{parent!r} has no child modules; name the feature sites explicitly")
    return f"{parent}.{names[-1]}"
