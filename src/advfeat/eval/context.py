"""What every suite receives: the model, the data, the settings, resumable units and progress.

A suite splits its work into *units* (one attack, one corruption at one severity, ...) and runs
each through :meth:`EvalContext.unit`. A finished unit's result is written atomically to the
partial-results file next to the output, so an interrupted evaluation resumed with the same
settings redoes only what had not finished. Every unit draws its randomness from a seed derived
from ``(config.seed, unit key)``, so results do not depend on which units ran before.
"""

from __future__ import annotations

import copy
import json
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advfeat.checkpoint import atomic_write_json
from advfeat.errors import AdvfeatError
from advfeat.eval.config import EvalConfig
from advfeat.tasks import ClassificationTask, DenseTask, Task

__all__ = ["EvalContext", "EvalData", "PartialStore", "seeded_subset"]

T = TypeVar("T")
PARTIAL_FORMAT = "advfeat-eval-partial/2"
"""The partial-results format; 2: a ``shift`` unit of a classifier holds ``top1``, not
``accuracy`` (the units of an earlier format are not mixed with new ones)."""


@dataclass
class EvalData:
    """The datasets an evaluation may use, and the task that evaluates them.

    Items are ``(image in [0, 1] CHW, target)`` as ``task`` collates them: a class index for
    the default :class:`~advfeat.tasks.ClassificationTask` (of ``num_classes`` classes), boxes
    or masks for a detection / segmentation task.
    """

    test: Dataset
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    image_size: int | None = None
    train: Dataset | None = None
    """Un-augmented training images (the Hessian suite's loss is the training loss)."""
    shifted: dict[str, Dataset] = field(default_factory=dict)
    """Shifted test domains by name (same classes as ``test``)."""
    task: Task = field(default_factory=ClassificationTask)
    """What evaluates the data (its metrics, :meth:`Task.evaluate`)."""

    def __post_init__(self) -> None:
        if isinstance(self.task, ClassificationTask) and self.task.num_classes is None:
            self.task = copy.copy(self.task)  # a subclass of one's own stays itself
            self.task.num_classes = self.num_classes

    @property
    def dense_task(self) -> DenseTask | None:
        """The detection / segmentation task that evaluates this data (``None``: class labels)."""
        return self.task if isinstance(self.task, DenseTask) else None

    @property
    def task_name(self) -> str:
        """The registered name of the task this data is for (``classification``, ``detection``,
        ``segmentation``, or one's own)."""
        return self.task.name


def seeded_subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """``n`` items of ``dataset`` drawn without replacement by a generator seeded with ``seed``
    (in increasing index order); all of it when ``n`` is None or not smaller than its size."""
    size = len(dataset)  # type: ignore[arg-type]
    if n is None or n >= size:
        return dataset
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:n].sort().values.tolist())


class PartialStore:
    """Finished units of one evaluation, saved atomically after each unit (``--resume``)."""

    def __init__(self, path: Path | None, fingerprint: str, *, resume: bool = False) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.units: dict[str, Any] = {}
        self.reused = 0
        if path is not None and resume and path.is_file():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AdvfeatError(f"cannot read partial results {str(path)!r} ({err})") from None
        found = saved.get("format") if isinstance(saved, dict) else None
        if isinstance(found, str) and found.startswith("advfeat-eval-partial/"):
            if found != PARTIAL_FORMAT:
                raise AdvfeatError(
                    f"the partial results in {str(path)!r} were written by another version of "
                    f"advfeat ({found}, this one writes {PARTIAL_FORMAT}); pass --force (instead "
                    "of --resume) to start again"
                )
        else:
            raise AdvfeatError(f"{str(path)!r} is not an advfeat partial-results file")
        if saved.get("fingerprint") != self.fingerprint:
            raise AdvfeatError(
                f"the partial results in {str(path)!r} were made for another checkpoint, other data "
                "or other settings; resume with the same ones, or pass --force (instead of "
                "--resume) to start again"
            )
        self.units = dict(saved.get("units", {}))

    def get(self, key: str) -> tuple[bool, Any]:
        if key in self.units:
            self.reused += 1
            return True, self.units[key]
        return False, None

    def put(self, key: str, value: Any) -> None:
        self.units[key] = value
        if self.path is not None:
            atomic_write_json(
                self.path,
                {"format": PARTIAL_FORMAT, "fingerprint": self.fingerprint, "units": self.units},
            )

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class EvalContext:
    """Model, data, settings, device, resumable units and progress bars, for one suite run.

    ``model`` is what is evaluated (eval mode is set by the caller); ``raw_model`` is the model
    before the training method's ``eval_model`` (it keeps every BN branch, for the ``bn`` suite).
    """

    def __init__(
        self,
        model: nn.Module,
        data: EvalData,
        config: EvalConfig,
        *,
        device: torch.device,
        store: PartialStore,
        progress: bool = False,
        raw_model: nn.Module | None = None,
        surrogate: nn.Module | None = None,
        baseline: Any = None,
        prefix: str = "",
    ) -> None:
        self.model = model
        self.data = data
        self.config = config
        self.device = device
        self.store = store
        self.progress = progress
        self.raw_model = raw_model if raw_model is not None else model
        self.surrogate = surrogate
        self.baseline = baseline
        self.prefix = prefix

    def child(self, model: nn.Module, prefix: str) -> EvalContext:
        """The same evaluation of another model (e.g. one BN branch), with its own unit keys."""
        return EvalContext(
            model,
            self.data,
            self.config,
            device=self.device,
            store=self.store,
            progress=self.progress,
            raw_model=model,
            surrogate=self.surrogate,
            baseline=self.baseline,
            prefix=f"{self.prefix}{prefix}/",
        )

    # ------------------------------------------------------------------------------ data
    def test_set(self, max_images: int | None = None) -> Dataset:
        """The test set, or its seeded subset of ``max_images`` (default ``config.max_images``)."""
        n = self.config.max_images if max_images is None else max_images
        return seeded_subset(self.data.test, n, self.config.seed)

    def batches(
        self, dataset: Dataset, batch_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images, labels)`` on the device, in dataset order."""
        loader = DataLoader(dataset, batch_size=batch_size or self.config.batch_size, shuffle=False)
        for x, y in loader:
            if not isinstance(y, Tensor):
                raise AdvfeatError("this evaluation needs class labels (a classification dataset)")
            yield x.to(self.device), y.to(self.device)

    def num_batches(self, dataset: Dataset, batch_size: int | None = None) -> int:
        size = len(dataset)  # type: ignore[arg-type]
        bs = batch_size or self.config.batch_size
        return (size + bs - 1) // bs

    # ------------------------------------------------------------------------------ units
    def seed_for(self, key: str) -> int:
        """A seed for unit ``key``, fixed by ``config.seed`` and the key alone."""
        return (self.config.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 1)

    def unit(self, key: str, compute: Callable[[], T]) -> T:
        """The result of ``compute()``, or the saved one when resuming (saved when computed)."""
        full = self.prefix + key
        found, value = self.store.get(full)
        if found:
            return value  # type: ignore[no-any-return]
        value = compute()
        self.store.put(full, value)
        return value

    def bar(self, total: int, desc: str) -> Any:
        """A progress bar on stderr (a no-op one when progress is off)."""
        if not self.progress:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=f"{self.prefix}{desc}",
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
