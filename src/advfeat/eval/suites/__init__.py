"""The evaluation suites, one small module each, registered in :data:`SUITES`.

A suite is a function ``run(ctx: EvalContext) -> dict`` (JSON-ready) registered with
:func:`register_suite`, which also declares its order, the tasks it applies to, its report
section and its plots; a suite that does not apply to the model or data returns
``{"skipped": "<why>"}``. Every module of this folder is imported here, so a new suite is one new
file.
"""

from advfeat.eval.suites.registry import (
    SUITES,
    Suite,
    chosen_suites,
    options_of,
    ordered_suites,
    register_suite,
    skipped,
    split_options,
    suite_names,
    suite_options,
)
from advfeat.registry import import_submodules

import_submodules(__name__, __path__, skip=("registry",))

__all__ = [
    "SUITES",
    "Suite",
    "chosen_suites",
    "options_of",
    "ordered_suites",
    "register_suite",
    "skipped",
    "split_options",
    "suite_names",
    "suite_options",
]
