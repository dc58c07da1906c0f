"""Run configuration: defaults, YAML files, ``--set key=value`` overrides and validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from advfeat.errors import AdvfeatError, unknown_name

__all__ = ["SCHEDULES", "TrainConfig", "apply_overrides", "load_yaml", "parse_override"]

SCHEDULES = ("cosine", "multistep", "constant", "poly")

FLOAT32_MAX = 3.4028234663852886e38
"""Learning rates and weights are float32 tensors: larger values overflow to ``inf``."""


def _check_number(
    key: str, value: float, *, low: float, high: float, low_open: bool = False
) -> None:
    """Refuse a value that is not a finite number in ``[low, high]`` (``(low, high]``)."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        left = "(" if low_open else "["
        raise AdvfeatError(
            f"{key} must be a finite number in {left}{low:g}, {high:g}], got {value}"
        )


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.yaml`` in the run folder).

    The optimiser and schedule defaults follow the CIFAR recipe shared by the papers
    (SGD, momentum 0.9, weight decay 5e-4, lr 0.1); ``schedule="multistep"`` with
    ``milestones=[0.5, 0.75]`` gives their step schedule, ``"cosine"`` a cosine decay, ``"poly"``
    DeepLab's ``(1 - t)^poly_power`` decay (the segmentation recipes); all accept a linear warm-up
    over ``warmup_epochs`` or ``warmup_steps`` optimiser steps (the longer of the two; ALFA and
    A-FAN warm up over the first 200 iterations).

    A method may declare the recipe its paper trains with (:attr:`advfeat.methods.Method.training_recipe`);
    ``advfeat train`` applies it to the keys that no preset, config file, flag or ``--set`` gave.
    """

    method: str = "standard"
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = "resnet20"
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "shapes"
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 256
    eval_every: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    val_fraction: float = 0.0
    select_best: bool = False
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    """``bfloat16``, or ``float16`` with a GradScaler (CUDA only) for GPUs without bf16."""
    optimizer: str = "sgd"
    """``sgd`` (momentum, nesterov) or ``adamw`` (adam_betas; weight decay decoupled)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights (e.g. 0.999); it is evaluated and saved."""
    deterministic: bool = False
    """Deterministic kernels only (an op without one raises), cuDNN autotuning off."""
    loggers: list[str] = field(default_factory=list)
    """Besides history.csv: ``tensorboard`` and / or ``wandb`` (optional extras)."""
    sync_bn: bool = False
    """Under DDP: batch statistics over all processes (every BN branch a SyncBatchNorm)."""
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    eval_shifted: bool = True
    max_steps_per_epoch: int | None = None
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`AdvfeatError` on values no run could use."""
        if self.epochs <= 0:
            raise AdvfeatError(f"epochs must be a positive integer, got {self.epochs}")
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) <= 0:
                raise AdvfeatError(
                    f"batch sizes must be positive integers, got {key}={getattr(self, key)}"
                )
        _check_number("lr", self.lr, low=0.0, low_open=True, high=FLOAT32_MAX)
        _check_number("momentum", self.momentum, low=0.0, high=1.0)
        _check_number("weight_decay", self.weight_decay, low=0.0, high=FLOAT32_MAX)
        _check_number("gamma", self.gamma, low=0.0, low_open=True, high=FLOAT32_MAX)
        if not 0 <= self.seed < 2**32:
            raise AdvfeatError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        if self.max_steps_per_epoch is not None and (
            isinstance(self.max_steps_per_epoch, bool)
            or not isinstance(self.max_steps_per_epoch, int)
            or self.max_steps_per_epoch <= 0
        ):
            raise AdvfeatError(
                "max_steps_per_epoch must be a positive integer (or null for whole epochs), "
                f"got {self.max_steps_per_epoch!r}"
            )
        if self.schedule not in SCHEDULES:
            raise unknown_name("schedule", self.schedule, SCHEDULES)
        if not self.poly_power > 0 or not math.isfinite(self.poly_power):
            raise AdvfeatError(f"poly_power must be a number > 0, got {self.poly_power}")
        if not 0 <= self.val_fraction < 1:
            raise AdvfeatError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.select_best and self.val_fraction == 0:
            raise AdvfeatError("select_best needs a validation split: set val_fraction (e.g. 0.1)")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise AdvfeatError(
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}"
            )
        if isinstance(self.eval_every, bool) or self.eval_every < 1:
            raise AdvfeatError(
                f"eval_every (test evaluation every N epochs, and after the last) must be an "
                f"integer >= 1, got {self.eval_every}"
            )
        if self.warmup_steps < 0:
            raise AdvfeatError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise AdvfeatError(
                f"milestones are fractions of the run in (0, 1], got {self.milestones}"
            )
        if self.workers < 0:
            raise AdvfeatError(f"workers must be >= 0, got {self.workers}")
        self._validate_options()

    def _validate_options(self) -> None:
        from advfeat.train.optim import OPTIMIZERS
        from advfeat.train.precision import AMP_DTYPES

        if self.optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", self.optimizer, OPTIMIZERS)
        if self.amp_dtype not in AMP_DTYPES:
            raise unknown_name("amp_dtype", self.amp_dtype, list(AMP_DTYPES))
        betas = list(self.adam_betas) if isinstance(self.adam_betas, list | tuple) else []
        if len(betas) != 2 or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):
            raise AdvfeatError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        from advfeat.train.loggers import check_loggers

        check_loggers(self.loggers)
        if self.ema_decay is not None and (
            isinstance(self.ema_decay, bool)
            or not isinstance(self.ema_decay, int | float)
            or not 0 < self.ema_decay < 1
        ):
            raise AdvfeatError(
                f"ema_decay must be a number in (0, 1) such as 0.999 (or null), got {self.ema_decay!r}"
            )

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
