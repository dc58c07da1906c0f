"""A task registered by a user evaluates with the existing suites, through the runner.

Evaluation takes its task names from the task registry: a registered task's name is a valid
``EvalConfig.task``; a :class:`DenseTask` of one's own follows the dense protocol (batch size 8,
image-space PGD on its loss, its own metric in the report), a :class:`ClassificationTask`
subclass the classifier protocol (the suites that measure class accuracy included); the suites
registered for every task (``clean``, ``attacks``, ``shift``) apply to tasks registered after
them, with no suite edit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from advfeat.errors import AdvfeatError
from advfeat.eval import EvalConfig, EvalData, evaluate
from advfeat.eval.loading import DenseEvalData
from advfeat.eval.report import DENSE_ROBUST_NOTE, ROBUST_ACCURACY_NOTE, summary_rows
from advfeat.eval.suites import SUITES, chosen_suites, register_suite, suite_names
from advfeat.tasks import (
    TASKS,
    ClassificationTask,
    DensePGD,
    DenseTask,
    is_classifier_task,
    register_task,
)
from helpers import TensorPairTask


class PixelMeter:
    """The share of pixels whose predicted class is the target's."""

    def __init__(self) -> None:
        self.hits = self.total = 0

    def update(self, predictions: Tensor, targets: Tensor) -> None:
        self.hits += int((predictions == targets).sum())
        self.total += targets.numel()

    def compute(self) -> dict[str, Any]:
        return {"fg_acc": self.hits / self.total}


class ForegroundTask(TensorPairTask, DenseTask):
    """A dense task of one's own: foreground / background per pixel, scored by pixel accuracy."""

    name = "foreground"
    metrics = ("fg_acc",)
    primary_metric = "fg_acc"

    def output_loss(self, output: Any, y: Any) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(output, y)
        return loss, {"loss_fg": loss}

    def attack_loss(self, output: Any, y: Any) -> Tensor:
        return F.cross_entropy(output, y)

    def default_sites(self, model: nn.Module) -> list[str]:
        return ["0"]

    def predict(self, model: nn.Module, images: Any) -> Any:
        return model.eval()(images).argmax(1)

    def meter(self) -> PixelMeter:
        return PixelMeter()


class SpeciesTask(ClassificationTask):
    """A classification task of one's own (its own name, the classifier's loss and metrics)."""

    name = "species"


@pytest.fixture
def user_tasks() -> Iterator[None]:
    register_task(ForegroundTask)
    register_task(SpeciesTask)
    try:
        yield
    finally:
        TASKS.remove("foreground")
        TASKS.remove("species")


def _segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _pixels(n: int, seed: int) -> TensorDataset:
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(images, (images[:, 0] > 0.5).long())


def _pixel_accuracy(task: DenseTask, model: nn.Module, data: Any, attack: Any = None) -> float:
    loader = DataLoader(data, batch_size=8, collate_fn=task.collate)
    return float(task.evaluate(model, loader, attack=attack)["fg_acc"])


def test_evaluation_takes_its_task_names_from_the_task_registry(user_tasks: None) -> None:
    with pytest.raises(AdvfeatError, match="did you mean 'segmentation'") as err:
        EvalConfig(task="segmentaton").validate()
    assert "known: classification, detection, foreground, segmentation, species" in str(err.value)
    assert "\n" not in str(err.value)
    # the protocol follows the task's class, not its name
    assert [is_classifier_task(t) for t in ("classification", "species", "foreground")] == [
        True,
        True,
        False,
    ]
    assert EvalConfig.for_task("foreground").batch_size == 8  # the dense protocol's
    assert EvalConfig.for_task("species").batch_size == EvalConfig().batch_size == 256
    # suites registered for every task apply to tasks registered later; the suites that
    # measure class accuracy apply to every classifier task
    assert SUITES.get("clean").tasks is None
    assert suite_names("foreground") == suite_names("segmentation") == ("clean", "attacks", "shift")
    assert suite_names("species") == suite_names("classification")
    assert chosen_suites("all", "species") == suite_names("classification")
    with pytest.raises(AdvfeatError, match="'hessian' does not apply to foreground models"):
        chosen_suites("clean,hessian", "foreground")
    with pytest.raises(AdvfeatError, match="tasks must be registered task names"):
        register_suite("user-suite", "never registered", tasks=("foregrund",))
    assert "user-suite" not in SUITES


