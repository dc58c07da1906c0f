"""Time training steps of several methods in one process (``advfeat bench``).

Each method gets a fresh copy of the same initial model, prepared by the method, and a full
training step (method forward, backward, SGD step) on one fixed batch. After ``warmup`` steps
each, the methods are timed in interleaved rounds (A, B, C, A, B, C, ...) so that a drift in the
machine's speed affects them alike; the median step time is reported with its ratio to
``standard`` and the ratio that the method's extra floating-point work predicts (matmul and
convolution FLOPs of one step, forward and backward, counted by ``torch.utils.flop_counter``).

Detectors and segmenters (:data:`advfeat.tasks.DETECTORS`, :data:`advfeat.tasks.SEGMENTERS`)
are benchmarked on a batch of the generated ``shapes-det`` / ``shapes-seg`` data through their
task (:mod:`advfeat.tasks`), with the methods that train that task (``standard``, ``alfa``,
``afan``) at their task defaults.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from advfeat.checkpoint import InitialWeights
from advfeat.errors import AdvfeatError
from advfeat.methods import METHODS, Method, PrepareContext
from advfeat.methods.dense import build_task_method
from advfeat.models import build_model
from advfeat.tasks import (
    DETECTORS,
    SEGMENTERS,
    ClassificationTask,
    DetectionTask,
    SegmentationTask,
    Task,
    build_detector,
    build_segmenter,
)

__all__ = ["BenchResult", "run_bench"]


@dataclass
class BenchResult:
    method: str
    step_ms: float
    step_ms_min: float
    step_ms_max: float
    ratio_vs_standard: float
    flops_per_step: float
    flops_ratio_vs_standard: float
    ratio_over_flops_ratio: float
    options: dict[str, Any]


@dataclass
class _Setup:
    task: Task
    model: nn.Module
    x: Any
    y: Any


def _setup(
    model_name: str,
    batch_size: int,
    image_size: int,
    num_classes: int,
    seed: int,
    dev: torch.device,
) -> _Setup:
    """The task, the initial model and one fixed batch on ``dev``."""
    if model_name in DETECTORS or model_name in SEGMENTERS:
        from advfeat.data import build_dataset

        detection = model_name in DETECTORS
        bundle = build_dataset(
            "shapes-det" if detection else "shapes-seg",
            n_train=batch_size,
            n_test=1,
            image_size=image_size,
            augment=False,
            seed=seed,
        )
        task: Task
        if detection:
            task = DetectionTask(bundle.num_classes)
            model = build_detector(
                model_name, bundle.num_classes, image_size=image_size, mean=bundle.mean,
                std=bundle.std,
            )  # fmt: skip
        else:
            task = SegmentationTask(bundle.num_classes)
            model = build_segmenter(
                model_name, bundle.num_classes, mean=bundle.mean, std=bundle.std
            )
        x, y = task.collate([bundle.train[i] for i in range(batch_size)])
        x, y = task.to_device(x, y, dev)
        return _Setup(task, model, x, y)
    model = build_model(model_name, num_classes=num_classes, image_size=image_size)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    return _Setup(ClassificationTask(num_classes), model, x, y)


def _make_step(method: Method, model: nn.Module, x: Any, y: Any) -> Callable[[], None]:
    opt = torch.optim.SGD(method.parameter_groups(model), lr=1e-3, momentum=0.9)

    def step() -> None:
        out = method(model, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def _count_flops(step: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def run_bench(
    methods: list[str],
    *,
    model_name: str = "resnet20",
    batch_size: int = 128,
    iters: int = 10,
    warmup: int = 2,
    image_size: int = 32,
    num_classes: int = 10,
    device: str = "cpu",
    seed: int = 0,
    method_options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Benchmark ``methods`` (``standard`` is added first when missing) and return one row each."""
    if iters <= 0 or warmup < 0 or batch_size <= 0:
        raise AdvfeatError(
            f"iters and batch size must be positive, warmup >= 0 (got {iters}, {batch_size}, {warmup})"
        )
    for name in methods:
        METHODS.get(name)
    names = ["standard", *[m for m in methods if m != "standard"]]
    torch.manual_seed(seed)
    dev = torch.device(device)
    setup = _setup(model_name, batch_size, image_size, num_classes, seed, dev)
    base, x, y = setup.model, setup.x, setup.y
    steps: dict[str, Callable[[], None]] = {}
    flops: dict[str, float] = {}
    used: dict[str, dict[str, Any]] = {}
    # a method that fine-tunes a trained model (AdvBN) starts from the benchmark's base model
    # unless its options name a checkpoint
    base_weights = InitialWeights(base.state_dict(), source="the benchmark's base model")
    for name in names:
        method = build_task_method(name, setup.task, **(method_options or {}).get(name, {}))
        initial = None if method.initial_checkpoint() else base_weights
        context = PrepareContext(input_shape=tuple(x.shape[1:]), initial=initial)
        model = method.prepare_with(copy.deepcopy(base), context).to(dev).train()
        method.to(dev)
        steps[name] = _make_step(method, model, x, y)
        used[name] = {k: v for k, v in asdict(method.opts).items() if k != "init_checkpoint"}
        flops[name] = _count_flops(steps[name])
        for _ in range(warmup):
            steps[name]()
        if progress:
            progress(f"prepared {name}")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        for name in names:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            steps[name]()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - start)
        if progress:
            progress(f"round {r + 1}/{iters}")
    ref_ms = statistics.median(times["standard"]) * 1e3
    results = []
    for name in names:
        ms = statistics.median(times[name]) * 1e3
        flops_ratio = flops[name] / flops["standard"]
        ratio = ms / ref_ms
        results.append(
            BenchResult(
                method=name,
                step_ms=round(ms, 2),
                step_ms_min=round(min(times[name]) * 1e3, 2),
                step_ms_max=round(max(times[name]) * 1e3, 2),
                ratio_vs_standard=round(ratio, 3),
                flops_per_step=flops[name],
                flops_ratio_vs_standard=round(flops_ratio, 3),
                ratio_over_flops_ratio=round(ratio / flops_ratio, 3),
                options=used[name],
            )
        )
    return results


def bench_table(results: list[BenchResult]) -> str:
    """Markdown table of a benchmark."""
    lines = [
        "| method | step ms (median) | × standard | × predicted by FLOPs | measured / predicted |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.step_ms:.1f} | {r.ratio_vs_standard:.2f} | {r.flops_ratio_vs_standard:.2f} | "
            f"{r.ratio_over_flops_ratio:.2f} |"
        )
    return "\n".join(lines)
