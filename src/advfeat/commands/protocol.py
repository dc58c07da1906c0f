"""The flags and the layering that describe a run's protocol, shared by ``advfeat train`` and
``advfeat compare``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from advfeat.errors import AdvfeatError
from advfeat.presets import load_preset
from advfeat.train.config import TrainConfig, apply_overrides, load_yaml, parse_override

__all__ = [
    "DEFAULT_PRESET",
    "FLAG_KEYS",
    "add_protocol_arguments",
    "config_from_args",
    "method_recipe",
    "protocol_keys",
]

DEFAULT_PRESET = "default"
"""The preset under ``advfeat train`` when no method, preset or config file is given."""

FLAG_KEYS: dict[str, str] = {
    "method": "method",
    "model": "model",
    "dataset": "dataset",
    "data_dir": "data_dir",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "seed": "seed",
    "device": "device",
}
"""Command-line flag (argument name) → the config key it sets."""


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that describe a run's protocol (shared by ``train`` and ``compare``)."""
    p.add_argument(
        "--model",
        help="architecture: resnet20, preact_resnet18, wrn28_10, torchvision:NAME, timm:NAME",
    )
    p.add_argument(
        "--dataset", help="shapes, cifar10, cifar100, svhn, imagefolder, cifar10-jpeg, ..."
    )
    p.add_argument("--data-dir", help="where the dataset lives (or is downloaded to)")
    p.add_argument("--epochs", type=int, help="number of epochs (> 0)")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--preset", help="start from a packaged preset of a paper's setting (see `advfeat methods`)"
    )
    p.add_argument("--config", help="YAML file of config keys (print them with --show-config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set lr=0.05 --set method_options.alpha=0.01",
    )


def protocol_keys() -> list[str]:
    """The argument names that :func:`add_protocol_arguments` adds."""
    parser = argparse.ArgumentParser(add_help=False)
    add_protocol_arguments(parser)
    return list(vars(parser.parse_args([])))


def config_from_args(
    args: argparse.Namespace,
    method: str | None = None,
    *,
    recipe: bool = True,
    extra: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults ← method recipe ← ``--preset`` ← ``--config`` file ← explicit flags ← ``--set``
    ← ``extra`` (an ``advfeat compare`` arm).

    The method's paper recipe (:attr:`advfeat.methods.Method.training_recipe`) fills only the
    keys that none of the other sources sets; ``recipe=False`` leaves it out (``advfeat compare``
    trains every arm under one protocol).
    """
    layers: list[dict[str, Any]] = []
    if args.preset:
        layers.append(load_preset(args.preset))
    elif not (getattr(args, "method", None) or args.config or args.dataset):
        layers.append(load_preset(DEFAULT_PRESET))
    if args.config:
        layers.append(load_yaml(args.config))
    layers.append(
        {
            key: getattr(args, attr, None)
            for attr, key in FLAG_KEYS.items()
            if getattr(args, attr, None) is not None
        }
    )
    layers.append(dict(parse_override(o) for o in args.overrides))
    if extra:
        layers.append(dict(extra))
    if method is not None:
        layers.append({"method": method})
    cfg = TrainConfig()
    for layer in layers:
        apply_overrides(cfg, layer)
    if recipe:
        given = {key.partition(".")[0] for layer in layers for key in layer}
        paper = {k: v for k, v in method_recipe(cfg.method, cfg.model).items() if k not in given}
        apply_overrides(cfg, paper)
    if getattr(args, "quiet", False):
        cfg.progress = False
    _absolute_paths(cfg)
    if (
        cfg.data_dir is not None
        and not Path(cfg.data_dir).exists()
        and cfg.dataset not in ("cifar10", "cifar100", "svhn", "voc-det", "voc-seg")
    ):
        raise AdvfeatError(f"--data-dir {cfg.data_dir!r} does not exist")
    cfg.validate()
    return cfg


def method_recipe(name: str, model: str = "") -> dict[str, Any]:
    """The classification training recipe declared by method ``name`` (empty for unknown names,
    which the trainer reports, and for detection / segmentation models, whose papers' recipes
    are the presets)."""
    from advfeat.methods import METHODS
    from advfeat.tasks import DETECTORS, SEGMENTERS

    if name not in METHODS or model in DETECTORS or model in SEGMENTERS:
        return {}
    return dict(METHODS.get(name).training_recipe)


def _absolute_paths(cfg: TrainConfig) -> None:
    """Record checkpoint options and the data folder as absolute paths in the run's config, so
    that the run can be evaluated or resumed from another working directory."""
    for key, value in cfg.method_options.items():
        if key.endswith("checkpoint") and isinstance(value, str) and Path(value).exists():
            cfg.method_options[key] = str(Path(value).resolve())
    if cfg.data_dir is not None and Path(cfg.data_dir).exists():
        cfg.data_dir = str(Path(cfg.data_dir).resolve())
