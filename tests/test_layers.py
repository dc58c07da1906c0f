"""No module of advfeat imports from a higher layer (the layer map of docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "advfeat"

KNOWN_UPWARD: dict[tuple[str, str], str] = {}
"""Upward arrows that are still there, each with the change that removes it."""


def layer_map() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    found = re.search(r"```layers\n(.*?)```", text, re.S)
    assert found, "docs/architecture.md has no ```layers block"
    layers: dict[str, int] = {}
    for line in found.group(1).strip().splitlines():
        level, *names = line.split()
        for name in names:
            layers["advfeat" if name == "advfeat" else f"advfeat.{name}"] = int(level)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers:
            return layers[prefix]
    raise AssertionError(f"{module} has no layer in docs/architecture.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, text: str | None = None) -> list[tuple[str, int]]:
    """``(imported advfeat module, line)`` for every import in ``path`` (or in ``text`` read as
    that file), lazy and relative ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    source = path.read_text() if text is None else text
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "advfeat":  # `from advfeat import attacks` names a submodule
                for alias in node.names:
                    sub = PACKAGE / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    out.append((f"advfeat.{alias.name}" if is_module else target, node.lineno))
            else:
                out.append((target, node.lineno))
    return [(m, line) for m, line in out if m == "advfeat" or m.startswith("advfeat.")]


def upward_imports() -> list[str]:
    layers = layer_map()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        own = layer_of(source, layers)
        for target, line in imported_modules(path):
            if layer_of(target, layers) > own and (source, target) not in KNOWN_UPWARD:
                rel = path.relative_to(PACKAGE.parent)
                found.append(
                    f"{rel}:{line}: {source} (layer {own}) imports {target} "
                    f"(layer {layer_of(target, layers)})"
                )
    return found


def test_every_module_has_a_layer() -> None:
    layers = layer_map()
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path), layers)


def test_no_module_imports_from_a_higher_layer() -> None:
    assert upward_imports() == []


def test_known_exceptions_are_still_needed() -> None:
    """A removed upward arrow must leave KNOWN_UPWARD too (so the list never hides a new one)."""
    for source, target in KNOWN_UPWARD:
        path = PACKAGE.parent / (source.replace(".", "/") + ".py")
        assert (target, True) in {(m, True) for m, _ in imported_modules(path)}, (source, target)


def test_the_check_sees_an_upward_import() -> None:
    layers = layer_map()
    assert layer_of("advfeat.norm.stats", layers) < layer_of("advfeat.methods.base", layers)
    assert layer_of("advfeat.checkpoint", layers) < layer_of("advfeat.methods", layers)
    assert layer_of("advfeat.checkpoint", layers) < layer_of("advfeat.eval.runner", layers)
    path = PACKAGE / "norm" / "stats.py"
    lazy_relative = path.read_text() + "\n\ndef _late() -> None:\n    from ..methods import base\n"
    found = imported_modules(path, lazy_relative)
    assert found[-1][0] == "advfeat.methods"
    assert layer_of(found[-1][0], layers) > layer_of("advfeat.norm.stats", layers)
