"""From a checkpoint written by ``advfeat train`` to a model and its data, ready to evaluate.

A run's model is rebuilt exactly as the trainer built it (``build_parts(cfg)``: the task, its
model, then ``method.prepare_with``), its weights loaded, and ``method.eval_model`` applied — the
model the trainer itself evaluated. The prepared model (every BN branch kept) is returned too,
for the ``bn`` suite, with the run's task (:class:`~advfeat.tasks.ClassificationTask`,
:class:`~advfeat.tasks.DetectionTask`, :class:`~advfeat.tasks.SegmentationTask`), which the
suites evaluate with. Checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from advfeat.checkpoint import checkpoint_digest, load_checkpoint
from advfeat.data import DatasetBundle, build_dataset
from advfeat.errors import AdvfeatError
from advfeat.eval.context import EvalData
from advfeat.tasks import ClassificationTask, DenseTask, Task, build_task
from advfeat.train.config import TrainConfig

__all__ = [
    "DenseEvalData",
    "LoadedRun",
    "RebuiltModel",
    "eval_data",
    "load_run",
    "load_weights",
    "rebuild_model",
]


@dataclass
class DenseEvalData(EvalData):
    """:class:`EvalData` of a detection or segmentation model: items are ``(image, target)``
    as the task collates them, and ``task`` (required) computes the metrics (AP / mIoU)."""

    def __post_init__(self) -> None:
        if not isinstance(self.task, DenseTask):
            raise AdvfeatError(
                "DenseEvalData needs task=DetectionTask(...) or SegmentationTask(...), got "
                f"{type(self.task).__name__}"
            )


@dataclass
class LoadedRun:
    """A trained run, rebuilt: ``model`` is what to evaluate, ``raw_model`` keeps all branches."""

    path: Path
    config: TrainConfig
    model: nn.Module
    raw_model: nn.Module
    data: DatasetBundle
    epoch: int
    info: dict[str, Any] = field(default_factory=dict)
    task: Task = field(default_factory=ClassificationTask)
    """The run's task (``build_parts``'s)."""

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def load_weights(
    model: nn.Module, state: dict[str, Any] | str | Path, *, source: str = ""
) -> nn.Module:
    """Load a state dict (or the model of an advfeat checkpoint file) into ``model``, strictly.

    A state dict of another architecture raises :class:`AdvfeatError` naming missing, unexpected
    and mis-shaped keys.
    """
    if isinstance(state, (str, Path)):
        source = source or str(state)
        state = load_checkpoint(state)["model"]
    if not isinstance(state, dict):
        raise AdvfeatError(f"expected a state dict of weights, got {type(state).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        where = f" {source!r}" if source else ""
        raise AdvfeatError(
            f"the weights{where} do not fit this architecture ({type(model).__name__}): "
            + ", ".join(parts)
            + "; evaluate the checkpoint with the model it was trained with"
        )
    model.load_state_dict(state)
    return model


def _build_data(
    name: str, root: str | None, seed: int, val_fraction: float, options: dict[str, Any]
) -> DatasetBundle:
    try:
        return build_dataset(
            name, root, seed=seed, val_fraction=val_fraction, augment=False, **options
        )
    except AdvfeatError as err:
        if root is not None and not Path(root).expanduser().exists():
            raise AdvfeatError(
                f"{err} (no {str(root)!r} on this machine: pass --data-dir with where the "
                f"{name!r} data lies now)"
            ) from None
        raise
    except (FileNotFoundError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdvfeatError(
            f"dataset {name!r} could not be loaded from {root!r} ({first[:200]}); check --data-dir"
        ) from None


def _described_data(state: dict[str, Any]) -> DatasetBundle | None:
    """A stand-in for the training data from what the checkpoint records of it (classes, image
    size, normalisation), so that evaluating on another dataset does not rebuild the training one;
    ``None`` for checkpoints that do not record it."""
    info = state.get("data")
    names = state.get("class_names")
    if not isinstance(info, dict) or "num_classes" not in state or not isinstance(names, list):
        return None
    empty = TensorDataset(torch.empty(0))
    return DatasetBundle(
        train=empty,
        val=None,
        test=empty,
        num_classes=int(state["num_classes"]),
        image_size=int(info["image_size"]),
        mean=tuple(float(v) for v in info["mean"]),
        std=tuple(float(v) for v in info["std"]),
        task=info["task"],
        class_names=[str(n) for n in names],
    )


def _options_for(name: str, cfg: TrainConfig, given: dict[str, Any] | None) -> dict[str, Any]:
    """Options of the evaluation dataset: the given ones, else the run's own when it is the
    run's dataset (another dataset does not inherit options meant for the training one)."""
    if given is not None:
        return dict(given)
    return dict(cfg.dataset_options) if name == cfg.dataset else {}


@dataclass
class RebuiltModel:
    """A run's model rebuilt from its checkpoint alone (no dataset read when the checkpoint
    records its classes, image size and normalisation, as every current one does)."""

    path: Path
    config: TrainConfig
    state: dict[str, Any]
    model: nn.Module
    """What to evaluate or deploy: ``method.eval_model`` of the trained model."""
    raw_model: nn.Module
    """The trained model with every BN branch."""
    data: DatasetBundle
    """What the model was built from: the checkpoint's description of its data (empty splits),
    or, for checkpoints that do not record it, the training data itself (``data_read``)."""
    data_read: bool = False
    task: Task = field(default_factory=ClassificationTask)
    """The run's task (``build_parts``'s)."""


