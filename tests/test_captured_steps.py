"""Training steps captured as one CUDA graph (``cuda_graph``): the capture machinery, the rules
for which runs are captured, and on the CPU a backend that "replays" by running the step again,
which checks everything a graph relies on except the graph itself: the step reads nothing from
the device, writes only to tensors that outlive it (in place), follows the schedule through
tensor learning rates, and trains exactly as eager steps do."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from advfeat.bench import run_bench
from advfeat.capture import block_capture, noting_capture_blockers
from advfeat.errors import AdvfeatError
from advfeat.methods import METHODS
from advfeat.methods.registry import build_task_method
from advfeat.tasks import ClassificationTask, DetectionTask
from advfeat.train import Trainer, load_checkpoint
from advfeat.train import trainer as trainer_module
from advfeat.train.graphs import (
    CapturedStep,
    graph_refusal,
    resolve_cuda_graph,
    set_learning_rate,
    use_tensor_learning_rates,
)
from advfeat.train.running import DivergenceWatch, RunningSums
from advfeat.train.trainer import Preempted
from test_train_step_sync import counted_host_reads, tiny_config

CPU = torch.device("cpu")
CAPTURED = (
    *("standard", "alfa", "afan", "pgd-at", "trades", "mart"),
    *("advprop", "fast-advprop", "afa", "advbn"),
)
AFAN_TABLE_2 = {"steps": 5, "alpha": 0.5 / 255, "k": 3}
"""A-FAN's Table 2 options: three separate PGD-5 attacks, one per sampled strength."""
"""The methods whose default step is captured."""


