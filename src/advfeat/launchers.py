"""Where the runs of ``advfeat compare`` train: processes on this machine, or submitit jobs.

* ``process`` (default): each run is an ``advfeat train`` process on this machine.
* ``slurm``: each run is a SLURM job submitted through submitit (``pip install "advfeat[slurm]"``)
  with the options of ``--slurm KEY=VALUE`` (any option of submitit's ``SlurmExecutor``:
  ``partition``, ``time`` in minutes, ``gpus_per_task``, ``cpus_per_task``, ``mem``, ...).
* ``submitit-local``: the same jobs through submitit's ``LocalExecutor`` on this machine.

A job calls :class:`TrainJob`: ``advfeat train --auto-resume`` in a child process. At the job's
time limit, or when it is preempted, submitit signals it (SIGUSR2 unless
``$SUBMITIT_PREEMPT_SIGNAL`` says otherwise) and calls :meth:`TrainJob.checkpoint`, which stops
the run with SIGTERM (the trainer checkpoints mid-epoch and exits 75) and gives submitit a fresh
copy of the job to requeue; the requeued job resumes the run. A run stopped by a SIGTERM that
reached it directly (a cluster that preempts with SIGTERM) is started again within the job and
resumes; on a cluster, the job is then killed and requeued by the scheduler.

Runs that share this machine (``process`` and ``submitit-local`` with ``--jobs N``) share its
GPU: each run process caps its CUDA memory at its share
(:data:`advfeat.train.runtime.CUDA_MEMORY_FRACTION_ENV`, inert on CPU).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import yaml

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.train.preemption import PREEMPTED_EXIT
from advfeat.train.runtime import CUDA_MEMORY_FRACTION_ENV

__all__ = [
    "LAUNCHERS",
    "Launcher",
    "ProcessLauncher",
    "SubmititLauncher",
    "TrainJob",
    "make_launcher",
    "memory_fraction",
    "parse_slurm_options",
    "run_environment",
]

LAUNCHERS = ("process", "submitit-local", "slurm")

INSTALL_SUBMITIT = 'pip install "advfeat[slurm]"'

MAX_TIMEOUT_REQUEUES = 20
"""How many times a job may reach its time limit and be requeued (preemptions do not count)."""

LOCAL_TIME_LIMIT_MIN = 7 * 24 * 60
"""Time limit of a ``submitit-local`` job without ``--slurm time=MINUTES``."""

RESTARTS_AFTER_SIGTERM = 10
"""How many times a job starts its run again after the run stopped on a SIGTERM of its own."""

CUDA_CONTEXT_HEADROOM = 0.05
"""Share of a GPU's memory left out of the runs' caps, for their CUDA contexts."""

_POLL_S = 0.2


def memory_fraction(sharing: int) -> float | None:
    """The share of one GPU's memory each of ``sharing`` concurrent runs may allocate
    (``None`` for one run alone: no cap)."""
    if sharing <= 1:
        return None
    return (1 - CUDA_CONTEXT_HEADROOM) / sharing


def run_environment(threads: int, sharing: int) -> dict[str, str]:
    """Environment variables of each run process: ``threads`` CPU threads, and with ``sharing``
    runs on one machine at once, each one's cap on a GPU's memory (read by the trainer, which
    applies it on CUDA only)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    fraction = memory_fraction(sharing)
    if fraction is not None:
        env[CUDA_MEMORY_FRACTION_ENV] = f"{fraction:.6g}"
    return env


class Launcher(Protocol):
    """Trains one run to its end and returns its exit status."""

    shares_machine: bool
    """Whether the runs train on this machine (and share its GPU)."""

    def train(
        self, command: Sequence[str], log_file: Path, env: Mapping[str, str], name: str
    ) -> int:
        """Run ``command`` (``advfeat train``) with ``env`` added, its output appended to
        ``log_file``; wait for it to end."""
        ...

    def cancel(self) -> None:
        """Stop every run still training (after Ctrl-C)."""
        ...


