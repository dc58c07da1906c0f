"""Checkpoints: written atomically, read with ``weights_only=True``, verified by a digest.

Every checkpoint written by :func:`save_checkpoint` carries ``digest``: a SHA-256 of its content
(every tensor's dtype, shape and bytes, every number and string, in order). :func:`load_checkpoint`
recomputes it on every load, so a damaged file (a flipped byte inside the weights, which the zip
container does not notice) is refused instead of evaluated or resumed. Checkpoints of the first
format (no digest) still load, unverified.

Files are written through a temporary file in the same folder, ``fsync``-ed and renamed; they get
the permissions of a newly created file (``0666`` less the umask), not ``mkstemp``'s ``0600``.
A write that runs out of space removes its temporary file and raises
:class:`~advfeat.errors.DiskFull` naming the file and the space left; the file it was to replace
is unchanged.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from advfeat.errors import AdvfeatError, DiskFull

__all__ = [
    "FORMAT",
    "LEGACY_FORMATS",
    "InitialWeights",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "checkpoint_digest",
    "content_digest",
    "load_checkpoint",
    "read_initial_weights",
    "remove_stale_temporaries",
    "save_checkpoint",
]

FORMAT = "advfeat-checkpoint/2"
"""The format tag of checkpoints written now (content digest in ``digest``)."""

LEGACY_FORMATS = ("advfeat-checkpoint/1",)
"""Earlier formats that still load (without a digest to verify)."""

_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_replace(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    try:
        _write_and_rename(path, write)
    except Exception as err:
        code = _no_space(err)
        if code is not None:
            raise _disk_full(path, code) from err
        raise
    try:  # make the rename itself durable (best effort: not every system can fsync a folder)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _write_and_rename(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a temporary file beside ``path`` and rename it to ``path`` (removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(err: BaseException) -> int | None:
    """``ENOSPC`` / ``EDQUOT`` when ``err`` or an error it arose from ran out of space (a full
    disk reaches ``torch.save``'s caller as a ``RuntimeError`` raised while handling it)."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return int(cause.errno)
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def _disk_full(path: Path, code: int) -> DiskFull:
    """The error of a write of ``path`` that ran out of space (``code``: ``ENOSPC`` or
    ``EDQUOT``), said once its temporary file is removed."""
    try:
        free = _bytes(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown space"
    what = "no space left on the device" if code == errno.ENOSPC else "over the disk quota"
    kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
    return DiskFull(
        str(path),
        f"{what} to write {str(path)!r} ({free} free there); {kept}: free some space, then run "
        "the command again (a training run continues with --resume)",
        code,
    )


def _bytes(n: int) -> str:
    """``n`` bytes for a reader: ``512 B``, ``3.2 MB``, ``1.5 GB``."""
    size, unit = float(n), "B"
    for larger in ("kB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, larger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) that killed writers of the files ``names``
    left in ``folder``.

    Call it only while no other process writes those files (the run folder's lock is held).
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for name in names:
        for p in root.glob(f".{glob.escape(name)}.*{_TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    _atomic_replace(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.to("cpu").contiguous().reshape(-1)
    if t.dtype.is_complex:
        t = torch.view_as_real(t).reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj`` to the hash ``h`` in a canonical, type-tagged way."""
    if isinstance(obj, torch.Tensor):
        h.update(b"T" + str(obj.dtype).encode() + repr(tuple(obj.shape)).encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, list | tuple):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, bool) or obj is None:
        h.update(b"B" + repr(obj).encode())
    elif isinstance(obj, int):
        h.update(b"I" + str(obj).encode() + b";")
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S" + struct.pack("<q", len(data)) + data)
    elif isinstance(obj, bytes):
        h.update(b"Y" + struct.pack("<q", len(obj)) + obj)
    else:
        h.update(b"O" + type(obj).__name__.encode() + repr(obj).encode())


def content_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's content, ``digest`` itself left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def checkpoint_digest(state: dict[str, Any]) -> str:
    """The digest of a loaded checkpoint: its recorded one, or (first format) its content's."""
    digest = state.get("digest")
    return digest if isinstance(digest, str) else content_digest(state)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> str:
    """Save ``state`` (tensors, numbers, strings, lists, dicts) atomically with a format tag and
    a content digest; return the digest."""
    payload = {"format": FORMAT, **{k: v for k, v in state.items() if k != "digest"}}
    digest = content_digest(payload)
    payload["digest"] = digest
    _atomic_replace(Path(path), lambda fh: torch.save(payload, fh))
    return digest


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``) and check
    its digest.

    Raises :class:`AdvfeatError` for a missing, unreadable, foreign or damaged file.
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
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise AdvfeatError(
            f"{str(p)!r} is not an advfeat checkpoint (expected a file written by `advfeat train`, "
            f"format {FORMAT!r})"
        )
    if verify and state["format"] == FORMAT:
        recorded = state.get("digest")
        if not isinstance(recorded, str) or content_digest(state) != recorded:
            raise AdvfeatError(
                f"checkpoint {str(p)!r} is damaged: its content does not match its digest "
                "(restore it from a copy, or resume from another checkpoint)"
            )
    return state


@dataclass(frozen=True)
class InitialWeights:
    """The weights a method starts from (AdvBN's pre-trained model, AFA's stage-I run), with the
    configuration of the run that wrote them and where they came from (for messages)."""

    weights: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = "<in memory>"


def read_initial_weights(path: str | Path, *, method: str) -> InitialWeights:
    """Read the model weights and run configuration of an ``advfeat train`` checkpoint.

    Raises :class:`AdvfeatError` (naming ``method``) when the file is missing, unreadable,
    damaged or holds no model weights.
    """
    p = str(path)
    if not Path(p).is_file():
        raise AdvfeatError(f"{method}: checkpoint {p!r} does not exist")
    state = load_checkpoint(p)
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise AdvfeatError(f"{method}: checkpoint {p!r} holds no model weights")
    config = state.get("config")
    return InitialWeights(weights, dict(config) if isinstance(config, dict) else {}, p)
