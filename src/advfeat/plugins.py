"""A user's own models, datasets and methods on the command line: ``advfeat --import MODULE``.

``MODULE`` is an importable module name (``my_package.models``) or a path to a ``.py`` file; its
import runs the user's registrations (``MODELS.add``, ``DATASETS.register``, ``METHODS``...), so
the names work in ``advfeat train``, ``eval``, ``compare`` and ``export``. The modules are also
put in the environment variable ``ADVFEAT_IMPORT`` (``os.pathsep``-separated), which every
``advfeat`` process reads, so the runs ``advfeat compare`` starts import them too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from advfeat.errors import AdvfeatError

__all__ = ["ENV_VAR", "import_user_modules", "split_import_flags"]

ENV_VAR = "ADVFEAT_IMPORT"


def split_import_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(modules, other arguments)``: ``--import M`` / ``--import=M`` anywhere on the line."""
    modules: list[str] = []
    rest: list[str] = []
    items = iter(argv)
    for arg in items:
        if arg == "--import":
            value = next(items, None)
            if value is None or value.startswith("-"):
                raise AdvfeatError("--import needs a module name or a path to a .py file")
            modules.append(value)
        elif arg.startswith("--import="):
            modules.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return modules, rest


def _import_one(name: str) -> ModuleType:
    path = Path(name)
    if name.endswith(".py"):
        if not path.is_file():
            raise AdvfeatError(f"--import {name!r}: no such file")
        module_name = f"advfeat_user_{path.stem}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise AdvfeatError(f"--import {name!r}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise AdvfeatError(
            f"--import {name!r}: {err}; give an importable module (on PYTHONPATH) or a .py path"
        ) from None


def import_user_modules(names: Sequence[str] = ()) -> list[ModuleType]:
    """Import ``names`` and those in ``$ADVFEAT_IMPORT`` (each once); export the union to
    ``$ADVFEAT_IMPORT`` for child processes."""
    inherited = [n for n in os.environ.get(ENV_VAR, "").split(os.pathsep) if n]
    wanted = list(
        dict.fromkeys(
            [*inherited, *(str(Path(n).resolve()) if n.endswith(".py") else n for n in names)]
        )
    )
    modules = [_import_one(n) for n in wanted]
    if wanted:
        os.environ[ENV_VAR] = os.pathsep.join(wanted)
    return modules
