"""Build the dataset, model and method of a run from its configuration (train and eval share it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from advfeat.data import DatasetBundle, build_dataset
from advfeat.methods import Method, build_method
from advfeat.models import build_model
from advfeat.train.config import TrainConfig

__all__ = ["RunParts", "build_data", "build_parts"]


@dataclass
class RunParts:
    data: DatasetBundle
    model: nn.Module
    method: Method


def build_data(cfg: TrainConfig, **extra: Any) -> DatasetBundle:
    return build_dataset(
        cfg.dataset,
        cfg.data_dir,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        augment=cfg.augment,
        **{**cfg.dataset_options, **extra},
    )


def build_parts(cfg: TrainConfig, data: DatasetBundle | None = None) -> RunParts:
    """Dataset, model (already prepared by the method) and method for ``cfg``."""
    cfg.validate()
    data = data if data is not None else build_data(cfg)
    method = build_method(cfg.method, **cfg.method_options)
    model = build_model(
        cfg.model,
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        image_size=data.image_size,
        **cfg.model_options,
    )
    model = method.prepare(model)
    return RunParts(data=data, model=model, method=method)
