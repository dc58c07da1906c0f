"""The flags and the layering that describe a run's protocol, shared by ``advfeat train`` and
``advfeat compare``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.presets import load_preset
from advfeat.train.config import TrainConfig, apply_overrides, load_yaml, parse_override

__all__ = [
    "DEFAULT_PRESET",
    "FLAG_KEYS",
    "SCHEDULE_KEYS",
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

SCHEDULE_KEYS: tuple[str, ...] = (
    "schedule",
    "milestones",
    "gamma",
    "poly_power",
    "warmup_epochs",
    "warmup_steps",
)
"""The config keys that make up a learning-rate schedule: a paper recipe sets all of them."""


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
        "--recipe",
        metavar="METHOD",
        help="train under the learning-rate schedule of METHOD's paper (e.g. afan: ×0.1 at 1/4 "
        "and 3/4 of the run, 200 warm-up steps), whatever the method trained; `paper`: the "
        "method's own. The whole schedule: refused beside schedule keys of --config or --set",
    )
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
    extra: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults ← ``--preset`` ← ``--recipe`` ← ``--config`` file ← explicit flags ← ``--set``
    ← ``extra`` (an ``advfeat compare`` arm).

    A paper recipe (``--recipe``) is applied whole: it replaces every schedule key
    (:data:`SCHEDULE_KEYS`) of the preset and the defaults, and a config file, ``--set`` or arm
    that also sets one is refused, so that no run trains under a mix of two schedules.
    Without ``--recipe`` every method trains under the same schedule.
    """
    layers: list[dict[str, Any]] = []
    if args.preset:
        layers.append(load_preset(args.preset))
    elif not (getattr(args, "method", None) or args.config or args.dataset):
        layers.append(load_preset(DEFAULT_PRESET))
    user: list[dict[str, Any]] = []
    if args.config:
        user.append(load_yaml(args.config))
    user.append(
        {
            key: getattr(args, attr, None)
            for attr, key in FLAG_KEYS.items()
            if getattr(args, attr, None) is not None
        }
    )
    user.append(dict(parse_override(o) for o in args.overrides))
    if extra:
        user.append(dict(extra))
    if method is not None:
        user.append({"method": method})
    cfg = TrainConfig()
    for layer in layers + user:
        apply_overrides(cfg, layer)
    recipe_name = getattr(args, "recipe", None)
    if recipe_name:
        schedule = _recipe_schedule(recipe_name, cfg.method, cfg.model, user)
        cfg = TrainConfig()
        for layer in [*layers, schedule, *user]:
            apply_overrides(cfg, layer)
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


def _recipe_schedule(
    name: str, method: str, model: str, user: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every schedule key, from the recipe of method ``name`` (``paper``: ``method``'s own) where
    it declares one and from :class:`TrainConfig`'s defaults elsewhere."""
    from advfeat.methods import METHODS

    owner = method if name == "paper" else name
    if owner not in METHODS:
        raise unknown_name("--recipe method", owner, METHODS.names())
    recipe = method_recipe(owner, model)
    if not recipe:
        having = [m for m in METHODS.names() if METHODS.get(m).training_recipe]
        raise AdvfeatError(
            f"--recipe {name}: {owner} declares no paper recipe for {model} (detection and "
            f"segmentation recipes are presets); methods with one: {', '.join(having)}"
        )
    mixed = sorted({k.partition(".")[0] for layer in user for k in layer} & set(SCHEDULE_KEYS))
    if mixed:
        raise AdvfeatError(
            f"--recipe {name} sets the whole schedule ({', '.join(SCHEDULE_KEYS)}); it cannot be "
            f"mixed with {', '.join(mixed)} from --config, --set or an arm: drop one or the other"
        )
    defaults = TrainConfig()
    return {key: recipe.get(key, getattr(defaults, key)) for key in SCHEDULE_KEYS}


def method_recipe(name: str, model: str = "") -> dict[str, Any]:
    """The classification training recipe declared by method ``name`` (empty for methods that
    declare none, and for detection / segmentation models, whose papers' recipes are the
    presets)."""
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