def rebuild_model(
    checkpoint: str | Path,
    *,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
) -> RebuiltModel:
    """Rebuild the model saved in ``checkpoint`` (``build_parts`` → weights → ``eval_model``).

    The training data is not read when the checkpoint describes it, so a checkpoint moved to
    another machine loads without its dataset; older checkpoints rebuild the training data from
    ``data_dir`` when ``dataset`` is ``None`` or the run's own (default: the path saved at
    training time).
    """
    from advfeat.train.build import build_parts

    path = Path(checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    if "config" not in state or "model" not in state:
        raise AdvfeatError(f"{str(path)!r} holds no run configuration and model weights")
    cfg = TrainConfig.from_dict(state["config"])
    if model_name is not None:
        cfg.model = model_name
    if data_dir is not None and dataset in (None, cfg.dataset):
        cfg.data_dir = data_dir  # the data moved since training: read it where it is now
    described = _described_data(state)
    train_data = described or _build_data(
        cfg.dataset, cfg.data_dir, cfg.seed, cfg.val_fraction, cfg.dataset_options
    )
    saved_classes = state.get("num_classes")
    if saved_classes is not None and int(saved_classes) != train_data.num_classes:
        raise AdvfeatError(
            f"the checkpoint's model has {saved_classes} classes, its dataset now has "
            f"{train_data.num_classes}: the dataset options changed since training"
        )
    parts = build_parts(cfg, data=train_data)
    # a run with ema_decay evaluates (and is evaluated with) its weights' moving average
    load_weights(parts.model, state.get("ema", state["model"]), source=str(path))
    if "method" in state:
        parts.method.load_state_dict(state["method"])
    raw = parts.model.to(device)
    parts.method.to(device)
    model = parts.method.eval_model(raw).to(device)
    read = described is None
    return RebuiltModel(path, cfg, state, model, raw, train_data, data_read=read, task=parts.task)


def load_run(
    checkpoint: str | Path,
    *,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    dataset_options: dict[str, Any] | None = None,
) -> LoadedRun:
    """Rebuild the run saved in ``checkpoint`` (:func:`rebuild_model`) and load the data to
    evaluate it on.

    ``dataset``/``data_dir``/``dataset_options`` evaluate on other data with the same classes
    (the model keeps the input normalisation of its training data); ``data_dir`` alone reads the
    run's own dataset where it lies now (a run folder moved to another machine). ``model_name``
    overrides the architecture (weights that do not fit raise :class:`AdvfeatError`).
    """
    rebuilt = rebuild_model(
        checkpoint, device=device, model_name=model_name, dataset=dataset, data_dir=data_dir
    )
    cfg, state, path = rebuilt.config, rebuilt.state, rebuilt.path
    train_data = rebuilt.data
    name = dataset or cfg.dataset
    same_dataset = name == cfg.dataset
    if rebuilt.data_read and same_dataset and not dataset_options:
        data = train_data  # an old checkpoint: the training data was read to build the model
    else:
        data = _build_data(
            name,
            data_dir if data_dir is not None else cfg.data_dir,
            cfg.seed,
            cfg.val_fraction,
            _options_for(name, cfg, dataset_options),
        )
    if data.num_classes != train_data.num_classes:
        raise AdvfeatError(
            f"dataset {name!r} has {data.num_classes} classes but the model was trained on "
            f"{train_data.num_classes} ({cfg.dataset!r})"
            + ("" if not same_dataset else ": the dataset options changed since training")
        )
    info = {
        "checkpoint": str(path),
        "method": cfg.method,
        "model": cfg.model,
        "dataset": name,
        "trained_on": cfg.dataset,
        "seed": cfg.seed,
        "epochs_trained": int(state.get("epoch", -1)) + 1,
        "checkpoint_digest": checkpoint_digest(state),
    }
    if "ema" in state:
        info["weights"] = f"exponential moving average (ema_decay={cfg.ema_decay})"
    if dataset_options:
        info["dataset_options"] = dict(dataset_options)
    partial = state.get("partial")
    if isinstance(partial, dict):  # a preempted run: weights from the middle of an epoch
        info["stopped_mid_epoch"] = {"epoch": int(partial["epoch"]) + 1, "step": partial["step"]}
    if isinstance(rebuilt.task, DenseTask):  # a classification run's record stays as it was
        info["task"] = rebuilt.task.name
    epoch = int(state.get("epoch", -1))
    return LoadedRun(
        path, cfg, rebuilt.model, rebuilt.raw_model, data, epoch, info, task=rebuilt.task
    )


def eval_data(bundle: DatasetBundle, task: Task | None = None) -> EvalData:
    """The evaluation view of a dataset bundle (test, un-augmented train, shifted domains) with
    the task that evaluates it (default: the one ``advfeat train`` builds for the bundle,
    :func:`~advfeat.tasks.build_task`)."""
    task = task if task is not None else build_task(bundle.task, bundle.num_classes)
    if task.name != bundle.task:
        raise AdvfeatError(f"a {task.name} task cannot evaluate {bundle.task} data")
    return EvalData(
        test=bundle.test,
        num_classes=bundle.num_classes,
        class_names=list(bundle.class_names),
        image_size=bundle.image_size,
        train=bundle.train,
        shifted=dict(bundle.shifted),
        task=task,
    )
