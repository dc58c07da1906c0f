"""What the ``clean``, ``attacks`` and ``shift`` suites share for detection and segmentation.

A dense model is evaluated by its task (:meth:`advfeat.tasks.DenseTask.evaluate`): COCO AP /
AP50 / AP75 for Faster R-CNN, mIoU / pixel accuracy for DeepLab — the numbers of A-FAN Tables 5
and 6. Every unit runs under its own seeded RNG (forked, so the caller's global RNG is left as
it was): Faster R-CNN samples proposals and DeepLab's ASPP drops out while PGD runs the model in
training mode, so a unit's result depends on ``(config.seed, unit key)`` alone. The headline
metric of a task is its ``primary_metric`` (VOC mAP@0.5, A-FAN Table 5; mIoU, Table 6).

The suites that measure class accuracy (corruptions, bn, divergence, hessian, features) declare
``tasks=("classification",)`` when they register: ``chosen_suites`` rejects them for dense data
before any work, and :meth:`~advfeat.eval.suites.Suite.run` refuses it too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from advfeat.eval.context import EvalContext
from advfeat.tasks import DenseTask

__all__ = ["task_metrics"]


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # e.g. mIoU of a set without a single labelled pixel
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


class _Progress:
    """Iterates ``batches``, advancing a progress bar after each one."""

    def __init__(self, batches: Iterable[Any], bar: Any) -> None:
        self.batches, self.bar = batches, bar

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield batch
            self.bar.update(1)


def task_metrics(
    ctx: EvalContext, task: DenseTask, dataset: Dataset, key: str, attack: Any = None
) -> dict[str, Any]:
    """``task.evaluate(model, loader(dataset), attack=attack)`` with the RNG seeded for ``key``.

    The loader keeps dataset order (``config.batch_size``, the task's collate); NaN metrics
    become ``None``; ``n`` (images) and ``seed`` (of the unit's RNG) are added.
    """
    seed = ctx.seed_for(key)
    loader = DataLoader(
        dataset, batch_size=ctx.config.batch_size, shuffle=False, collate_fn=task.collate
    )
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    bar = ctx.bar(len(loader), key)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            metrics = task.evaluate(
                ctx.model, _Progress(loader, bar), device=ctx.device, attack=attack
            )
    finally:
        bar.close()
    out = {k: _json_number(v) for k, v in metrics.items()}
    return {**out, "n": len(dataset), "seed": seed}  # type: ignore[arg-type]
