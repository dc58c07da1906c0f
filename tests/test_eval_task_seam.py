"""The clean and shift suites evaluate every task through one path (``Task.evaluate`` behind
``task_metrics``): a new task needs no suite edit; the shift result names its headline metric,
and the readers of saved results take both the current and the earlier shift keys."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from advfeat.attacks.pixel import PGD
from advfeat.compare import flatten_metrics
from advfeat.eval import EvalConfig, EvalData
from advfeat.eval.analysis_plots import branch_accuracies
from advfeat.eval.context import EvalContext, PartialStore
from advfeat.eval.report import shift_mean, summary_rows
from advfeat.eval.robust import attack_outcome, summarize
from advfeat.eval.suites import SUITES
from advfeat.eval.suites.metrics import task_metrics
from advfeat.tasks import TASKS, Task, build_task, register_task
from helpers import TensorPairTask


class CountingTask(TensorPairTask, Task):
    """A task no suite knows: its one metric is the share of targets equal to 1."""

    name = "counting"
    metrics = ("share",)
    primary_metric = "share"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.calls: list[dict[str, Any]] = []

    def output_loss(self, output: Any, y: Any) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(output, y)
        return loss, {"loss": loss}

    def attack_loss(self, output: Any, y: Any) -> Tensor:
        return F.cross_entropy(output, y, reduction="sum")

    def default_sites(self, model: nn.Module) -> list[str]:
        return []

    def evaluate(
        self,
        model: nn.Module,
        loader: Any,
        *,
        device: torch.device | str = "cpu",
        attack: Any = None,
        detailed: bool = False,
    ) -> dict[str, Any]:
        ones = total = 0
        for x, y in loader:
            x, y = self.to_device(x, y, torch.device(device))
            ones += int((y == 1).sum())
            total += len(y)
        # a random draw: the unit's seed makes it repeat
        self.calls.append({"detailed": detailed, "draw": float(torch.rand(()))})
        return {"share": ones / total}


@pytest.fixture
def counting() -> Iterator[type[CountingTask]]:
    register_task(CountingTask)
    try:
        yield CountingTask
    finally:
        TASKS.remove("counting")


def _labelled(labels: list[int]) -> TensorDataset:
    return TensorDataset(torch.rand(len(labels), 3, 4, 4), torch.tensor(labels))


def test_clean_and_shift_run_a_new_task_through_its_evaluate(
    counting: type[CountingTask],
) -> None:
    task = build_task("counting", 2)
    assert isinstance(task, CountingTask) and task.eval_metric == "share"
    data = EvalData(
        test=_labelled([1, 0, 1, 1, 0, 1]),
        num_classes=2,
        shifted={"half": _labelled([1, 0, 1, 0]), "none": _labelled([0, 0, 0])},
        task=task,
    )

    def context() -> EvalContext:
        config, cpu = EvalConfig(batch_size=4), torch.device("cpu")
        return EvalContext(nn.Identity(), data, config, device=cpu, store=PartialStore(None, "c"))

    ctx = context()
    before = torch.get_rng_state()
    # the suites' functions (Suite.run also checks the suite's `tasks`: these two apply to every
    # registered task, this one included)
    clean = SUITES.get("clean").fn(ctx)
    shift = SUITES.get("shift").fn(ctx)
    assert torch.equal(torch.get_rng_state(), before)  # each unit forks the global RNG
    assert clean == {"share": 4 / 6, "n": 6, "seed": ctx.seed_for("clean")}
    assert shift == {
        "domains": {
            "half": {"share": 0.5, "n": 4, "seed": ctx.seed_for("shift/half")},
            "none": {"share": 0.0, "n": 3, "seed": ctx.seed_for("shift/none")},
        },
        "metric": "share",
        "mean_share": 0.25,
    }
    assert [c["detailed"] for c in task.calls] == [True, False, False]  # top-5 in clean only
    draws = [c["draw"] for c in task.calls]
    task.calls.clear()
    SUITES.get("clean").fn(context())  # a fresh evaluation: the same draw
    assert task.calls[0]["draw"] == draws[0] and len(set(draws)) == 3
    # the report sections draw the metric by its name, with nothing to add for the new task
    assert SUITES.get("clean").report(clean, "counting")[0] == "share 66.7 % on 6 images."  # type: ignore[misc]
    table = SUITES.get("shift").report(shift, "counting")  # type: ignore[misc]
    assert table[0] == "| domain | share | images |" and table[2] == "| half | 50.0 % | 4 |"


def test_classification_metrics_take_their_evaluation_names(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    """``acc`` (training's name) is ``top1`` in evaluation, without a seed (top-k accuracy in
    eval mode draws nothing); under an attack the task's top-1 is the attack's
    ``attacked_accuracy``, not its robust accuracy (clean and attacked), which is why the
    attacks suite keeps its own engine for classifiers."""
    model = copy.deepcopy(trained_tiny_model).eval()
    dataset = TensorDataset(tiny_task.x_test[:40], tiny_task.y_test[:40])
    data = EvalData(test=dataset, num_classes=3)
    assert data.task.eval_metric == "top1" and data.task.primary_metric == "acc"
    ctx = EvalContext(
        model,
        data,
        EvalConfig(batch_size=16),
        device=torch.device("cpu"),
        store=PartialStore(None, "c"),
    )
    with torch.no_grad():
        expected = int((model(dataset.tensors[0]).argmax(1) == dataset.tensors[1]).sum()) / 40
    assert task_metrics(ctx, dataset, "clean", detailed=True) == {"top1": expected, "n": 40}

    def pgd() -> PGD:
        return PGD(model, eps=8 / 255, alpha=2 / 255, steps=3, seed=7)

    engine = summarize(attack_outcome(ctx, pgd(), dataset, "PGD"))
    attacked = pgd()
    robust = task_metrics(ctx, dataset, "attacks/pgd", lambda m, x, y: attacked(x, y))
    assert robust == {"top1": engine["attacked_accuracy"], "n": 40}
    assert engine["accuracy"] <= min(engine["attacked_accuracy"], engine["clean_accuracy"])


def test_shift_readers_take_current_and_earlier_results() -> None:
    """compare, the analysis plots and the report read ``metric`` / ``mean_<metric>``, and the
    ``accuracy`` / ``mean_accuracy`` of an eval.json written before the suite named its metric."""
    earlier = {"domains": {"advbn": {"accuracy": 0.3, "n": 10}}, "mean_accuracy": 0.3}
    current = {"domains": {"advbn": {"top1": 0.3, "n": 10}}, "metric": "top1", "mean_top1": 0.3}
    for shift in (earlier, current):
        assert flatten_metrics({"suites": {"shift": shift}}) == {"shifted_acc/advbn": 0.3}
        bn = {"suites": {"bn": {"branches": {"clean": {"shift": shift}}}}}
        assert branch_accuracies(bn) == {"clean": {"shifted (mean)": 0.3}}
        assert shift_mean(shift)[1] == 0.3
        rows = summary_rows({"config": {"task": "classification"}, "suites": {"shift": shift}})
        assert rows == [["mean shifted-domain accuracy", "30.0 %"]]
        bn_section = SUITES.get("bn").report(bn["suites"]["bn"], "classification")  # type: ignore[misc]
        assert bn_section[2] == "| clean | – | – | 30.0 % |"
    dense = {
        "domains": {"fog": {"ap": 0.1, "ap50": 0.2, "ap75": 0.0, "n": 4, "seed": 1}},
        "metric": "ap50",
        "mean_ap50": 0.2,
    }
    assert flatten_metrics({"suites": {"shift": dense}}) == {}  # AP is not a class accuracy
    rows = summary_rows({"config": {"task": "detection"}, "suites": {"shift": dense}})
    assert rows == [["mean shifted-domain AP50", "20.0 %"]]
