"""Packaged presets: YAML run configurations reproducing the papers' settings.

A preset is a flat mapping of :class:`advfeat.train.TrainConfig` keys shipped in
``advfeat/methods/presets/NAME.yaml``; ``advfeat train --preset NAME`` starts from it.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from advfeat.errors import unknown_name

__all__ = ["load_preset", "preset_description", "preset_names"]


def _folder() -> Any:
    return resources.files("advfeat.methods") / "presets"


def preset_names() -> list[str]:
    """Names of the packaged presets."""
    return sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The config keys of preset ``name`` (its ``description`` key removed)."""
    names = preset_names()
    if name not in names:
        raise unknown_name("preset", name, names)
    data = yaml.safe_load((_folder() / f"{name}.yaml").read_text()) or {}
    data.pop("description", None)
    return dict(data)


def preset_description(name: str) -> str:
    """The one-line ``description`` of preset ``name`` (its paper and table)."""
    if name not in preset_names():
        raise unknown_name("preset", name, preset_names())
    data = yaml.safe_load((_folder() / f"{name}.yaml").read_text()) or {}
    return str(data.get("description", ""))
