"""No module of advfeat imports from a higher layer (the layer map of docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "advfeat"

KNOWN_UPWARD: dict[tuple[str, str], str] = {}
"""Upward arrows that are still there, each with the change that removes it."""


def layer_map(block: str = "layers", root: str = "advfeat") -> dict[str, int]:
    """The ```<block> map of docs/architecture.md: full module name -> layer (names in the
    block are relative to ``root``; ``root``'s last part alone names ``root`` itself)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    found = re.search(rf"```{block}\n(.*?)```", text, re.S)
    assert found, f"docs/architecture.md has no ```{block} block"
    own = root.rpartition(".")[2]
    layers: dict[str, int] = {}
    for line in found.group(1).strip().splitlines():
        level, *names = line.split()
        for name in names:
            layers[root if name == own else f"{root}.{name}"] = int(level)
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


EVAL = "advfeat.eval"


def eval_imports() -> dict[str, list[tuple[str, int]]]:
    """``module -> [(imported module of eval/, line)]`` for every module of ``eval/``."""
    graph: dict[str, list[tuple[str, int]]] = {}
    for path in sorted((PACKAGE / "eval").rglob("*.py")):
        found = imported_modules(path)
        graph[module_name(path)] = [(m, n) for m, n in found if m.startswith(EVAL)]
    return graph


def upward_inside(graph: dict[str, list[tuple[str, int]]], layers: dict[str, int]) -> list[str]:
    return [
        f"{source} (layer {layer_of(source, layers)}) imports {target} "
        f"(layer {layer_of(target, layers)}), line {line}"
        for source, targets in graph.items()
        for target, line in targets
        if layer_of(target, layers) > layer_of(source, layers)
    ]


def import_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where it closed)."""
    edges = {m: sorted({t for t, _ in targets if t != m}) for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_every_eval_module_has_an_eval_layer() -> None:
    layers = layer_map("layers-eval", EVAL)
    for module in eval_imports():
        layer_of(module, layers)


def test_no_eval_module_imports_upward_or_in_a_circle() -> None:
    """Inside eval/: no import from a higher layer of the ```layers-eval map, and no cycle."""
    graph = eval_imports()
    assert upward_inside(graph, layer_map("layers-eval", EVAL)) == []
    assert import_cycles(graph) == []


def test_the_eval_checks_see_a_cycle_and_an_upward_import() -> None:
    layers = layer_map("layers-eval", EVAL)
    config, suites = f"{EVAL}.config", f"{EVAL}.suites"
    assert layer_of(f"{EVAL}.suites.attacks", layers) > layer_of(config, layers)
    assert layer_of(f"{EVAL}.report", layers) < layer_of(suites, layers)
    lazy = (PACKAGE / "eval" / "config.py").read_text() + (
        "\n\ndef _late() -> None:\n    from advfeat.eval.suites import SUITES\n"
    )
    graph = eval_imports()
    found = imported_modules(PACKAGE / "eval" / "config.py", lazy)
    graph[config] = [(m, n) for m, n in found if m.startswith(EVAL)]
    assert any(line.startswith(config) for line in upward_inside(graph, layers))
    cycles = import_cycles(graph)
    assert cycles and all(c[0] == c[-1] for c in cycles)
    assert any(config in c and f"{EVAL}.suites.registry" in c for c in cycles)


# ------------------------------------------------------------------ configuration in one place
COMPOSERS = {"load_preset", "load_yaml", "apply_overrides"}
"""The functions that turn what a user gave (a preset, a config file, ``--set`` values) into a
run's configuration; only :mod:`advfeat.train.compose` layers them (issue: configuration composed
once, below the command line)."""

COMPOSING_MODULES = {"advfeat.train.compose", "advfeat.train.config", "advfeat.presets"}
"""Where they are defined and layered (``config`` and ``presets`` define them)."""


def calls_of(names: set[str], path: Path, text: str | None = None) -> list[tuple[str, int]]:
    """``(called name, line)`` for every call of one of ``names`` in ``path`` (or ``text``)."""
    source = path.read_text() if text is None else text
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in names:
                found.append((name, node.lineno))
    return found


def test_a_run_configuration_is_composed_in_one_place() -> None:
    outside = [
        f"{module_name(path)}:{line} calls {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if module_name(path) not in COMPOSING_MODULES
        for name, line in calls_of(COMPOSERS, path)
    ]
    assert outside == []


def test_the_composition_check_sees_a_call() -> None:
    command = PACKAGE / "commands" / "train.py"
    text = "from advfeat.train.config import apply_overrides\napply_overrides(cfg, {})\n"
    assert calls_of(COMPOSERS, command, text) == [("apply_overrides", 2)]
    assert calls_of(COMPOSERS, command) == []