class ProcessLauncher:
    """Each run an ``advfeat train`` process on this machine."""

    shares_machine = True

    def train(
        self, command: Sequence[str], log_file: Path, env: Mapping[str, str], name: str
    ) -> int:
        with log_file.open("a") as out:
            return subprocess.call(
                list(command), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )

    def cancel(self) -> None:
        """Nothing to do: Ctrl-C reaches the run processes too."""


def _job_signal() -> int:
    """The signal submitit sends a job at its time limit or preemption."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return int(getattr(signal, f"SIG{name}", signal.SIGUSR2))


class TrainJob:
    """One run as a submitit job (checkpointable: submitit requeues what :meth:`checkpoint`
    returns). Calling it runs ``command`` in ``cwd`` with ``env`` added to the job's environment
    (a ``None`` value removes the variable), appends its output to ``log_file`` and returns its
    exit status."""

    def __init__(
        self,
        command: Sequence[str],
        log_file: str | Path,
        env: Mapping[str, str | None] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.command = list(command)
        self.log_file = str(Path(log_file).absolute())
        self.env = dict(env or {})
        self.cwd = str(Path(cwd or os.getcwd()).absolute())
        self._process: subprocess.Popen[bytes] | None = None
        self._status: int | None = None
        self._stopping = False

    def copy(self) -> TrainJob:
        """The same job, not started."""
        return TrainJob(self.command, self.log_file, self.env, self.cwd)

    def __call__(self) -> int:
        status = self._run_once()
        for _ in range(RESTARTS_AFTER_SIGTERM):
            if self._stopping or status not in (PREEMPTED_EXIT, -signal.SIGTERM):
                break
            status = self._run_once()  # --auto-resume continues from the checkpoint
        return status

    def checkpoint(self) -> Any:
        """Called by submitit on the job's signal: stop the run (SIGTERM: it checkpoints and
        exits), wait for it, and return a ``DelayedSubmission`` of a fresh copy of this job,
        which submitit requeues and which resumes the run."""
        from submitit.helpers import DelayedSubmission

        self._stopping = True
        if self._process is not None:
            self._stop_run()
            while self._status is None:
                time.sleep(_POLL_S)
        return DelayedSubmission(self.copy())

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def _run_once(self) -> int:
        job_signal = {_job_signal()} - {signal.SIGTERM}
        # the job's signal is for this process (submitit calls checkpoint()): the run ignores it,
        # as its mask blocks it; held back here until _process is set, so that checkpoint() sees
        # the run it must stop
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, job_signal)
        try:
            self._status = None
            with open(self.log_file, "ab") as log:
                self._process = self._start(log)
            waiter = threading.Thread(target=self._wait, args=(self._process,), daemon=True)
            waiter.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        # the waiting is the thread's: no lock is held here when checkpoint() interrupts it
        try:
            while self._status is None:
                time.sleep(_POLL_S)
        except BaseException:  # the job is going (Ctrl-C, cancelled): the run checkpoints and ends
            self._stop_run()
            raise
        return self._status

    def _stop_run(self) -> None:
        process = self._process
        if process is not None and self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)

    def _start(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            cwd=self.cwd,
        )

    def _wait(self, process: subprocess.Popen[bytes]) -> None:
        self._status = process.wait()


def parse_slurm_options(items: Sequence[str]) -> dict[str, Any]:
    """``["partition=gpu", "time=240"]`` → ``{"partition": "gpu", "time": 240}`` (values parsed
    as YAML); keys are checked against submitit's SLURM options."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise AdvfeatError(f"--slurm expects KEY=VALUE, got {item!r} (e.g. --slurm time=240)")
        try:
            options[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            options[key] = raw
    if options:
        known = _slurm_option_names()
        for key in options:
            if key not in known:
                raise unknown_name("--slurm option", key, known, show_all=60)
    return options


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise AdvfeatError(
            f"--launcher slurm and submitit-local need submitit: {INSTALL_SUBMITIT}"
        ) from None
    return submitit


def _slurm_option_names() -> set[str]:
    return set(_submitit().SlurmExecutor._valid_parameters())


class SubmititLauncher:
    """Each run a submitit job (``cluster``: ``"slurm"`` or ``"local"``), logs in ``folder``;
    ``options`` go to the executor's ``update_parameters``."""

    def __init__(
        self, cluster: str, folder: Path, options: Mapping[str, Any], env: Mapping[str, str | None]
    ) -> None:
        self.cluster = cluster
        self.folder = folder
        self.options = dict(options)
        self.env = dict(env)
        self.shares_machine = cluster == "local"
        self._executor: Any = None
        self._lock = threading.Lock()
        self._jobs: list[Any] = []
        self._cancelled = threading.Event()

    def _make_executor(self) -> Any:
        submitit = _submitit()
        folder = self.folder / "%j"
        if self.cluster == "slurm":
            executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
        else:
            executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
        executor.update_parameters(**self.options)
        return executor

    def train(
        self, command: Sequence[str], log_file: Path, env: Mapping[str, str], name: str
    ) -> int:
        job = TrainJob([*command], log_file, {**env, **self.env})
        with self._lock:
            if self._cancelled.is_set():
                return 130
            if self._executor is None:
                self._executor = self._make_executor()
            if self.cluster == "slurm" and "job_name" not in self.options:
                self._executor.update_parameters(job_name=f"advfeat-{name}")
            submitted = self._executor.submit(job)
            self._jobs.append(submitted)
        while not submitted.done():
            if self._cancelled.wait(1.0 if self.cluster == "local" else 10.0):
                return 130
        try:
            return int(submitted.result())
        except Exception as err:  # the job itself died: killed, timed out too often, ...
            with log_file.open("a") as out:
                out.write(
                    f"advfeat compare: job {submitted.job_id} failed ({type(err).__name__}: "
                    f"{err}); submitit's logs: {self.folder / str(submitted.job_id)}\n"
                )
            return 1

    def cancel(self) -> None:
        """Cancel the submitted jobs; their runs keep their checkpoints."""
        self._cancelled.set()
        with self._lock:
            for job in self._jobs:
                with contextlib.suppress(Exception):
                    if not job.done():
                        job.cancel(check=False)


def make_launcher(name: str, slurm: Sequence[str], folder: Path, *, threads: int) -> Launcher:
    """The launcher ``--launcher NAME --slurm KEY=VALUE ...`` asks for (checked before anything
    is written; submitit's job files go to ``folder``)."""
    if name not in LAUNCHERS:
        raise unknown_name("launcher", name, LAUNCHERS)
    if name == "process":
        if slurm:
            raise AdvfeatError("--slurm needs --launcher slurm (or submitit-local)")
        return ProcessLauncher()
    submitit = _submitit()
    options = parse_slurm_options(slurm)
    if name == "submitit-local":
        others = sorted(set(options) - {"time"})
        if others:
            raise AdvfeatError(
                f"--launcher submitit-local takes only --slurm time=MINUTES, not {', '.join(others)}"
            )
        local = {"timeout_min": options.get("time", LOCAL_TIME_LIMIT_MIN)}
        # a local job sees the GPUs this process sees (submitit would hide them)
        visible = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
        return SubmititLauncher("local", folder, local, visible)
    if "time" not in options:
        raise AdvfeatError(
            "--launcher slurm needs --slurm time=MINUTES: each job's time limit (a run that needs "
            "longer is checkpointed and requeued)"
        )
    if submitit.SlurmExecutor.affinity() <= 0:
        raise AdvfeatError(
            "--launcher slurm: no SLURM here (srun not found); submit from a login node of the "
            "cluster, or try the jobs here with --launcher submitit-local"
        )
    options.setdefault("cpus_per_task", threads)
    return SubmititLauncher("slurm", folder, options, {})
