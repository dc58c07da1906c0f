"""``advfeat eval`` on detection and segmentation runs: AP / mIoU clean, under A-FAN's PGD-10 and
on shifted domains; equality with the task's own evaluation, flags restored, determinism, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.eval import EvalConfig, evaluate, load_run
from advfeat.eval.context import EvalContext, PartialStore, seeded_subset
from advfeat.eval.loading import DenseEvalData, LoadedRun, eval_data
from advfeat.eval.report import markdown_report
from advfeat.eval.suites import SUITES, ordered_suites
from advfeat.tasks import DensePGD

SEGMENTATION = [
    "--dataset", "shapes-seg", "--model", "deeplabv3plus_tiny", "--epochs", "4", "--lr", "0.05",
    "--set", "schedule=poly",
    "--set", "dataset_options={n_train: 256, n_test: 16, image_size: 32, max_objects: 1}",
]  # fmt: skip
DETECTION = [
    "--dataset", "shapes-det", "--model", "fasterrcnn_tiny", "--epochs", "1", "--lr", "0.02",
    "--set", "dataset_options={n_train: 16, n_test: 8, image_size: 48, max_objects: 1}",
]  # fmt: skip
SCALARS = {"segmentation": ("miou", "pixel_acc"), "detection": ("ap", "ap50", "ap75")}


def _train(out: Path, setup: list[str]) -> Path:
    args = [
        "train", "--method", "standard", "--batch-size", "8", "--seed", "0", "--device", "cpu",
        "--out", str(out), "--quiet", "--set", "eval_batch_size=8", *setup,
    ]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("seg") / "run", SEGMENTATION)


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torchmetrics", reason="detection metrics need advfeat[detection]")
    pytest.importorskip("pycocotools", reason="detection metrics need advfeat[detection]")
    return _train(tmp_path_factory.mktemp("det") / "run", DETECTION)


@pytest.fixture(scope="module")
def seg_loaded(seg_run: Path) -> LoadedRun:
    return load_run(seg_run / "checkpoint.pt")


def _cli_eval(run: Path, *extra: str) -> dict[str, Any]:
    out = run / "eval.json"
    args = ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--quiet"]
    # --force: each test re-evaluates the shared run into the same file
    assert main([*args, "--no-plots", "--force", *extra]) == 0
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["segmentation", "detection"])
def test_cli_evaluates_a_dense_run_like_the_trainer(kind: str, request: Any) -> None:
    run: Path = request.getfixturevalue("seg_run" if kind == "segmentation" else "det_run")
    res = _cli_eval(run, "--suite", "all")
    trained = json.loads((run / "metrics.json").read_text())
    suites = res["suites"]
    assert list(suites) == ["clean", "attacks", "shift"]  # 'all' = every dense suite
    assert res["data"]["task"] == res["config"]["task"] == kind
    for key in SCALARS[kind]:  # the same numbers as the trainer's own evaluation
        assert suites["clean"][key] == pytest.approx(trained[f"clean_{key}"], abs=1e-9)
        pgd = suites["attacks"]["pgd"]
        assert pgd[key] <= suites["clean"][key] + 1e-9
        assert pgd["drop"][key] == pytest.approx(suites["clean"][key] - pgd[key])
    eps, alpha = (8 / 255, 1 / 255) if kind == "segmentation" else (2 / 255, 0.3 / 255)
    cfg = res["config"]["suite_options"]["attacks"]
    assert (cfg["eps"], cfg["pgd_alpha"], cfg["pgd_steps"]) == pytest.approx((eps, alpha, 10))
    primary = "miou" if kind == "segmentation" else "ap50"
    domains = suites["shift"]["domains"]
    assert set(domains) == set(trained[f"shifted_{primary}"]) == {"colour", "fog", "noise", "style"}
    for name, value in trained[f"shifted_{primary}"].items():
        assert domains[name][primary] == pytest.approx(value, abs=1e-9)
    mean = sum(d[primary] for d in domains.values()) / 4
    assert suites["shift"][f"mean_{primary}"] == pytest.approx(mean)
    report = (run / "eval.md").read_text()
    assert "## Attacks" in report and ("| mIoU |" in report or "| AP50 |" in report)


def test_eps_and_steps_override_the_protocol(seg_run: Path) -> None:
    res = _cli_eval(seg_run, "--suite", "attacks", "--eps", "2/255", "--pgd-steps", "2")
    pgd = res["suites"]["attacks"]["pgd"]
    assert (pgd["eps"], pgd["alpha"], pgd["steps"]) == pytest.approx((2 / 255, 1 / 255, 2))


def _flags(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_numbers_equal_task_evaluate_flags_restored_and_deterministic(
    seg_loaded: LoadedRun,
) -> None:
    model, task = seg_loaded.model, seg_loaded.task
    assert task is not None
    model.train()
    model.get_submodule("decoder").eval()  # a mixed state must come back as it was
    flags = _flags(model)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    options: dict[str, Any] = {"max_images": 8, "batch_size": 4, "eps": 4 / 255, "pgd_steps": 3}
    res = evaluate(model, seg_loaded.data, "clean,attacks", task=task, **options)
    assert _flags(model) == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert torch.equal(torch.get_rng_state(), rng)

    subset = seeded_subset(seg_loaded.data.test, 8, 0)
    loader = DataLoader(subset, batch_size=4, collate_fn=task.collate)
    clean, pgd = res["suites"]["clean"], res["suites"]["attacks"]["pgd"]
    direct = task.evaluate(model, loader)
    assert clean["n"] == 8
    assert (clean["miou"], clean["pixel_acc"]) == (direct["miou"], direct["pixel_acc"])
    attack = DensePGD(task, eps=4 / 255, alpha=1 / 255, steps=3)
    with torch.random.fork_rng():
        torch.manual_seed(pgd["seed"])
        robust = task.evaluate(model, loader, attack=attack)
    assert (pgd["miou"], pgd["pixel_acc"]) == (robust["miou"], robust["pixel_acc"])
    assert pgd["pixel_acc"] < clean["pixel_acc"]  # 4/255 hurts a trained segmenter

    model.eval()
    again = evaluate(model, seg_loaded.data, "clean,attacks", task=task, **options)
    assert again["suites"] == res["suites"]


def test_dense_suites_that_do_not_apply_are_clear_errors(
    seg_loaded: LoadedRun, seg_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = seg_loaded.model, seg_loaded.data
    for suites, needle in (
        ("clean,hessian", "'hessian' does not apply to segmentation"),
        ("corruptions", "segmentation suites: clean, attacks, shift"),
        ("cleen", "did you mean 'clean'"),
    ):
        with pytest.raises(AdvfeatError, match=needle):
            evaluate(model, data, suites, max_images=2)
    with pytest.raises(AdvfeatError, match="segmentation attacks: pgd"):
        evaluate(model, data, "attacks", attacks=["pgd", "fgsm"], max_images=2)
    with pytest.raises(AdvfeatError, match="classification models only"):
        evaluate(model, data, "attacks", surrogate=model, max_images=2)
    ctx = EvalContext(
        model,
        eval_data(data, seg_loaded.task),
        EvalConfig.for_task("segmentation"),
        device=torch.device("cpu"),
        store=PartialStore(None, ""),
    )
    for name in ("hessian", "divergence", "features", "bn", "corruptions"):
        with pytest.raises(AdvfeatError, match="does not apply to segmentation"):
            SUITES.get(name).run(ctx)  # never a number computed from the wrong quantity
    with pytest.raises(AdvfeatError, match="needs task="):
        DenseEvalData(test=data.test, num_classes=data.num_classes)
    checkpoint = str(seg_run / "checkpoint.pt")
    out = str(seg_run / "bad.json")
    assert main(["eval", "--checkpoint", checkpoint, "--out", out, "--suite", "hessian"]) == 2
    assert "does not apply to segmentation" in capsys.readouterr().err
    assert not Path(out).exists()


def test_report_of_saved_results_names_dense_metrics(seg_loaded: LoadedRun) -> None:
    res = evaluate(seg_loaded.model, seg_loaded.data, "clean,attacks", max_images=4, pgd_steps=1)
    text = markdown_report(res, ordered_suites())
    assert "| clean mIoU |" in text and "PGD-1 (ε = 8/255, step 1/255) mIoU" in text
    assert "Robust accuracy counts" not in text  # the classification note does not apply
    assert all(math.isfinite(v) for v in res["suites"]["attacks"]["pgd"]["drop"].values())
