"""Sub-commands of the ``advfeat`` command line, one module each."""

from __future__ import annotations

from typing import Any

__all__ = ["register_commands"]


def register_commands(sub: Any) -> None:
    """Add every sub-command's parser to the ``advfeat`` sub-parser set."""
    from advfeat.commands import bench, compare, evaluate, export, methods, train

    for module in (train, compare, evaluate, export, methods, bench):
        module.add_parser(sub)
