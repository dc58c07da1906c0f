"""Run configuration: defaults, YAML files, ``--set key=value`` overrides and validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.options import Choice, Each, Flag, Integer, Number, check_options, option
from advfeat.train.loggers import InstalledLoggers

__all__ = ["SCHEDULES", "TrainConfig", "apply_overrides", "load_yaml", "parse_override"]

SCHEDULES = ("cosine", "multistep", "constant", "poly")

FLOAT32_MAX = 3.4028234663852886e38
"""Learning rates and weights are float32 tensors: larger values overflow to ``inf``."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.yaml`` in the run folder).

    The optimiser and schedule defaults follow the CIFAR recipe shared by the papers
    (SGD, momentum 0.9, weight decay 5e-4, lr 0.1); ``schedule="multistep"`` with
    ``milestones=[0.5, 0.75]`` gives their step schedule, ``"cosine"`` a cosine decay, ``"poly"``
    DeepLab's ``(1 - t)^poly_power`` decay (the segmentation recipes); all accept a linear warm-up
    over ``warmup_epochs`` or ``warmup_steps`` optimiser steps (the longer of the two; ALFA and
    A-FAN warm up over the first 200 iterations).

    A method may declare the schedule its paper trains with
    (:attr:`advfeat.methods.Method.training_recipe`); ``--recipe METHOD`` applies it whole, to
    any method, so that every method otherwise trains under the same schedule.
    """

    method: str = "standard"
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = "resnet20"
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "shapes"
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = option(10, Integer(low=1))
    batch_size: int = option(128, Integer(low=1))
    eval_batch_size: int = option(256, Integer(low=1))
    eval_every: int = option(
        1, Integer(low=1, hint="test evaluation every N epochs, and after the last")
    )
    lr: float = option(0.1, Number(low=0, high=FLOAT32_MAX, low_open=True))
    momentum: float = option(0.9, Number(low=0, high=1))
    nesterov: bool = option(False, Flag())
    weight_decay: float = option(5e-4, Number(low=0, high=FLOAT32_MAX))
    schedule: str = option("cosine", Choice(*SCHEDULES))
    milestones: list[float] = field(
        default_factory=lambda: [0.5, 0.75],
        metadata={"check": Each(Number(low=0, high=1, low_open=True, hint="fractions of the run"))},
    )
    gamma: float = option(0.1, Number(low=0, high=FLOAT32_MAX, low_open=True))
    poly_power: float = option(0.9, Number(low=0, low_open=True))
    warmup_epochs: float = 0.0
    warmup_steps: int = option(0, Integer(low=0))
    val_fraction: float = option(0.0, Number(low=0, high=1, high_open=True))
    select_best: bool = option(False, Flag())
    augment: bool = option(True, Flag())
    seed: int = option(0, Integer(low=0, high=2**32 - 1))
    device: str = "auto"
    amp: bool = option(True, Flag())
    amp_dtype: str = option("bfloat16", Choice("bfloat16", "float16"))
    """``bfloat16``, or ``float16`` with a GradScaler (CUDA only) for GPUs without bf16."""
    optimizer: str = option("sgd", Choice("sgd", "adamw"))
    """``sgd`` (momentum, nesterov) or ``adamw`` (adam_betas; weight decay decoupled)."""
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999],
        metadata={"check": Each(Number(low=0, high=1, high_open=True), min_len=2)},
    )
    ema_decay: float | None = option(
        None, Number(low=0, high=1, low_open=True, high_open=True, optional=True, hint="e.g. 0.999")
    )
    """Keep an exponential moving average of the weights (e.g. 0.999); it is evaluated and saved."""
    deterministic: bool = option(False, Flag())
    """Deterministic kernels only (an op without one raises), cuDNN autotuning off."""
    loggers: list[str] = field(default_factory=list, metadata={"check": InstalledLoggers()})
    """Besides history.csv: ``tensorboard`` and / or ``wandb`` (optional extras)."""
    sync_bn: bool = option(False, Flag())
    """Under DDP: batch statistics over all processes (every BN branch a SyncBatchNorm)."""
    channels_last: bool = option(False, Flag())
    compile: bool = option(False, Flag())
    workers: int = option(0, Integer(low=0))
    device_data: str = option("auto", Choice("auto", "true", "false"))
    """Hold the training images on the device and crop / flip them there in batches (the
    in-memory datasets: CIFAR-10/100, SVHN, cifar10-jpeg, shapes); ``auto``: on CUDA when the
    dataset allows it, ``true``: on any device, ``false``: a DataLoader."""
    cuda_graph: str = option("auto", Choice("auto", "true", "false"))
    """Capture the whole training step as one CUDA graph and replay it per batch
    (:mod:`advfeat.train.graphs`); ``auto``: on CUDA when the method's step can be captured
    (``standard``, ``alfa``, ``afan`` with one rescaled attack), ``true``: required (an error
    says why not), ``false``: eager steps."""
    eval_shifted: bool = option(True, Flag())
    max_steps_per_epoch: int | None = option(None, Integer(low=1, optional=True))
    progress: bool = option(True, Flag())

    def validate(self) -> None:
        """Raise :class:`AdvfeatError` on values no run could use."""
        check_options("", self)  # every field declared with its constraint (loggers: installed)
        if self.select_best and self.val_fraction == 0:
            raise AdvfeatError("select_best needs a validation split: set val_fraction (e.g. 0.1)")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise AdvfeatError(
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}"
            )
        if len(self.adam_betas) != 2:
            raise AdvfeatError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        apply_overrides(cfg, values)
        return cfg


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)`` with the value parsed as YAML (``0.1``, ``[1, 2]``)."""
    if "=" not in text:
        raise AdvfeatError(f"--set expects key=value, got {text!r} (e.g. --set lr=0.05)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


_DICT_FIELDS = ("method_options", "model_options", "dataset_options")


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Set ``values`` (flat keys, or ``method_options.alpha`` style dotted keys) on ``cfg``."""
    fields = _field_types()
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            raise unknown_name("config key", head, fields)
        if rest:
            if head not in _DICT_FIELDS:
                raise AdvfeatError(f"config key {head!r} has no sub-keys (got {key!r})")
            getattr(cfg, head)[rest] = value
            continue
        if head in _DICT_FIELDS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise AdvfeatError(f"{head} must be a mapping, got {value!r}")
            getattr(cfg, head).update(value)
            continue
        setattr(cfg, head, _coerce(head, value, getattr(cfg, head)))
    return cfg


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Convert YAML scalars to the field's type, with a clear error when impossible."""
    if value is None or current is None:
        return value
    kind = type(current)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise AdvfeatError(f"{key} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdvfeatError(f"{key} must be a number, got {value!r}")
        if kind is int and not (math.isfinite(value) and float(value) == int(value)):
            raise AdvfeatError(f"{key} must be an integer, got {value!r}")
        return kind(value)
    if kind is list and not isinstance(value, list):
        raise AdvfeatError(f"{key} must be a list, got {value!r}")
    if kind is str and isinstance(value, bool):
        return "true" if value else "false"  # YAML reads `true` as a bool (device_data=true)
    if kind is str and not isinstance(value, str):
        return str(value)
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (``safe_load``) into a flat mapping of config keys."""
    p = Path(path)
    if not p.is_file():
        raise AdvfeatError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise AdvfeatError(f"config file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise AdvfeatError(
            f"config file {str(p)!r} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data