class ReplayByCalling:
    """A graph backend for the CPU: warm-up and capture as on a GPU, and a "replay" that runs
    the step again (which a real graph does without Python)."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.warmed = 0
        self.captures = 0

    def warm(self, run: Callable[[], None]) -> None:
        self.warmed += 1
        run()

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        self.captures += 1
        if self.fail:
            raise RuntimeError(self.fail)
        return run


# ------------------------------------------------------------------------- CapturedStep
def test_warm_up_then_one_capture_then_replays_over_static_inputs() -> None:
    backend = ReplayByCalling()
    seen: list[Tensor] = []
    inputs_ids: set[int] = set()

    def body(x: Tensor) -> None:
        seen.append(x.clone())
        inputs_ids.add(id(x))

    step = CapturedStep(body, backend, warmup=2)
    batches = [torch.full((3,), float(i)) for i in range(5)]
    for b in batches:
        step(b)
    assert backend.warmed == 2 and backend.captures == 1 and step.captured
    # every batch was trained on once, in order, through the one static input tensor
    assert [t.tolist() for t in seen] == [b.tolist() for b in batches]
    assert len(inputs_ids) == 1


def test_a_batch_of_another_shape_is_refused_with_the_fix() -> None:
    step = CapturedStep(lambda x: None, ReplayByCalling(), warmup=1)
    step(torch.zeros(4, 3))
    with pytest.raises(AdvfeatError, match=r"batches of one shape.*drop_last"):
        step(torch.zeros(2, 3))


def test_a_failed_capture_trains_the_batch_eagerly_and_stays_eager() -> None:
    backend = ReplayByCalling(fail="operation not permitted when stream is capturing")
    calls: list[float] = []
    reasons: list[str] = []
    step = CapturedStep(
        lambda x: calls.append(float(x)), backend, warmup=1, on_failure=reasons.append
    )
    for i in range(4):
        step(torch.tensor(float(i)))
    assert calls == [0.0, 1.0, 2.0, 3.0]  # no batch lost
    assert backend.captures == 1 and not step.captured
    assert reasons == ["RuntimeError: operation not permitted when stream is capturing"]


def test_a_required_capture_that_fails_says_what_to_do() -> None:
    step = CapturedStep(lambda x: None, ReplayByCalling(fail="boom"), warmup=1, required=True)
    step(torch.zeros(1))
    with pytest.raises(AdvfeatError, match=r"cuda_graph=true: capturing .* failed .*boom.*auto"):
        step(torch.zeros(1))


# ------------------------------------------------------------------------------- rules
def test_which_runs_are_captured() -> None:
    cuda = torch.device("cuda")
    ok = {"device": cuda, "distributed": False, "compiled": False, "amp_dtype": torch.bfloat16}
    assert graph_refusal(**ok, optimizer="sgd", method_refusal=None) is None
    assert "CUDA device" in str(
        graph_refusal(**{**ok, "device": CPU}, optimizer="sgd", method_refusal=None)
    )
    assert "float16" in str(
        graph_refusal(**{**ok, "amp_dtype": torch.float16}, optimizer="sgd", method_refusal=None)
    )
    assert "SGD" in str(graph_refusal(**ok, optimizer="adamw", method_refusal=None))
    assert graph_refusal(**ok, optimizer="sgd", method_refusal="why") == "why"
    assert resolve_cuda_graph("auto", None) and not resolve_cuda_graph("auto", "why")
    assert not resolve_cuda_graph("false", None)
    with pytest.raises(AdvfeatError, match=r"cuda_graph=true: .*why.*use cuda_graph=auto"):
        resolve_cuda_graph("true", "why")


def test_the_methods_that_say_their_step_can_be_captured() -> None:
    task = ClassificationTask(10)
    capturable = {n for n in METHODS if build_task_method(n, task).capture_refusal() is None}
    assert capturable == set(CAPTURED)
    # A-FAN with separate attacks (Table 2: PGD-5) too: its strengths reach them as tensors
    assert build_task_method("afan", task, **AFAN_TABLE_2).capture_refusal() is None
    assert "detection" in str(build_task_method("alfa", DetectionTask(3)).capture_refusal())
    # what depends on the options: fine-grained AdvProp draws on the CPU, AFA's stage II attacks
    # a batch of varying size
    fine = build_task_method("advprop", task, fine_grained=True).capture_refusal()
    assert "strong augmentation on the CPU" in str(fine)
    afa = build_task_method("afa", task)
    afa.opts.stage = 2
    assert "stage II" in str(afa.capture_refusal())


def test_cuda_graph_true_on_the_cpu_is_one_line_naming_the_reason(tmp_path: Path) -> None:
    with pytest.raises(AdvfeatError, match=r"cuda_graph=true: .*CUDA device, the device is cpu"):
        Trainer(tiny_config(cuda_graph="true"), tmp_path / "run")


def test_the_command_line_refuses_it_with_exit_2(tmp_path: Path, capsys: Any) -> None:
    from advfeat.cli import main

    out = tmp_path / "r"
    code = main(["train", "--method", "standard", "--set", "cuda_graph=true", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda_graph=true" in err[0] and "CUDA device" in err[0]
    assert not out.exists()  # refused before a run folder was made


# ------------------------------------------------------------------- state kept in place
def test_tensor_learning_rates_follow_the_schedule_as_numbers_do() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    use_tensor_learning_rates(opt_b, CPU)
    rate = opt_b.param_groups[0]["lr"]
    x = torch.randn(16, 5)
    for i in range(6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        opt_a.param_groups[0]["lr"] = 0.1 / (i + 2)
        set_learning_rate(opt_b.param_groups[0], 0.1 / (i + 2))
    assert opt_b.param_groups[0]["lr"] is rate  # filled in place, never replaced
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)


def test_sums_and_the_watch_reset_and_update_in_place() -> None:
    sums, watch = RunningSums(CPU), DivergenceWatch(CPU)
    step = torch.zeros((), dtype=torch.int64)
    sums.add({"loss": torch.tensor(2.0)}, weight=3)
    kept = {k: v for k, v in sums.totals.items()}
    steps_t, values_t = watch.steps, watch.values
    for i, loss in enumerate([1.0, float("nan"), float("inf")]):
        step.fill_(i)
        watch.observe(step, torch.tensor(loss), torch.tensor(1.0))
    first = watch.first()
    assert first is not None and (first.what, first.step) == ("loss", 1)
    assert watch.steps is steps_t and watch.values is values_t
    sums.reset({"loss": 5.0})
    watch.reset()
    assert sums.read() == {"loss": 5.0} and watch.first() is None
    assert all(sums.totals[k] is v for k, v in kept.items())


def _state_tensors(trainer: Trainer) -> dict[str, Tensor]:
    """Every tensor a captured step writes to and a later read needs at the same address."""
    state: dict[str, Tensor] = {f"sum:{k}": v for k, v in trainer._sums.totals.items()}
    state.update(watch_steps=trainer._watch.steps, watch_values=trainer._watch.values)
    state.update({f"param:{k}": v for k, v in trainer.model.state_dict(keep_vars=True).items()})
    for i, group in enumerate(trainer.optimizer.param_groups):
        state[f"lr:{i}"] = group["lr"]
        for j, p in enumerate(group["params"]):
            buf = trainer.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                state[f"momentum:{i}.{j}"] = buf
    return state


@pytest.fixture
def replay_by_calling(monkeypatch: pytest.MonkeyPatch) -> list[ReplayByCalling]:
    """Trainers capture on the CPU through :class:`ReplayByCalling` (the list holds them)."""
    backends: list[ReplayByCalling] = []

    def make(device: torch.device) -> ReplayByCalling:
        backends.append(ReplayByCalling())
        return backends[-1]

    monkeypatch.setattr(trainer_module, "CudaGraphs", make)
    monkeypatch.setattr(trainer_module, "run_refusal", lambda cfg, device, refusal, **kw: refusal)
    return backends


@pytest.mark.parametrize(
    ("method", "options"), [*((m, {}) for m in CAPTURED), ("afan", AFAN_TABLE_2)]
)
def test_captured_steps_train_as_eager_steps_do(
    tmp_path: Path, method: str, options: dict[str, Any], replay_by_calling: list[ReplayByCalling]
) -> None:
    """Same seed, same batches: weights, history and metrics of a captured run equal the
    eager run's; the step reads nothing from the device and keeps its state tensors."""
    if method == "advbn":  # it fine-tunes a trained model: a one-epoch standard run's
        Trainer(tiny_config(epochs=1, cuda_graph="false"), tmp_path / "base").fit()
        options = {"init_checkpoint": str(tmp_path / "base" / "checkpoint.pt"), "steps": 2}
        replay_by_calling.clear()
    overrides = {
        "method": method,
        "method_options": options,
        "device_data": "true",
        "max_steps_per_epoch": 5,
    }
    eager = Trainer(tiny_config(**overrides, cuda_graph="false"), tmp_path / "eager")
    eager_metrics = eager.fit()
    graphed = Trainer(tiny_config(**overrides, cuda_graph="true"), tmp_path / "graphed")
    reads: Counter[str] = Counter()
    addresses: list[dict[str, int]] = []
    original = graphed._train_step

    def watched(x: Any, y: Any, step: int, *rest: Any) -> int:
        with counted_host_reads() as counts:
            n = original(x, y, step, *rest)
        reads.update(counts)
        addresses.append({k: v.data_ptr() for k, v in _state_tensors(graphed).items()})
        return n

    graphed._train_step = watched  # type: ignore[method-assign]
    graphed_metrics = graphed.fit()
    assert [b.captures for b in replay_by_calling] == [1, 1]  # one capture per epoch
    assert replay_by_calling[0].warmed == 3 and replay_by_calling[1].warmed == 1
    assert graphed_metrics["steps"] == "captured" and "cuda_graph=false" in eager_metrics["steps"]
    assert reads == Counter()
    # from the first captured step on, every state tensor keeps its address
    assert all(a == addresses[3] for a in addresses[3:])
    for key, value in eager.model.state_dict().items():
        torch.testing.assert_close(graphed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    for row_e, row_g in zip(eager.history, graphed.history, strict=True):
        assert row_g["train_loss"] == pytest.approx(row_e["train_loss"], rel=1e-4)
        assert row_g["lr"] == row_e["lr"]
    assert graphed_metrics["clean_acc"] == pytest.approx(eager_metrics["clean_acc"], abs=1e-9)


def test_a_failed_capture_finishes_the_run_eagerly_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_module, "CudaGraphs", lambda device: ReplayByCalling(fail="sync"))
    monkeypatch.setattr(trainer_module, "run_refusal", lambda *args, **kw: None)
    trainer = Trainer(tiny_config(device_data="true"), tmp_path / "run")
    with pytest.warns(UserWarning, match="could not be captured .*sync.*eager steps"):
        metrics = trainer.fit()
    assert metrics["steps"] == "eager (capture failed: RuntimeError: sync)"
    assert len(trainer.history) == 2


