"""User-facing errors.

Every mistake a user can make (a wrong name, a bad value, a missing file) raises
:class:`AdvfeatError`. The command line prints its message on one line and exits with
status 2; library users catch it like any ``ValueError``.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

__all__ = ["AdvfeatError", "DiskFull", "close_matches", "unknown_name"]


class AdvfeatError(ValueError):
    """A user error: the message says what was wrong and what would be right."""


class DiskFull(OSError):
    """A file could not be written for want of space (``ENOSPC``, or ``EDQUOT``: over quota);
    the file it was to replace is unchanged. The command line prints the message on one line and
    exits with status 74 (``EX_IOERR``)."""

    def __init__(self, path: str, message: str, code: int = errno.ENOSPC) -> None:
        super().__init__(code, message, path)

    def __str__(self) -> str:
        return str(self.strerror)


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` entries of ``choices`` that look like ``name`` (best first)."""
    pool = list(choices)
    hits = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if not hits:
        lowered = name.lower()
        hits = [c for c in pool if lowered in c.lower() or c.lower() in lowered][:n]
    return hits


def unknown_name(
    kind: str, name: str, choices: Iterable[str], *, show_all: int = 25
) -> AdvfeatError:
    """Build the error for an unknown ``kind`` called ``name``, naming close matches.

    >>> str(unknown_name("model", "resnet2", ["resnet20", "resnet32"]))
    "unknown model 'resnet2'; did you mean 'resnet20', 'resnet32'? (known: resnet20, resnet32)"
    """
    pool = sorted(set(choices))
    hits = close_matches(name, pool)
    msg = f"unknown {kind} {name!r}"
    if hits:
        msg += "; did you mean " + ", ".join(repr(h) for h in hits) + "?"
    if len(pool) <= show_all:
        msg += f" (known: {', '.join(pool)})"
    else:
        msg += f" ({len(pool)} known, e.g. {', '.join(pool[:show_all])}, ...)"
    return AdvfeatError(msg)
