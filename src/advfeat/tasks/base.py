"""The task seam: what a task provides to methods, trainers and evaluation.

A :class:`Task` (classification, detection, segmentation) knows its batches (collate, move to a
device, check, count), its loss (the scalar a method trains with and the terms it logs), the
scalar attacks ascend, its metrics and the primary one, and how to run the clean training
forward pass so that a feature method can afterwards run *only what follows a site*
(:class:`TaskPass`). Methods (ALFA, A-FAN, standard training) talk to the task only, so one
method class serves every task; the trainer talks to the task only, so it has no
classification-or-not branches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from advfeat.capture import block_capture
from advfeat.data.bundle import DatasetBundle
from advfeat.errors import AdvfeatError
from advfeat.modes import restored_train_flags
from advfeat.norm.stats import batchnorm_modules
from advfeat.sites import SiteSplit, capture_features, replace_features, uncompiled, unwrap_model

__all__ = [
    "DenseTask",
    "ForwardPass",
    "HookPass",
    "Replacements",
    "RngReplay",
    "Task",
    "TaskPass",
    "batchnorm_eval",
    "check_images",
    "described",
]

Replacements = Mapping[str, Callable[[Any], Any]]
"""``{site: fn(feature) -> feature}``, applied with :func:`advfeat.sites.replace_features`."""


def described(value: Any) -> str:
    """What an error message says a value is: ``dtype (shape)`` for a tensor, else its type."""
    return (
        f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
    )


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
            raise AdvfeatError(
                f"each image must be a float tensor {'[N, C, H, W]' if stacked else '[C, H, W]'}, "
                f"got {described(x)}"
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
        if self.devices:
            block_capture("a pass replays the random stream (CUDA RNG state is read and set)")
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if self.devices else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.devices[0])
            yield


def _device_of(x: Any) -> torch.device:
    first = x if isinstance(x, Tensor) else x[0]
    return first.device


class TaskPass(ABC):
    """The clean training pass of a batch, and what follows each site after it.

    Attributes:
        output: the model's output (logits, a segmenter's output, a detector's loss dict).
        loss: the training loss of the clean pass; ``parts``: its terms.
        features: the output of each requested site in this pass, with its autograd graph.
        logits: the clean logits of a classifier (running training accuracy), else ``None``.

    :meth:`tail` runs what follows a site when it outputs another feature, as the full model
    would (same random draws as the clean pass: sampled proposals, dropout masks), reusing
    whatever the clean pass computed before the site.
    """

    output: Any
    loss: Tensor
    parts: dict[str, Tensor]
    features: dict[str, Tensor]
    logits: Tensor | None = None

    @abstractmethod
    def tail(self, site: str, feature: Tensor, *, prefix_grad: bool) -> Any:
        """The task output (what :meth:`Task.output_loss` takes) with ``feature`` at ``site``.

        ``prefix_grad``: whether values computed before the site that reach the output by
        another path than the site (skip connections, a detector's RPN losses) keep their
        gradient (``adv_grad="full"``) or are constants (``"tail"``).
        """

    def joint_tail(
        self, site: str, feature: Tensor, later: Replacements, *, prefix_grad: bool
    ) -> Any:
        """:meth:`tail` from ``site`` with the later sites of ``later`` replaced inside it (one
        pass through several perturbed sites, ALFA Eq. 5): models that map images to outputs."""
        raise AdvfeatError(
            f"{type(self).__name__} runs what follows one site at a time; a pass through "
            f"several perturbed sites needs a model that maps images to outputs"
        )

    def tail_fn(self, site: str) -> Callable[[Tensor], Any]:
        """``feature -> output``: :meth:`tail` for an attack (no gradient to the prefix)."""
        return lambda feature: self.tail(site, feature, prefix_grad=False)

    def attack_tail(self, site: str, feature: Tensor, later: Replacements) -> Any:
        """:meth:`joint_tail` for a multi-site attack (no gradient to the prefix)."""
        if not later:
            return self.tail(site, feature, prefix_grad=False)
        return self.joint_tail(site, feature, later, prefix_grad=False)


class Task(ABC):
    """Everything a method, the trainer and evaluation need to know about a task.

    Subclasses set ``name``, ``metrics`` (what :meth:`evaluate` returns) and
    ``primary_metric`` (the one that selects the best epoch; under its evaluation name,
    :attr:`eval_metric`, the headline of the evaluation suites).
    """

    name: str = ""
    models: Container[str] = ()
    """The model names this task builds besides classifiers (:func:`advfeat.tasks.model_task`)."""
    metrics: tuple[str, ...] = ()
    primary_metric: str = ""
    eval_names: ClassVar[Mapping[str, str]] = {}
    """The name the evaluation suites give a metric of :meth:`evaluate` where it differs from
    training's (classification's ``acc`` is ``top1`` there, beside ``top5``)."""
    seeded_evaluation: bool = True
    """Whether :meth:`evaluate` may draw random numbers (sampled proposals, dropout while an
    attack runs the model in training mode): the evaluation suites then run each unit under a
    seed of its own and record it (:func:`advfeat.eval.suites.metrics.task_metrics`)."""
    autocast: bool = True
    """Whether training may run under autocast (torchvision's box coder wants float32)."""
    capturable: bool = False
    """Whether a training step on this task's batches may be captured as a CUDA graph (tensor
    batches of one shape, no host reads: classification)."""
    classifier: ClassVar[bool] = False
    """Whether the model is a classifier (logits of ``num_classes`` classes against integer
    labels): :class:`~advfeat.tasks.ClassificationTask` and its subclasses. Evaluation runs a
    classifier with the classifier protocol (robust accuracy, the suites that measure class
    accuracy); every other task (detection, segmentation, a task of one's own) with the task
    protocol (its :meth:`evaluate`, image-space PGD on :meth:`attack_loss`)."""

    # ---------------------------------------------------------------------------- batches
    @abstractmethod
    def collate(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        """DataLoader ``collate_fn``."""

    @abstractmethod
    def to_device(self, x: Any, y: Any, device: torch.device) -> tuple[Any, Any]:
        """Move a collated batch."""

    def batch_size(self, x: Any) -> int:
        """Number of images in a batch."""
        return len(x) if isinstance(x, list | tuple) else int(x.shape[0])

    def check(self, x: Any, y: Any) -> None:
        """Raise :class:`AdvfeatError` when a batch does not fit the task or the model."""
        return None

    # ----------------------------------------------------------------------------- losses
    @abstractmethod
    def output_loss(self, output: Any, y: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``(training loss, its terms)`` of a model output."""

    @abstractmethod
    def attack_loss(self, output: Any, y: Any) -> Tensor:
        """The scalar that feature and image attacks ascend, from a model output."""

    def logits(self, output: Any) -> Tensor | None:
        """The clean logits of a classifier's output (running training accuracy), else ``None``."""
        return None

    def running_metrics(self, logits: Tensor | None, y: Any) -> dict[str, Tensor]:
        """Per-batch sums of the training metrics the trainer averages over an epoch, as
        one-element tensors left on the device (the trainer reads them once per epoch)."""
        return {}

    def log_parts(self, parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Loss terms worth logging besides the total (none for a single-term loss)."""
        return dict(parts) if len(parts) > 1 or not self.classifier else {}

    def forward_output(self, model: nn.Module, x: Any, y: Any) -> Any:
        """The model's output on a batch (the loss dict for a detector in training mode)."""
        return model(x)

    def loss(
        self, model: nn.Module, x: Any, y: Any, replacements: Replacements | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(training loss, its terms)``; ``replacements`` replace site outputs during the pass."""
        ctx: AbstractContextManager[Any] = (
            replace_features(model, replacements) if replacements else nullcontext()
        )
        with ctx:
            return self.output_loss(self.forward_output(model, x, y), y)

    def attack_objective(
        self, model: nn.Module, x: Any, y: Any, replacements: Replacements | None = None
    ) -> Tensor:
        """What attacks ascend (a scalar), ``replacements`` applied during the pass."""
        ctx: AbstractContextManager[Any] = (
            replace_features(model, replacements) if replacements else nullcontext()
        )
        with ctx:
            return self.attack_loss(self.forward_output(model, x, y), y)

    @abstractmethod
    def clean_pass(self, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> TaskPass:
        """Run the training forward pass, capturing ``sites`` (see :class:`TaskPass`)."""

    # --------------------------------------------------------------------- model, metrics
    @abstractmethod
    def build_model(self, name: str, data: DatasetBundle, **options: Any) -> nn.Module:
        """This task's model ``name`` for ``data`` (its classes, normalisation and image size),
        with a run's ``model_options``; a name the task has no model of raises
        :class:`AdvfeatError`."""

    @abstractmethod
    def default_sites(self, model: nn.Module) -> list[str]:
        """The feature sites A-FAN perturbs by default in this task's models."""

    def attack_bn_mode(self, bn_mode: str) -> str:
        """The BN mode of :func:`advfeat.attacks.base.attack_guard` for an attack in ``bn_mode``."""
        return bn_mode

    def attack_mode(self, model: nn.Module, bn_mode: str) -> AbstractContextManager[Any]:
        """Extra state the model runs in during an attack (inside the attack's guard)."""
        return nullcontext()

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        loader: Any,
        *,
        device: torch.device | str = "cpu",
        attack: Any = None,
        detailed: bool = False,
    ) -> dict[str, Any]:
        """Metrics of ``model`` on the collated batches of ``loader`` (:attr:`metrics`), on the
        images ``attack(model, images, targets)`` returns when an attack is given; ``detailed``
        adds secondary metrics where the task has them (top-5 accuracy). The model's train /
        eval flags are restored afterwards. The one evaluation contract of every task: the
        trainer and the ``clean``, ``attacks`` and ``shift`` suites call it."""

    @property
    def eval_metric(self) -> str:
        """The headline metric under its evaluation name (:attr:`eval_names`): what the
        ``shift`` suite averages over domains (``top1``; ``ap50``, VOC mAP@0.5, A-FAN Table 5;
        ``miou``, Table 6)."""
        return self.eval_names.get(self.primary_metric, self.primary_metric)


class Meter(Protocol):
    """Accumulates a dense task's metric over batches: ``update(predictions, targets)``, then
    ``compute()`` (AP / mIoU, :mod:`advfeat.tasks.metrics`)."""

    def update(self, predictions: Any, targets: Any) -> None: ...
    def compute(self) -> dict[str, Any]: ...


class DenseTask(Task):
    """Base of the detection and segmentation tasks: ``num_classes`` includes the background.

    A dense task says how its model predicts (:meth:`predict`) and what measures the
    predictions (:meth:`meter`); :meth:`evaluate` is the one evaluation loop of both.
    """

    stacked_images = True

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise AdvfeatError(
                f"num_classes counts the background and must be an integer >= 2, got {num_classes!r}"
            )
        self.num_classes = num_classes

    @abstractmethod
    def predict(self, model: nn.Module, images: Any) -> Any:
        """The model's predictions for ``images`` (model in eval mode)."""

    @abstractmethod
    def meter(self) -> Meter:
        """A fresh accumulator of this task's metrics."""

    def evaluate(
        self,
        model: nn.Module,
        loader: Any,
        *,
        device: torch.device | str = "cpu",
        attack: Any = None,
        detailed: bool = False,
    ) -> dict[str, Any]:
        """The task's metrics on ``loader`` (:meth:`meter`); ``attack(model, images, targets)``
        perturbs the images first (robust AP / mIoU, A-FAN Tables 5 and 6). The model's
        train/eval flag is restored afterwards."""
        device = torch.device(device)
        was_training = model.training
        meter = self.meter()
        try:
            for images, targets in loader:
                images, targets = self.to_device(images, targets, device)
                if attack is not None:
                    images = attack(model, images, targets)
                meter.update(self.predict(model, images), targets)
        finally:
            model.train(was_training)
        return meter.compute()

    def attack_bn_mode(self, bn_mode: str) -> str:
        """Dense models return their losses in training mode: :meth:`attack_mode` sets the
        modes, the attack's guard keeps them."""
        return "keep"

    @contextmanager
    def attack_mode(self, model: nn.Module, bn_mode: str) -> Iterator[None]:
        """Training mode (losses available), BN in eval mode when ``bn_mode == "eval"``; every
        train/eval flag is restored afterwards. Feature attacks run inside it with the guard's
        ``bn_mode="keep"``; :class:`~advfeat.tasks.DensePGD` inside a ``"train"`` guard."""
        with restored_train_flags(model.modules()):
            model.train()
            with batchnorm_eval(model) if bn_mode == "eval" else nullcontext():
                yield


class ForwardPass(TaskPass):
    """The pass of a task whose model maps images to an output (classification, segmentation).

    The tail after a site is :meth:`advfeat.sites.SiteSplit.tail`: only the part of the network
    after the site runs when the model splits there, else the full-model fallback. With
    ``replay`` every tail replays the clean pass's random stream (dropout masks); the part
    before the site draws no random numbers in the supported models, so the stream the tail
    sees is the one the clean pass's tail saw.
    """

    def __init__(
        self, task: Task, model: nn.Module, x: Any, y: Any, sites: Sequence[str], *, replay: bool
    ) -> None:
        model = uncompiled(model)  # the captures and replacements below are hooks
        self.task, self.model, self.x, self.y = task, model, x, y
        self.inner = unwrap_model(model)
        self.rng = RngReplay(_device_of(x)) if replay else None
        # clone: a BN site followed by `out += identity` (torchvision) is modified in place;
        # frontier: the values that cross the cut, so that every tail runs only after the site
        with capture_features(self.inner, list(sites), clone=True, frontier=True) as captured:
            self.output = task.forward_output(model, x, y)
        self.loss, self.parts = task.output_loss(self.output, y)
        self.features = {s: _tensor_feature(captured.get(s), s) for s in sites}
        self.logits = task.logits(self.output)

    def tail(self, site: str, feature: Tensor, *, prefix_grad: bool) -> Any:
        return self.joint_tail(site, feature, {}, prefix_grad=prefix_grad)

    def joint_tail(
        self, site: str, feature: Tensor, later: Replacements, *, prefix_grad: bool
    ) -> Any:
        split = SiteSplit(self.inner, site, prefix_grad=prefix_grad)
        ctx = self.rng.replay() if self.rng is not None else nullcontext()
        with ctx:
            return split.tail(feature, later, x=self.x)


class HookPass(TaskPass):
    """The pass of any model: every tail runs the whole model with the site's output replaced.

    The reference for models the task cannot run stage by stage (wrapped, or not of a known
    family). Each tail replays the clean pass's random stream
    (:class:`RngReplay`); with ``prefix_grad=False`` the part before the site runs without
    gradients.
    """

    def __init__(self, task: Task, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> None:
        model = uncompiled(model)  # the captures and replacements below are hooks
        self.task, self.model, self.x, self.y = task, model, x, y
        self.inner = unwrap_model(model)
        self.rng = RngReplay(_device_of(x))
        with capture_features(self.inner, list(sites), clone=True) as captured:
            self.output = task.forward_output(model, x, y)
        self.loss, self.parts = task.output_loss(self.output, y)
        self.features = {s: _tensor_feature(captured.get(s), s) for s in sites}

    def tail(self, site: str, feature: Tensor, *, prefix_grad: bool) -> Any:
        enabled = torch.is_grad_enabled()
        calls = 0

        def at_site(out: Any) -> Tensor:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise AdvfeatError(f"feature site {site!r} ran {calls} times in one forward pass")
            if isinstance(out, Tensor) and out.shape != feature.shape:
                raise AdvfeatError(
                    f"site {site!r} output {tuple(out.shape)} in this pass but "
                    f"{tuple(feature.shape)} in the clean pass; a ROI-head site needs the same "
                    f"proposals in every pass (use attack_bn_mode='train', or a backbone with "
                    f"frozen batch norm)"
                )
            torch.set_grad_enabled(enabled)  # what follows the site trains
            return feature

        try:
            with (
                self.rng.replay(),
                replace_features(self.inner, {site: at_site}),
            ):
                torch.set_grad_enabled(enabled and prefix_grad)
                return self.task.forward_output(self.model, self.x, self.y)
        finally:
            torch.set_grad_enabled(enabled)


def _tensor_feature(value: Any, site: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise AdvfeatError(
            f"feature site {site!r} did not output a tensor during the forward pass "
            f"(got {type(value).__name__}); choose a module that outputs a feature map"
        )
    return value


def last_child(model: nn.Module, parent: str) -> str:
    """``parent.<its last child>`` (``backbone.body.layer4`` for a ResNet body)."""
    module = model.get_submodule(parent)
    names = [n for n, _ in module.named_children()]
    if not names:
        raise AdvfeatError(f"{parent!r} has no child modules; name the feature sites explicitly")
    return f"{parent}.{names[-1]}"
