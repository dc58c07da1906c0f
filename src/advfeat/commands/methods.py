"""``advfeat methods``: every method with its paper and defaults."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("methods", help="list the training methods with their paper defaults")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from advfeat.methods import METHODS
    from advfeat.presets import preset_description, preset_names

    table: dict[str, dict[str, Any]] = {
        name: {"paper": METHODS.get(name).paper, "defaults": METHODS.get(name).defaults()}
        for name in METHODS
    }
    if args.json:
        print(json.dumps({"methods": table, "presets": preset_names()}, indent=2))
        return 0
    for name, info in table.items():
        print(f"{name}  ({info['paper']})")
        for key, value in info["defaults"].items():
            print(f"    {key} = {value!r}")
    print("\npresets (advfeat train --preset NAME):")
    for name in preset_names():
        print(f"    {name}: {preset_description(name)}")
    return 0