def test_the_bench_times_captured_steps_and_names_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import advfeat.bench as bench_module

    monkeypatch.setattr(bench_module, "graph_backend", lambda device: ReplayByCalling())
    rows = run_bench(
        ["standard", "afan", "pgd-at", "l-alfa"],
        model_name="resnet20",
        batch_size=4,
        image_size=8,
        iters=1,
        warmup=1,
        memory=False,
        cuda_graph=True,
    )
    how = {r.label or r.method: r.steps for r in rows}
    assert how["standard"] == how["afan"] == how["pgd-at"] == "captured"
    assert how["l-alfa"].startswith("eager (method 'l-alfa' is not checked")


def test_a_step_that_says_it_cannot_be_captured_is_never_captured() -> None:
    """Code that cannot run in a graph says so while the warm-up steps run; no capture is
    tried (a failed capture can leave the CUDA random generator unusable)."""
    backend = ReplayByCalling()
    reasons: list[str] = []
    calls: list[int] = []

    def body(x: Tensor) -> None:
        calls.append(1)
        block_capture("reads the RNG state")

    step = CapturedStep(body, backend, warmup=2, on_failure=reasons.append)
    for _ in range(4):
        step(torch.zeros(1))
    assert backend.captures == 0 and len(calls) == 4 and reasons == ["reads the RNG state"]
    required = CapturedStep(body, ReplayByCalling(), warmup=1, required=True)
    with pytest.raises(AdvfeatError, match=r"cuda_graph=true: .*reads the RNG state"):
        required(torch.zeros(1))


