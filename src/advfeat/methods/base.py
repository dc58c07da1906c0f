"""The method contract: a training objective that turns (model, batch) into a loss and logs.

A :class:`Method` plugs into the project's trainer, into a user's own loop, or into Lightning::

    method = advfeat.build_method("afan")              # paper defaults, validated options
    model = method.prepare(model)                      # e.g. converts BN to multi-branch BN
    opt = torch.optim.SGD(method.parameter_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    for x, y in loader:
        out = method(model, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

The trainer prepares through :meth:`Method.prepare_with`, which hands the method a
:class:`PrepareContext`: the shape of one input image and the initial weights read from
:meth:`Method.initial_checkpoint` (methods never read checkpoint files themselves)::

    model = method.prepare_with(model, PrepareContext(input_shape=(3, 32, 32), initial=weights))

Methods are ``nn.Module``\\ s so that learnable method state (L-ALFA's strengths η) is saved in
checkpoints and optimised with the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from advfeat.checkpoint import InitialWeights, read_initial_weights
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.options import Choice, check_options
from advfeat.sites import unwrap_model as unwrap
from advfeat.tasks.base import Task
from advfeat.tasks.classification import ClassificationTask

__all__ = [
    "ATTACK_BN_MODE",
    "ATTACK_BN_MODES",
    "Method",
    "MethodOutput",
    "PrepareContext",
    "unwrap",
]

ATTACK_BN_MODES: tuple[str, ...] = ("train", "eval")
"""How BN layers normalise while a training attack runs: batch statistics or running ones."""
ATTACK_BN_MODE = Choice(*ATTACK_BN_MODES)
"""The constraint of every method's ``attack_bn_mode`` option."""


class MethodOutput:
    """What one training step of a method produces.

    Attributes:
        loss: the scalar to back-propagate.
        logits: the clean-batch output (for running training accuracy), when the method has one.
        log_values: scalar diagnostics (``loss_clean``, ``loss_adv``, ...) as the method gave
            them (``logs=``): detached one-element tensors, left on the device, or numbers. The
            trainer sums them on the device, so that a step never waits for it.
        logs: the same diagnostics as floats (reading them waits for the device).
    """

    def __init__(
        self,
        loss: Tensor,
        logits: Tensor | None = None,
        logs: Mapping[str, Tensor | float] | None = None,
    ) -> None:
        self.loss = loss
        self.logits = logits
        self.log_values: dict[str, Tensor | float] = dict(logs or {})

    @property
    def logs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.log_values.items()}

    def __repr__(self) -> str:
        return f"MethodOutput(loss={self.loss!r}, logits={self.logits!r}, logs={self.log_values!r})"


@dataclass(frozen=True)
class PrepareContext:
    """What the caller knows about the model a method prepares (the trainer fills both).

    Attributes:
        input_shape: the shape of one input image, ``(C, H, W)``, for methods that size a
            module by running the model once (AFA's weight generator).
        initial: the weights the method starts from, read from :meth:`Method.initial_checkpoint`
            by the caller (or given directly, e.g. by the benchmark).
    """

    input_shape: tuple[int, ...] | None = None
    initial: InitialWeights | None = None


