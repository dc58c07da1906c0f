"""The run folder as a small transactional store.

``advfeat train --out DIR`` owns ``DIR`` for the life of the run:

* everything is validated before anything is written (:func:`check_run_folder` only reads);
* :class:`RunLock` holds an exclusive lock (``DIR/.advfeat.lock``, ``flock``) while the run
  writes; a second writer gets one clear line; the kernel drops the lock when the process dies,
  even by ``kill -9``;
* a folder holding an interrupted run (``checkpoint.pt`` without ``metrics.json``) is never
  overwritten without ``--force``, and the message says ``--resume``;
* ``--force`` clears the old run's outputs (``metrics.json`` first, so that the folder never
  reads as finished with a new checkpoint) before the new run writes anything;
* temporary files of killed writers of the run's files are removed once the lock is held.

``--resume`` resumes *the saved experiment*: :func:`resumed_config` starts from the saved
configuration and refuses, listing them, changes of the keys that affect the result.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from advfeat.checkpoint import remove_stale_temporaries
from advfeat.errors import AdvfeatError
from advfeat.train.config import TrainConfig

__all__ = [
    "EVAL_OUTPUTS",
    "NON_RESULT_KEYS",
    "RUN_OUTPUTS",
    "RunLock",
    "check_run_folder",
    "check_writable",
    "clear_run",
    "config_differences",
    "read_saved_config",
    "resumed_config",
    "run_state",
]

LOCK_NAME = ".advfeat.lock"

RUN_OUTPUTS = ("metrics.json", "checkpoint.pt", "best.pt", "history.csv", "config.yaml")
"""What ``advfeat train`` writes into a run folder (``metrics.json`` first: it marks a finished
run, so ``--force`` removes it before anything else)."""

EVAL_OUTPUTS = ("eval.json", "eval.json.partial", "eval.md", "eval_plots")
"""``advfeat eval``'s default outputs beside the checkpoint: results of the old weights, removed
with them by ``--force``."""

NON_RESULT_KEYS = frozenset(
    {"device", "progress", "workers", "data_dir", "eval_batch_size", "loggers"}
)
"""Config keys a resumed run may change: where and how fast it runs, where the data lies now.
Every other key (the lead's new ones included) changes what the run computes."""


def check_writable(folder: Path) -> None:
    """Refuse an ``--out`` that is a file, lies under a file, or cannot be created."""
    if folder.exists() and not folder.is_dir():
        raise AdvfeatError(f"--out {str(folder)!r} is a file, not a folder; choose another --out")
    parent = folder
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise AdvfeatError(
            f"--out {str(folder)!r} cannot be created: {str(parent)!r} is a file, not a folder"
        )
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise AdvfeatError(
            f"--out {str(folder)!r} is not writable (no write permission on {str(parent)!r}); "
            "choose another --out"
        )


def run_state(folder: Path) -> str:
    """``"finished"`` (``metrics.json``), ``"interrupted"`` (``checkpoint.pt`` only) or ``"new"``."""
    if (folder / "metrics.json").exists():
        return "finished"
    if (folder / "checkpoint.pt").exists():
        return "interrupted"
    return "new"


def check_run_folder(folder: Path, *, resume: bool, force: bool, locked: bool = False) -> None:
    """Whether a run may write into ``folder`` with these flags (reads only); ``locked``: this
    process holds the folder's lock (so does not test it)."""
    if resume and force:
        raise AdvfeatError(
            "--resume continues the run in --out and --force discards it: pass only one of them"
        )
    check_writable(folder)
    holder = None if locked else lock_holder(folder)
    if holder is not None:
        raise in_use(folder, holder)
    state = run_state(folder)
    if resume:
        if not (folder / "checkpoint.pt").exists():
            raise AdvfeatError(
                f"nothing to resume: {str(folder / 'checkpoint.pt')!r} does not exist "
                "(run without --resume to start it)"
            )
        return
    if force:
        return
    if state == "finished":
        raise AdvfeatError(
            f"{str(folder)!r} already holds a finished run; pass --force to overwrite it or "
            f"choose another --out"
        )
    if state == "interrupted":
        raise AdvfeatError(
            f"{str(folder)!r} holds an interrupted run (checkpoint.pt without metrics.json): "
            "continue it with --resume, or pass --force to discard it and start again"
        )


def clear_run(folder: Path) -> list[Path]:
    """Remove a previous run's outputs from ``folder`` (``metrics.json`` first)."""
    removed: list[Path] = []
    for name in (*RUN_OUTPUTS, *EVAL_OUTPUTS):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
            removed.append(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def in_use(folder: Path, holder: str) -> AdvfeatError:
    return AdvfeatError(
        f"{str(folder)!r} is in use by another advfeat process (pid {holder}); wait for it to "
        "finish or choose another --out"
    )


def lock_holder(folder: Path) -> str | None:
    """The pid (as written in the lock file) of the process holding ``folder``'s lock, or
    ``None`` when nobody holds it (reads only: a missing lock file is not created)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # drops the shared lock taken to test
    return None


class RunLock:
    """An exclusive lock on a run folder, held while one process writes into it.

    ``flock`` on ``DIR/.advfeat.lock``: released by the kernel when the process ends, however it
    ends. Where ``fcntl`` does not exist (Windows) the lock is a no-op.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise AdvfeatError(
                f"cannot write to --out {str(self.folder)!r} ({err.strerror or err}); "
                "choose another --out"
            ) from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise in_use(self.folder, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        remove_stale_temporaries(self.folder, RUN_OUTPUTS)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def read_saved_config(checkpoint: Path) -> TrainConfig:
    """The configuration saved in a run's checkpoint (weights memory-mapped, not verified: the
    trainer verifies the checkpoint when it loads it)."""
    from advfeat.checkpoint import load_checkpoint

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # let load_checkpoint word the error
        state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        load_checkpoint(checkpoint)  # raises the foreign-file error
        raise AdvfeatError(f"{str(checkpoint)!r} holds no run configuration")
    return TrainConfig.from_dict(state["config"])


def _get(cfg: TrainConfig, key: str) -> Any:
    head, _, sub = key.partition(".")
    value = getattr(cfg, head)
    if sub:
        return value.get(sub, "<unset>") if isinstance(value, dict) else "<unset>"
    return value


def config_differences(
    saved: TrainConfig, given: TrainConfig, keys: Iterable[str] | None = None
) -> list[str]:
    """``key: saved → given`` for each result-affecting key (of ``keys``, default all) that differs."""
    names = list(keys) if keys is not None else list(saved.to_dict())
    diffs = []
    for key in names:
        if key.partition(".")[0] in NON_RESULT_KEYS:
            continue
        a, b = _get(saved, key), _get(given, key)
        if a != b:
            diffs.append(f"{key}: {a!r} → {b!r}")
    return diffs


def resume_refusal(folder: Path, diffs: list[str]) -> AdvfeatError:
    return AdvfeatError(
        f"cannot resume {str(folder)!r}: the command changes the saved experiment ("
        + "; ".join(diffs)
        + "); `advfeat train --out DIR --resume` alone resumes it as saved, or start a new run "
        "in another --out"
    )


def resumed_config(folder: Path, given: TrainConfig, explicit: Iterable[str]) -> TrainConfig:
    """The saved configuration of the run in ``folder``, with the keys the command line set
    explicitly (``explicit``: ``lr``, ``method_options.alpha``, ...) taken from ``given`` when they
    do not change the result; a change of any other key is refused, listing them all."""
    saved = read_saved_config(folder / "checkpoint.pt")
    cfg = copy.deepcopy(saved)
    keys = sorted(set(explicit))
    diffs = config_differences(saved, given, keys)
    if diffs:
        raise resume_refusal(folder, diffs)
    for key in keys:
        head = key.partition(".")[0]
        if head in NON_RESULT_KEYS:
            setattr(cfg, head, copy.deepcopy(getattr(given, head)))
    cfg.progress = given.progress
    cfg.validate()
    return cfg
