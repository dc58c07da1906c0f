"""What the ``clean``, ``attacks`` and ``shift`` suites share: a task's metrics on a dataset.

Every task is evaluated by itself (:meth:`advfeat.tasks.Task.evaluate`): top-1 / top-5 accuracy
for a classifier, COCO AP / AP50 / AP75 for Faster R-CNN, mIoU / pixel accuracy for DeepLab — the
numbers of A-FAN Tables 5 and 6. The metrics take their evaluation names
(:attr:`~advfeat.tasks.Task.eval_names`: classification's ``acc`` is ``top1``), so a new task
needs no edit here or in the suites.

A task whose evaluation draws random numbers (:attr:`~advfeat.tasks.Task.seeded_evaluation`:
Faster R-CNN samples proposals and DeepLab's ASPP drops out while PGD runs the model in training
mode) runs every unit under its own seeded RNG (forked, so the caller's global RNG is left as it
was): a unit's result depends on ``(config.seed, unit key)`` alone, and the seed is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from advfeat.eval.context import EvalContext

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


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside, as it was afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def task_metrics(
    ctx: EvalContext, dataset: Dataset, key: str, attack: Any = None, *, detailed: bool = False
) -> dict[str, Any]:
    """The metrics of ``ctx.data.task`` for ``ctx.model`` on ``dataset``, under their evaluation
    names: ``task.evaluate(model, loader, attack=attack, detailed=detailed)``.

    The loader keeps dataset order (``config.batch_size``, the task's collate); ``attack(model,
    images, targets)`` perturbs each batch first; NaN metrics become ``None``; ``n`` (images) is
    added, and ``seed`` (of the unit's RNG, from ``key``) for a task with
    :attr:`~advfeat.tasks.Task.seeded_evaluation`.
    """
    task = ctx.data.task
    loader = DataLoader(
        dataset,
        batch_size=ctx.config.batch_size,
        shuffle=False,
        collate_fn=task.collate,
        pin_memory=ctx.device.type == "cuda",  # batches copied to the GPU without waiting
    )
    seed = ctx.seed_for(key) if task.seeded_evaluation else None
    rng: AbstractContextManager[Any] = (
        _seeded(seed, ctx.device) if seed is not None else nullcontext()
    )
    bar = ctx.bar(len(loader), key)
    try:
        with rng:
            metrics = task.evaluate(
                ctx.model,
                _Progress(loader, bar),
                device=ctx.device,
                attack=attack,
                detailed=detailed,
            )
    finally:
        bar.close()
    out = {task.eval_names.get(k, k): _json_number(v) for k, v in metrics.items()}
    out["n"] = len(dataset)  # type: ignore[arg-type]
    return out if seed is None else {**out, "seed": seed}
