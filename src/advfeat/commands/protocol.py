"""The flags that describe a run's protocol, shared by ``advfeat train`` and ``advfeat compare``,
and what they give :func:`advfeat.train.compose.compose` (:func:`sources_from_args`)."""

from __future__ import annotations

import argparse

from advfeat.data import DATASETS
from advfeat.train.compose import ConfigSources

__all__ = ["FLAG_KEYS", "add_protocol_arguments", "sources_from_args"]

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
    p.add_argument("--dataset", help=", ".join(DATASETS.names()))
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


def sources_from_args(args: argparse.Namespace) -> ConfigSources:
    """What the protocol flags of ``args`` give a run's configuration (flags a command does not
    have count as not given), the preset and the config file read."""
    flags = {
        key: getattr(args, attr)
        for attr, key in FLAG_KEYS.items()
        if getattr(args, attr, None) is not None
    }
    return ConfigSources.read(
        args.preset,
        args.config,
        flags,
        args.overrides,
        recipe=getattr(args, "recipe", None),
        quiet=bool(getattr(args, "quiet", False)),
    )
