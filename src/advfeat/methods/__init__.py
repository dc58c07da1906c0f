"""Training methods, one small module per method of each paper.

Every module of this package that defines a :class:`Method` registers it with
:func:`register_method`; importing the package imports them all.
"""

import importlib
import pkgutil

from advfeat.methods.base import Method, MethodOutput, PrepareContext, unwrap
from advfeat.methods.registry import METHODS, build_method, register_method

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "Method",
    "MethodOutput",
    "PrepareContext",
    "build_method",
    "register_method",
    "unwrap",
]
