"""A training step never waits for the device: metrics are summed and divergence is watched on
the device and read once per epoch, with the same history and the same guarantees as reading
every step."""

from __future__ import annotations

import math
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from advfeat.attacks import PGD, FeaturePGD
from advfeat.attacks import engine as engine_module
from advfeat.attacks.base import deferred_finite_checks
from advfeat.errors import AdvfeatError
from advfeat.methods import MethodOutput
from advfeat.methods.base import Method
from advfeat.train import TrainConfig, Trainer, TrainingDiverged, load_checkpoint
from advfeat.train.running import DivergenceWatch, RunningSums
from helpers import tiny_train_config

CPU = torch.device("cpu")
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")
"""The ways a tensor's value reaches Python: each waits for the device."""


def tiny_config(**overrides: object) -> TrainConfig:
    """2 epochs of at most 3 steps of 16 on 96 images."""
    schedule = dict(epochs=2, batch_size=16, eval_batch_size=32, lr=0.05, max_steps_per_epoch=3)
    return tiny_train_config(n_train=96, n_test=32, **(schedule | overrides))


def record_steps(
    trainer: Trainer, change: Callable[[int, MethodOutput], None] | None = None
) -> list[dict[str, Any]]:
    """Wrap the method's forward: note each step's loss, hits, logs and batch size as floats
    read right away (the old per-step reading); ``change(step, out)`` may alter the output."""
    steps: list[dict[str, Any]] = []
    forward = trainer.method.forward

    def recorded(model: Any, x: Tensor, y: Tensor) -> MethodOutput:
        out = forward(model, x, y)
        if change is not None:
            change(len(steps), out)
        hits = None if out.logits is None else int((out.logits.argmax(1) == y).sum())
        steps.append(
            {"loss": float(out.loss.detach()), "hits": hits, "logs": out.logs, "n": len(y)}
        )
        return out

    trainer.method.forward = recorded  # type: ignore[method-assign]
    return steps


@pytest.mark.parametrize("method", ["standard", "alfa"])
def test_history_is_the_per_step_values_averaged_over_images(tmp_path: Path, method: str) -> None:
    trainer = Trainer(tiny_config(method=method), tmp_path / "run")
    steps = record_steps(trainer)
    history = trainer.fit()["history"]
    per_epoch = [steps[:3], steps[3:6]]
    assert len(steps) == 6 and len(history) == 2
    for row, epoch in zip(history, per_epoch, strict=True):
        images = sum(s["n"] for s in epoch)
        loss = math.fsum(s["loss"] * s["n"] for s in epoch) / images
        assert row["train_loss"] == pytest.approx(loss, rel=1e-12, abs=0)
        assert row["train_acc"] == sum(s["hits"] for s in epoch) / images
        logged = {k for s in epoch for k in s["logs"]}
        assert logged and logged <= set(row)
        for key in logged:
            mean = math.fsum(s["logs"][key] * s["n"] for s in epoch) / images
            assert row[key] == pytest.approx(mean, rel=1e-12, abs=1e-15), key


@contextmanager
def counted_host_reads() -> Iterator[Counter[str]]:
    """Count every tensor value read into Python inside the block."""
    counts: Counter[str] = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str, read: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return read(self, *args, **kwargs)

        return counted

    for name, read in saved.items():
        setattr(torch.Tensor, name, counting(name, read))
    try:
        yield counts
    finally:
        for name, read in saved.items():
            setattr(torch.Tensor, name, read)