def test_replaying_the_random_stream_on_a_gpu_blocks_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from advfeat.tasks.base import RngReplay

    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.zeros(8))
    with noting_capture_blockers() as blockers:
        RngReplay(CPU)
        assert blockers == []
        RngReplay(torch.device("cuda", 0))
    assert len(blockers) == 1 and "random stream" in blockers[0]


def test_a_captured_run_preempted_mid_epoch_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replay_by_calling: list[ReplayByCalling]
) -> None:
    """The checkpoint holds the learning rates as tensors; resuming puts them back on the
    device and the captured steps go on as if never stopped."""

    def config() -> Any:
        return tiny_config(
            method="alfa", device_data="true", cuda_graph="true", max_steps_per_epoch=5
        )

    Trainer(config(), tmp_path / "straight").fit()
    original = Trainer.set_lr
    sent = {"done": False}

    def signal_in_epoch_two(self: Trainer, progress: float, *rest: int) -> float:
        if progress > 1.5 and not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, progress, *rest)

    monkeypatch.setattr(Trainer, "set_lr", signal_in_epoch_two)
    with pytest.raises(Preempted):
        Trainer(config(), tmp_path / "run").fit()
    monkeypatch.setattr(Trainer, "set_lr", original)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(saved["optimizer"]["param_groups"][0]["lr"], Tensor)
    resumed = Trainer(config(), tmp_path / "run", resume=True)
    metrics = resumed.fit()
    assert metrics["steps"] == "captured"
    assert isinstance(resumed.optimizer.param_groups[0]["lr"], Tensor)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    again = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(straight[k], again[k]) for k in straight)
