"""Checkpoints: written atomically, read with ``weights_only=True``, recognised by a format tag."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from advfeat.errors import AdvfeatError

__all__ = [
    "FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "advfeat-checkpoint/1"


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    _atomic_replace(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, numbers, strings, lists, dicts) atomically with a format tag."""
    payload = {"format": FORMAT, **state}
    _atomic_replace(Path(path), lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`AdvfeatError` for a missing, unreadable or foreign file.
    """
    p = Path(path)
    if not p.is_file():
        raise AdvfeatError(f"checkpoint {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt/foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdvfeatError(
            f"checkpoint {str(p)!r} could not be read as an advfeat checkpoint ({first[:160]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise AdvfeatError(
            f"{str(p)!r} is not an advfeat checkpoint (expected a file written by `advfeat train`, "
            f"format {FORMAT!r})"
        )
    return state
