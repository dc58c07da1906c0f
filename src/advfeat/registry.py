"""A tiny name → factory registry (in the spirit of timm's model registry).

One registration style for everything named (methods, models, datasets, detectors,
segmenters, evaluation suites): a :class:`Registry` object, filled by a decorator in the module
that defines the thing, and a package ``__init__`` that imports all of its modules with
:func:`import_submodules` — so a new module cannot be forgotten in a hand-kept list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from advfeat.errors import AdvfeatError, unknown_name

T = TypeVar("T")

__all__ = ["Registry", "import_submodules"]


class Registry(Generic[T]):
    """Maps names to factories; unknown names raise :class:`AdvfeatError` with close matches.

    >>> models: Registry[Callable[..., int]] = Registry("model")
    >>> @models.register("one")
    ... def one() -> int:
    ...     return 1
    >>> models.get("one")()
    1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise AdvfeatError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def remove(self, name: str) -> T:
        """Unregister ``name`` (e.g. a plugin or a test's temporary entry); returns it."""
        try:
            return self._items.pop(name)
        except KeyError:
            raise unknown_name(self.kind, name, self._items) from None

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)


def import_submodules(package: str, path: Iterable[str], *, skip: Iterable[str] = ()) -> None:
    """Import every module of ``package`` (its ``__path__``) except ``skip``: the modules
    register themselves with their decorators on import."""
    skipped = set(skip)
    for info in pkgutil.iter_modules(list(path)):
        if info.name not in skipped and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
