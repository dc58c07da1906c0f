"""Training methods, one small module per method of each paper.

Every module of this package that defines a :class:`Method` registers it with
:func:`register_method`; importing the package imports them all.
"""

from advfeat.methods.base import Method, MethodOutput, PrepareContext, unwrap
from advfeat.methods.registry import (
    METHODS,
    build_method,
    build_task_method,
    register_method,
    task_methods,
)
from advfeat.registry import import_submodules

import_submodules(__name__, __path__, skip=("base", "registry"))

__all__ = [
    "METHODS",
    "Method",
    "MethodOutput",
    "PrepareContext",
    "build_method",
    "build_task_method",
    "register_method",
    "task_methods",
    "unwrap",
]