@pytest.mark.parametrize("method", ["standard", "alfa", "fast-advprop"])
def test_a_training_step_reads_nothing_from_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Batch cut on the device, forward (with the feature attack), backward, update, metrics and
    divergence watch: not one tensor value is read into Python."""
    reads: Counter[str] = Counter()
    original = Trainer._train_step

    def watched_step(self: Trainer, *args: Any) -> int:
        with counted_host_reads() as counts:
            n = original(self, *args)
        reads.update(counts)
        return n

    monkeypatch.setattr(Trainer, "_train_step", watched_step)
    Trainer(tiny_config(method=method, device_data="true"), tmp_path / "run").fit()
    assert reads == Counter()


def test_the_sums_are_read_once_per_epoch_and_every_n_steps_with_the_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = []
    original = RunningSums.read

    def counted(self: RunningSums) -> dict[str, float]:
        reads.append(1)
        return original(self)

    monkeypatch.setattr(RunningSums, "read", counted)
    Trainer(tiny_config(), tmp_path / "quiet").fit()
    assert len(reads) == 2  # two epochs, no bar: once at each epoch's end
    reads.clear()
    monkeypatch.setattr("advfeat.train.trainer.PROGRESS_EVERY", 2)
    Trainer(tiny_config(progress=True), tmp_path / "bar").fit()
    assert len(reads) == 2 * 3  # steps 1 and 3 of 3 for the bar, then the epoch's end


def test_running_sums_match_float_accumulation() -> None:
    values = torch.rand(50, generator=torch.Generator().manual_seed(0)) * 3
    sums = RunningSums(CPU, {"resumed": 2.5})
    expected = 0.0
    for i, v in enumerate(values):
        sums.add({"loss": v, "count": 1.5}, weight=i + 1)
        sums.add({"hits": torch.tensor(i)})
        expected += float(v) * (i + 1)
    read = sums.read()
    assert list(read) == ["resumed", "loss", "count", "hits"]
    assert read["loss"] == pytest.approx(expected, rel=1e-14)
    assert read["count"] == 1.5 * sum(range(1, 51)) and read["hits"] == sum(range(50))
    assert read["resumed"] == 2.5


def test_the_divergence_watch_reports_the_first_non_finite_step() -> None:
    watch = DivergenceWatch(CPU)
    finite = torch.tensor(1.0)
    watch.observe(0, finite, finite)
    assert watch.first() is None
    watch.observe(1, finite, torch.tensor(math.inf))
    watch.observe(2, torch.tensor(math.nan), torch.tensor(math.nan))
    first = watch.first()
    assert first is not None and (first.what, first.step, first.value) == ("weights", 1, math.inf)
    both = DivergenceWatch(CPU)
    both.observe(4, torch.tensor(-math.inf), torch.tensor(math.nan))  # same step: the loss
    first = both.first()
    assert first is not None and (first.what, first.step, first.value) == ("loss", 4, -math.inf)


def poison_at(step: int) -> Callable[[int, MethodOutput], None]:
    def change(index: int, out: MethodOutput) -> None:
        if index == step:
            out.loss = out.loss * float("nan")

    return change


def assert_only_finite_epoch_one_kept(run: Path) -> None:
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 0 and "partial" not in state
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (run / "metrics.json").exists()


def test_a_non_finite_loss_mid_epoch_names_its_step_and_is_never_checkpointed(
    tmp_path: Path,
) -> None:
    trainer = Trainer(tiny_config(epochs=3), tmp_path / "run")
    record_steps(trainer, poison_at(4))  # epoch 2, step 2
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 2; .*kept"):
        trainer.fit()
    assert_only_finite_epoch_one_kept(tmp_path / "run")


def test_preemption_after_a_non_finite_step_writes_no_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(epochs=3), tmp_path / "run")

    def poison_then_preempt(index: int, out: MethodOutput) -> None:
        poison_at(3)(index, out)
        if index == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # checkpoint asked for after this step

    record_steps(trainer, poison_then_preempt)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1"):
        trainer.fit()
    assert_only_finite_epoch_one_kept(tmp_path / "run")


def test_a_failure_after_a_non_finite_step_reports_the_divergence(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(epochs=3), tmp_path / "run")

    def poison_then_fail(index: int, out: MethodOutput) -> None:
        poison_at(3)(index, out)
        if index == 4:
            raise AdvfeatError("an attack met the NaN weights")

    record_steps(trainer, poison_then_fail)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1") as diverged:
        trainer.fit()
    assert isinstance(diverged.value.__context__, AdvfeatError)
    assert_only_finite_epoch_one_kept(tmp_path / "run")


def test_attack_step_sizes_and_radii_are_built_once_per_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = []
    original = engine_module.as_batch_eps

    def counted(value: Any, like: Tensor) -> Tensor:
        built.append(value)
        return original(value, like)

    monkeypatch.setattr(engine_module, "as_batch_eps", counted)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    x_adv = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, seed=0)(x, y)
    assert len(built) == 2  # α and ε, not 2 per step
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)


def test_inside_deferred_checks_a_feature_attack_leaves_finiteness_to_the_caller(
    make_tiny_bn_cnn: Callable[..., torch.nn.Module],
) -> None:
    model = make_tiny_bn_cnn()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    nan_tail = FeaturePGD(
        model, "block1", alpha=0.1, eps=1.0, norm="l2", tail=lambda t: t.flatten(1) * math.nan
    )
    feature = torch.rand(4, 8, 8, 8)
    with pytest.raises(AdvfeatError, match="non-finite"):
        nan_tail(x, y, feature=feature)
    with deferred_finite_checks():
        delta = nan_tail(x, y, feature=feature)
    assert not torch.isfinite(delta).all()  # a NaN loss follows: the trainer's watch stops it
    with pytest.raises(AdvfeatError, match="non-finite"):  # the block ended: checked again
        nan_tail(x, y, feature=feature)


def test_method_logs_stay_on_the_device_until_read() -> None:
    loss = torch.tensor(0.25, requires_grad=True) * 2
    out = MethodOutput(loss=loss, logs=Method.detach_logs(loss_clean=loss, fraction=1))
    value = out.log_values["loss_clean"]
    assert isinstance(value, Tensor) and not value.requires_grad
    assert out.log_values["fraction"] == 1.0
    assert out.logs == {"loss_clean": 0.5, "fraction": 1.0}
    assert all(type(v) is float for v in out.logs.values())