def test_an_unregistered_task_is_refused_in_one_line() -> None:
    with pytest.raises(AdvfeatError, match="unknown evaluation task 'foreground'") as err:
        EvalConfig.for_task("foreground")
    assert "register_task" in str(err.value) and "\n" not in str(err.value)
    data = DenseEvalData(test=_pixels(4, 0), num_classes=2, task=ForegroundTask(2))
    with pytest.raises(AdvfeatError, match="unknown evaluation task 'foreground'"):
        evaluate(_segmenter(), data, "clean")


def test_a_users_dense_task_runs_clean_attacks_and_shift(user_tasks: None, tmp_path: Path) -> None:
    model, task = _segmenter(), ForegroundTask(2)
    test, dim = _pixels(12, 0), _pixels(8, 1)
    dim = TensorDataset(dim.tensors[0] * 0.5, dim.tensors[1])
    data = DenseEvalData(test=test, num_classes=2, shifted={"dim": dim}, task=task)
    out = tmp_path / "eval.json"
    res = evaluate(model, data, "clean,attacks,shift", pgd_steps=3, out=out, plots=False)
    assert res["data"]["task"] == res["config"]["task"] == "foreground"
    assert res["config"]["batch_size"] == 8
    attacks = res["config"]["suite_options"]["attacks"]
    assert attacks["names"] == ["pgd"] and attacks["eps"] == 8 / 255 and attacks["pgd_steps"] == 3
    suites = res["suites"]
    assert list(suites) == ["clean", "attacks", "shift"]
    # each number is the task's own evaluation (no random start: PGD is deterministic)
    clean = _pixel_accuracy(task, model, test)
    pgd = DensePGD(task, eps=8 / 255, alpha=1 / 255, steps=3)
    robust = _pixel_accuracy(task, model, test, pgd)
    assert suites["clean"]["fg_acc"] == clean and suites["clean"]["n"] == 12
    assert suites["attacks"]["pgd"]["fg_acc"] == robust
    assert suites["attacks"]["pgd"]["clean"] == {"fg_acc": clean}
    assert suites["attacks"]["pgd"]["drop"]["fg_acc"] == pytest.approx(clean - robust)
    assert robust < clean  # the attack ascends the task's loss
    assert suites["shift"]["metric"] == "fg_acc"
    assert suites["shift"]["mean_fg_acc"] == _pixel_accuracy(task, model, dim)
    # the report names the task's own metric
    rows = summary_rows(res)
    assert rows[0] == ["clean fg_acc", f"{100 * clean:.1f} %"]
    assert rows[1] == ["PGD-3 (ε = 8/255, step 1/255) fg_acc", f"{100 * robust:.1f} %"]
    report = out.with_suffix(".md").read_text()
    assert DENSE_ROBUST_NOTE.format(metrics="fg_acc") in report
    assert f"| fg_acc | {100 * clean:.1f} % | {100 * robust:.1f} % |" in report


def test_a_users_classifier_task_evaluates_like_classification(
    user_tasks: None, trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path
) -> None:
    model = copy.deepcopy(trained_tiny_model).eval()
    test = TensorDataset(tiny_task.x_test[:40], tiny_task.y_test[:40])
    shifted = {"dark": TensorDataset(tiny_task.x_test[40:60] * 0.5, tiny_task.y_test[40:60])}
    options = {"attacks": ["pgd", "fgsm"], "pgd_steps": 2, "plots": False}

    def run(task: ClassificationTask, out: Path) -> dict[str, Any]:
        data = EvalData(test=test, num_classes=3, shifted=shifted, task=task)
        assert type(data.task) is type(task) and data.task.num_classes == 3
        return evaluate(model, data, "clean,attacks,shift", out=out, **options)

    own = run(SpeciesTask(), tmp_path / "species.json")
    builtin = run(ClassificationTask(), tmp_path / "classification.json")
    assert own["config"]["task"] == own["data"]["task"] == "species"
    assert own["config"]["batch_size"] == 256  # the classifier protocol
    assert own["suites"] == builtin["suites"]  # the classifier engine, digit for digit
    assert own["suites"]["attacks"]["pgd"]["steps"] == 2 and "fgsm" in own["suites"]["attacks"]
    assert summary_rows(own) == summary_rows(builtin)
    assert ROBUST_ACCURACY_NOTE in (tmp_path / "species.md").read_text()
