"""Whole training steps captured as one CUDA graph and replayed (``cuda_graph``).

A small model at a CIFAR batch is bound by kernel launches and Python, not by the chip: a
ResNet-20 step of ALFA launches thousands of small kernels from Python. Captured once, the whole
step (the method's passes and attacks, the backward pass, the optimiser's update, the EMA and the
epoch's running sums) replays as one launch. What a graph fixes at capture and what it reads:

* the kernels, their order and every Python number are fixed: a step may not read the device
  (no host synchronisation) nor make a per-step decision in Python (random numbers drawn on the
  CPU, a counter in an attribute). Each method says whether its step qualifies
  (:meth:`advfeat.methods.Method.capture_refusal`); ``cuda_graph=auto`` captures only those;
* the batch is copied into static input tensors before each replay, and the learning rate and
  the step index live in device tensors that the host fills (:func:`use_tensor_learning_rates`);
* random numbers drawn on the device (random starts, A-FAN's strengths) are new at every
  replay: the default CUDA generator advances by the graph's draws each time.

Shapes must stay fixed: the trainer's batches are full (``drop_last``). The first ``warmup``
steps run eagerly on a side stream (cuDNN autotuning, the optimiser's lazy state), as
``torch.cuda.graph`` requires; a step whose capture fails runs eagerly, and so does the rest of
the run (``cuda_graph=auto``; ``true`` raises instead).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from advfeat.capture import noting_capture_blockers
from advfeat.errors import AdvfeatError
from advfeat.train.config import TrainConfig

__all__ = [
    "CUDA_GRAPH",
    "CapturedStep",
    "CudaGraphs",
    "GraphBackend",
    "graph_refusal",
    "resolve_cuda_graph",
    "run_refusal",
    "use_tensor_learning_rates",
]

CUDA_GRAPH = ("auto", "true", "false")
"""Values of ``cuda_graph``: ``auto`` captures the step when :func:`graph_refusal` finds no
reason against it, ``true`` requires it (an error names the reason), ``false`` never captures."""


class GraphBackend(Protocol):
    """How a step is warmed up and captured: :class:`CudaGraphs` on a GPU; tests pass one that
    replays by calling the step again."""

    def warm(self, run: Callable[[], None]) -> None:
        """Run one eager step before capture."""

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        """Record ``run`` and return what replays it."""


class CudaGraphs:
    """``torch.cuda.graph`` capture; eager warm-up steps on a side stream (PyTorch's CUDA graphs
    notes: whole-network capture)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def warm(self, run: Callable[[], None]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            run()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run()
        except Exception as exc:
            try:  # a capture that fails half-way can leave the CUDA random generator unusable
                torch.rand(1, device=self.device)
            except RuntimeError:
                raise AdvfeatError(
                    f"capturing the training step failed ({_reason(exc)}) and left this "
                    "process's CUDA random generator unusable; the last checkpoint is kept: "
                    "run again with cuda_graph=false (and --resume)"
                ) from exc
            raise
        return graph.replay


def _reason(exc: BaseException) -> str:
    """An exception in one line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


class CapturedStep:
    """``body(*inputs)`` run eagerly ``warmup`` times, then captured once over static copies of
    the inputs and replayed: calling ``step(x, y)`` copies the batch into the static tensors and
    runs the step (eagerly, by capture then replay, or by replay).

    ``body`` must leave its results in tensors that outlive it and are updated in place (the
    trainer's running sums, divergence watch, weights and optimiser state); what it returns is
    ignored. ``on_failure(reason)`` is called once when capture fails, after which every step
    runs eagerly; ``required=True`` raises :class:`AdvfeatError` instead.
    """

    def __init__(
        self,
        body: Callable[..., Any],
        backend: GraphBackend,
        *,
        warmup: int = 3,
        required: bool = False,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        if warmup < 1:
            raise AdvfeatError(f"a captured step needs >= 1 eager warm-up step, got {warmup}")
        self.body = body
        self.backend = backend
        self.warmup = warmup
        self.required = required
        self.on_failure = on_failure
        self.inputs: list[Tensor] | None = None
        self.replay: Callable[[], None] | None = None
        self.failure: str | None = None
        """Why capture failed (every step then runs eagerly), or ``None``."""
        self.eager_steps = 0

    @property
    def captured(self) -> bool:
        return self.replay is not None

    def _stage(self, batch: Sequence[Tensor]) -> list[Tensor]:
        if self.inputs is None:
            self.inputs = [t.detach().clone() for t in batch]
            return self.inputs
        for static, new in zip(self.inputs, batch, strict=True):
            if static.shape != new.shape or static.dtype != new.dtype:
                raise AdvfeatError(
                    f"a captured step needs batches of one shape, got {tuple(new.shape)} "
                    f"{new.dtype} after {tuple(static.shape)} {static.dtype} (full batches: "
                    f"drop_last; or cuda_graph=false)"
                )
            static.copy_(new, non_blocking=True)
        return self.inputs

    def __call__(self, *batch: Tensor) -> None:
        inputs = self._stage(batch)
        if self.replay is not None:
            self.replay()
            return
        if self.failure is not None or self.eager_steps < self.warmup:
            self.eager_steps += 1
            if self.failure is not None:
                self.body(*inputs)
                return
            with noting_capture_blockers() as blockers:
                self.backend.warm(lambda: self.body(*inputs))
            if blockers:  # known before any capture is tried
                self._fail("; ".join(blockers), None)
            return
        try:
            replay = self.backend.capture(lambda: self.body(*inputs))
        except AdvfeatError:
            raise
        except Exception as exc:  # a host synchronisation or another op that capture refuses
            self._fail(_reason(exc), exc)
            self.body(*inputs)  # capture ran no kernel: this batch is still to be trained on
            return
        self.replay = replay
        replay()

    def _fail(self, reason: str, exc: BaseException | None) -> None:
        if self.required:
            raise AdvfeatError(
                f"cuda_graph=true: capturing the training step failed ({reason}); use "
                "cuda_graph=auto (falls back to eager steps) or false"
            ) from exc
        self.failure = reason
        if self.on_failure is not None:
            self.on_failure(reason)


def graph_refusal(
    *,
    device: torch.device,
    distributed: bool,
    compiled: bool,
    amp_dtype: torch.dtype | None,
    optimizer: str,
    method_refusal: str | None,
) -> str | None:
    """Why a run's training step cannot be captured as one CUDA graph, or ``None``."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, the device is {device}"
    if distributed:
        return "a distributed run (DDP) is not captured"
    if compiled:
        return "compile=true compiles the model instead"
    if amp_dtype is torch.float16:
        return "float16 loss scaling reads the device at each step (use amp_dtype=bfloat16)"
    if optimizer != "sgd":
        return f"only SGD's update is captured, the optimizer is {optimizer!r}"
    return method_refusal


def run_refusal(
    cfg: TrainConfig, device: torch.device, method_refusal: str | None, *, distributed: bool
) -> str | None:
    """:func:`graph_refusal` for a run's configuration (the preflight check and the trainer
    ask the same question)."""
    return graph_refusal(
        device=device,
        distributed=distributed,
        compiled=cfg.compile,
        amp_dtype=torch.float16 if cfg.amp and cfg.amp_dtype == "float16" else None,
        optimizer=cfg.optimizer,
        method_refusal=method_refusal,
    )


def resolve_cuda_graph(choice: str, refusal: str | None) -> bool:
    """Whether to capture, given ``cuda_graph`` and :func:`graph_refusal`'s answer."""
    if choice not in CUDA_GRAPH:
        raise AdvfeatError(f"cuda_graph must be one of {', '.join(CUDA_GRAPH)}, got {choice!r}")
    if choice == "false":
        return False
    if refusal is not None and choice == "true":
        raise AdvfeatError(
            f"cuda_graph=true: the training step cannot be captured ({refusal}); use "
            "cuda_graph=auto (captures when it can) or false"
        )
    return refusal is None


def use_tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold each parameter group's learning rate in a one-element tensor on ``device`` and make
    SGD's update read it there (its fused kernel takes a tensor rate without a host read), so
    that a captured update follows the schedule; the trainer fills the tensors
    (:func:`set_learning_rate`). Called again after loading a checkpoint, which brings the
    rates back as numbers or CPU tensors."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise AdvfeatError(f"tensor learning rates need SGD, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr.item()) if isinstance(lr, Tensor) else float(lr)
        group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)
        group["fused"], group["foreach"] = True, False


def set_learning_rate(group: dict[str, Any], value: float) -> None:
    """Set a parameter group's learning rate, in place when it is held in a tensor."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        lr.fill_(value)
    else:
        group["lr"] = value


def warn_capture_failed(reason: str) -> None:
    """The one line a run prints when its step could not be captured."""
    warnings.warn(
        f"cuda_graph=auto: the training step could not be captured ({reason}); training goes on "
        "with eager steps",
        stacklevel=2,
    )