class Method(nn.Module):
    """Base class of all training methods.

    Subclasses set ``name``, ``paper`` and optionally ``training_recipe``, declare their options as
    a nested dataclass ``Options`` whose defaults are the paper's defaults (a field declared with
    :func:`advfeat.options.option` carries its constraint and is checked generically), and
    implement :meth:`forward`; :meth:`validate_options` adds the rules that tie options together.
    ``self.opts`` holds the validated options.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    """The tasks (:attr:`advfeat.tasks.Task.name`) the method trains."""
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    """Per task, option defaults that differ from the classification ones (the paper's
    detection / segmentation setting); the user's options win."""
    training_recipe: ClassVar[dict[str, Any]] = {}
    """The learning-rate schedule of the method's paper (``TrainConfig`` schedule keys);
    ``advfeat train --recipe NAME`` (or ``--recipe paper``) applies it whole, to any method."""

    @dataclass
    class Options:
        pass

    def __init__(self, *, task: Task | None = None, **options: Any) -> None:
        super().__init__()
        self.task: Task = task if task is not None else ClassificationTask()
        if not isinstance(self.task, Task):
            raise AdvfeatError(f"task must be an advfeat.tasks.Task, got {type(task).__name__}")
        if self.task.name not in self.tasks:
            raise AdvfeatError(
                f"method {self.name!r} has no {self.task.name} version; it trains "
                f"{', '.join(self.tasks)}"
            )
        options = {**self.task_defaults.get(self.task.name, {}), **options}
        self.opts = self.parse_options(options)
        check_options(self.name, self.opts)  # the constraints declared with option(...)
        self.validate_options()

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        known = {f.name: f for f in dataclasses.fields(cls.Options)}
        for key in options:
            if key not in known:
                raise unknown_name(f"option of method {cls.name!r}", key, known)
        return cls.Options(**options)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The paper defaults of this method's options."""
        return dataclasses.asdict(cls.Options())

    def validate_options(self) -> None:
        """Raise :class:`AdvfeatError` on inconsistent options (subclasses extend)."""

    def check_run(self) -> None:
        """Raise :class:`AdvfeatError` when a run trained from its configuration alone could not
        start (AdvBN without the checkpoint it fine-tunes): checked with the run's configuration,
        before any run of ``advfeat train`` or ``advfeat compare`` starts. Code that hands the
        initial weights to :meth:`prepare_with` itself is not concerned."""

    context: PrepareContext = PrepareContext()
    """The context of the current :meth:`prepare` (set by :meth:`prepare_with`)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """One-time model surgery before training (BN conversion, freezing); returns the model."""
        return model

    def prepare_with(self, model: nn.Module, context: PrepareContext) -> nn.Module:
        """:meth:`prepare` with what the caller knows about the model (input shape, initial
        weights); the initial weights are released afterwards."""
        self.context = context
        try:
            return self.prepare(model)
        finally:
            self.context = PrepareContext(input_shape=context.input_shape)

    def initial_checkpoint(self) -> str | None:
        """Path of the ``advfeat train`` checkpoint whose weights this method starts from, if
        any (subclasses with such an option override); the caller reads it for :meth:`prepare`."""
        return None

    def initial_weights(self) -> InitialWeights | None:
        """The initial weights handed in the context, else those of :meth:`initial_checkpoint`."""
        if self.context.initial is not None:
            return self.context.initial
        path = self.initial_checkpoint()
        return read_initial_weights(path, method=self.name) if path else None

    def parameter_groups(self, model: nn.Module, **group: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the trainable parameters of the model and of the method."""
        params = [p for p in model.parameters() if p.requires_grad]
        params += [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise AdvfeatError(f"method {self.name!r} left no trainable parameter in the model")
        return [{"params": params, **group}]

    def forward(self, model: nn.Module, x: Any, y: Any) -> MethodOutput:  # type: ignore[override]
        raise NotImplementedError

    capturable_step: ClassVar[bool] = False
    """Whether this method's training step was checked for capture (:meth:`capture_refusal`):
    a method sets it after checking, or overrides :meth:`capture_refusal` where the answer
    depends on its options."""

    def capture_refusal(self) -> str | None:
        """Why a training step of this method cannot be captured as one CUDA graph
        (:mod:`advfeat.train.graphs`), or ``None`` when it can: a step that never reads the
        device and makes no per-step decision in Python (no random number drawn on the CPU, no
        tensor made from Python values that change, no counter kept in an attribute), on a task
        whose batches are captured."""
        if not self.task.capturable:
            return f"{self.task.name} batches are not captured"
        if not self.capturable_step:
            return f"method {self.name!r} is not checked for CUDA-graph capture"
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Called by the trainer after each epoch; returns values to add to the history."""
        return {}

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate after training (e.g. with the main BN branch selected)."""
        return model

    @staticmethod
    def detach_logs(**values: Tensor | float) -> dict[str, Tensor | float]:
        """The diagnostics for :class:`MethodOutput`: tensors detached (left on their device,
        read later without stalling the step), numbers as floats."""
        return {k: v.detach() if isinstance(v, Tensor) else float(v) for k, v in values.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.opts).items())


def cross_entropy(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy, the classification loss every method starts from."""
    return torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
