"""``advfeat compare --launcher``: SLURM options, the GPU share of runs on one machine, and
submitit jobs that requeue themselves (run through submitit's LocalExecutor)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from advfeat.cli import main
from advfeat.compare import PlannedRun, flatten_metrics, run_all
from advfeat.errors import AdvfeatError
from advfeat.launchers import TrainJob, memory_fraction, parse_slurm_options, run_environment
from advfeat.train.config import TrainConfig
from advfeat.train.runtime import CUDA_MEMORY_FRACTION_ENV, cap_cuda_memory

submitit = pytest.importorskip("submitit")

# a comparison of 2 runs on tiny shapes: 2 epochs of 4 steps, so that a signal sent once training
# has started lands mid-run
PROTOCOL = [
    "--methods", "standard", "--epochs", "2", "--batch-size", "16",
    "--set", "dataset_options={n_train: 64, n_test: 32, image_size: 16}",
]  # fmt: skip

# a stand-in for `advfeat train --auto-resume`: SIGTERM → "checkpoint", exit 75; a second start
# finishes; it reports the signals it has blocked and marks when it is ready for signals
RUN = """
import signal, sys, time
from pathlib import Path
starts = Path(sys.argv[1])
n = len(starts.read_text().split()) if starts.exists() else 0
starts.write_text(starts.read_text() + " start" if starts.exists() else "start")
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
blocked = sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
print("started", n + 1, "blocked", blocked, flush=True)
Path(sys.argv[2]).touch()
for _ in range(600):
    if stop:
        print("checkpointed", flush=True)
        sys.exit(75)
    if n:
        print("finished", flush=True)
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
"""


def _stand_in(tmp_path: Path) -> tuple[TrainJob, Path, Path]:
    script = tmp_path / "run.py"
    script.write_text(RUN)
    ready = tmp_path / "ready"
    log = tmp_path / "run.log"
    return (
        TrainJob([sys.executable, str(script), str(tmp_path / "starts"), str(ready)], log),
        ready,
        log,
    )


def _start_in_thread(job: TrainJob) -> tuple[threading.Thread, dict[str, int]]:
    status: dict[str, int] = {}
    thread = threading.Thread(target=lambda: status.setdefault("status", job()))
    thread.start()
    return thread, status


def _wait_for(path: Path, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_a_run_stopped_by_sigterm_resumes_within_its_job(tmp_path: Path) -> None:
    job, ready, log = _stand_in(tmp_path)
    thread, status = _start_in_thread(job)
    _wait_for(ready)
    assert job._process is not None
    os.kill(job._process.pid, signal.SIGTERM)
    thread.join(60)
    assert status == {"status": 0}
    text = log.read_text()
    assert "checkpointed" in text and "started 2" in text and text.endswith("finished\n")


def test_the_job_signal_stops_the_run_and_requeues_a_fresh_copy(tmp_path: Path) -> None:
    job, ready, log = _stand_in(tmp_path)
    thread, status = _start_in_thread(job)
    _wait_for(ready)
    assert job._process is not None
    os.kill(job._process.pid, signal.SIGUSR2)  # submitit's signal is the job's, not the run's
    time.sleep(0.3)
    delayed = job.checkpoint()  # what submitit's handler calls on that signal
    thread.join(60)
    assert status == {"status": 75}  # stopped with its checkpoint, and not started again
    assert "started 1 blocked ['SIGUSR2']" in log.read_text()
    assert "checkpointed" in log.read_text() and "started 2" not in log.read_text()
    again = delayed.function
    assert isinstance(again, TrainJob) and again is not job
    assert (again.command, again.log_file, again.env) == (job.command, job.log_file, job.env)
    assert delayed.result() == 0  # the requeued job resumes and finishes
    assert log.read_text().endswith("started 2 blocked ['SIGUSR2']\nfinished\n")


def test_runs_sharing_this_machine_share_its_gpu_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert memory_fraction(1) is None and memory_fraction(4) == pytest.approx(0.95 / 4)
    assert run_environment(3, 1) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert run_environment(1, 2)[CUDA_MEMORY_FRACTION_ENV] == "0.475"

    class Recorder:
        def __init__(self, shares_machine: bool) -> None:
            self.shares_machine = shares_machine
            self.envs: list[dict[str, str]] = []

        def train(
            self, command: Sequence[str], log: Path, env: Mapping[str, str], name: str
        ) -> int:
            self.envs.append(dict(env))
            return 0

        def cancel(self) -> None:
            pass

    def planned(n: int, folder: Path) -> list[PlannedRun]:
        cfg = TrainConfig(method="standard")
        return [
            PlannedRun("a", s, cfg, folder / f"r{s}", folder / f"c{s}.yaml", folder / f"{s}.log")
            for s in range(n)
        ]

    here, cluster = Recorder(True), Recorder(False)
    run_all(planned(3, tmp_path / "a"), jobs=4, threads=2, launcher=here, log=lambda _: None)
    run_all(planned(3, tmp_path / "b"), jobs=4, threads=2, launcher=cluster, log=lambda _: None)
    # 3 runs at once (not 4: there are 3) each take a third; a cluster job has its own GPU
    assert [e[CUDA_MEMORY_FRACTION_ENV] for e in here.envs] == ["0.316667"] * 3
    assert all(
        CUDA_MEMORY_FRACTION_ENV not in e and e["OMP_NUM_THREADS"] == "2" for e in cluster.envs
    )

    # the trainer applies the share on CUDA only, to the GPU's index (torch refuses "cuda")
    applied: list[tuple[float, int]] = []
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d: applied.append((f, d))
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setenv(CUDA_MEMORY_FRACTION_ENV, "0.316667")
    assert cap_cuda_memory(torch.device("cpu")) is None and applied == []
    assert cap_cuda_memory(torch.device("cuda", 1)) == pytest.approx(0.316667)
    assert cap_cuda_memory(torch.device("cuda")) == pytest.approx(0.316667)
    assert applied == [(pytest.approx(0.316667), 1), (pytest.approx(0.316667), 2)]
    monkeypatch.setenv(CUDA_MEMORY_FRACTION_ENV, "1.5")
    with pytest.raises(AdvfeatError, match=r"in \(0, 1\]"):
        cap_cuda_memory(torch.device("cuda", 0))
    monkeypatch.delenv(CUDA_MEMORY_FRACTION_ENV)
    assert cap_cuda_memory(torch.device("cuda", 0)) is None and len(applied) == 2

    # and the trainer asks for it with its device
    import advfeat.train.trainer as trainer_module

    asked: list[torch.device] = []
    monkeypatch.setattr(trainer_module, "cap_cuda_memory", asked.append)
    cfg = TrainConfig(method="standard", device="cpu", dataset_options={"n_train": 8, "n_test": 8})
    trainer_module.Trainer(cfg, tmp_path / "run")
    assert asked == [torch.device("cpu")]


def test_slurm_options_are_checked_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse_slurm_options(["time=240", "partition=gpu", "mem=32G", "gpus_per_task=1"]) == {
        "time": 240,
        "partition": "gpu",
        "mem": "32G",
        "gpus_per_task": 1,
    }
    with pytest.raises(AdvfeatError, match="did you mean 'partition'") as err:
        parse_slurm_options(["partiton=gpu"])
    assert "\n" not in str(err.value)
    with pytest.raises(AdvfeatError, match="KEY=VALUE"):
        parse_slurm_options(["gpu"])

    out = tmp_path / "cmp"
    base = ["compare", "--methods", "standard", "--seeds", "0", "--out", str(out)]
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    cases = {
        ("--launcher", "slurm", "--slurm", "partiton=gpu"): "unknown --slurm option 'partiton'",
        ("--launcher", "slurm", "--slurm", "partition=gpu"): "needs --slurm time=MINUTES",
        ("--launcher", "slurm", "--slurm", "time=60"): "srun not found",
        ("--slurm", "time=60"): "--slurm needs --launcher slurm",
        ("--launcher", "submitit-local", "--slurm", "mem=4G"): "takes only --slurm time",
    }
    for flags, message in cases.items():
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()

    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    assert main([*base, "--launcher", "slurm", "--slurm", "time=60"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "advfeat[slurm]"' in err and err.count("\n") == 1
    assert not out.exists()


def _same_results(summary: dict[str, Any]) -> dict[str, Any]:
    """compare.json without what differs between two trainings of the same runs: times and
    folders."""
    kept = {k: v for k, v in summary.items() if k not in ("run_folders", "command")}
    kept["metrics"] = [m for m in summary["metrics"] if m != "train_time_s"]
    kept["results"] = {
        arm: {
            **entry,
            "metrics": {m: v for m, v in entry["metrics"].items() if m != "train_time_s"},
        }
        for arm, entry in summary["results"].items()
    }
    return kept


def _run_metrics(folder: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
    metrics = json.loads((folder / "metrics.json").read_text())
    history = [{k: v for k, v in row.items() if "time" not in k} for row in metrics["history"]]
    flat = {k: v for k, v in flatten_metrics(metrics).items() if k != "train_time_s"}
    return flat, history


@pytest.fixture(scope="module")
def process_comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-run comparison trained by the ``process`` launcher."""
    out = tmp_path_factory.mktemp("process") / "cmp"
    assert main(["compare", *PROTOCOL, "--seeds", "0", "1", "--jobs", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_submitit_local_comparison_equals_the_process_one(
    process_comparison: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", *PROTOCOL, "--seeds", "0", "1", "--jobs", "2", "--out", str(out)]
    assert main([*argv, "--launcher", "submitit-local"]) == 0
    jobs = json.loads((out / "compare.json").read_text())
    reference = json.loads((process_comparison / "compare.json").read_text())
    assert jobs["missing"] == [] and jobs["results"]["standard"]["seeds"] == [0, 1]
    assert _same_results(jobs) == _same_results(reference)
    assert list((out / "submitit").glob("*/*_result.pkl"))  # they were submitit jobs


def _trainer_pid(folder: Path, timeout: float = 120) -> int:
    """The ``advfeat train`` process writing into ``folder`` (not its data workers)."""
    end = time.time() + timeout
    while time.time() < end:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if b"advfeat.cli" in cmd and str(folder).encode() in cmd:
                found[int(entry.name)] = ppid
        pids = [pid for pid, ppid in found.items() if ppid not in found]
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise AssertionError(f"no advfeat train process for {folder}")


def _catches_sigterm(pid: int) -> bool:
    """Whether the trainer has set its preemption handlers (it is training)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_requeued_job_resumes_and_ends_with_the_uninterrupted_metrics(
    process_comparison: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    argv = [*PROTOCOL, "--seeds", "1", "--launcher", "submitit-local", "--out", str(out)]
    compare = subprocess.Popen(
        [sys.executable, "-m", "advfeat.cli", "compare", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        trainer = _trainer_pid(out / "runs" / "standard-s1")
        end = time.time() + 120
        while not _catches_sigterm(trainer):
            assert time.time() < end and compare.poll() is None, "the run never started training"
            time.sleep(0.01)
        job = int(Path(f"/proc/{trainer}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(job, signal.SIGUSR2)  # what SLURM sends at the time limit or on preemption
        output, _ = compare.communicate(timeout=300)
    finally:
        if compare.poll() is None:
            compare.kill()
    assert compare.returncode == 0, output
    log = (out / "logs" / "standard-s1.log").read_text()
    assert re.search(r"SIGTERM received: (checkpoint written|epoch 1 finished)", log), log
    submitit_logs = "".join(p.read_text() for p in (out / "submitit").glob("*/*_log.*"))
    assert "Calling checkpoint method" in submitit_logs and "Requeued job" in submitit_logs
    resumed = _run_metrics(out / "runs" / "standard-s1")
    assert resumed == _run_metrics(process_comparison / "runs" / "standard-s1")
