"""``advfeat eval`` on a checkpoint written by ``advfeat train``: every suite from the command
line, the JSON/Markdown/PNG outputs, resume, and the errors of bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from advfeat.cli import main
from advfeat.eval.context import PARTIAL_FORMAT
from helpers import one_epoch_train_args

DATA = "{n_train: 96, n_test: 32, image_size: 32}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert main(one_epoch_train_args(run, DATA, batch_size=32)) == 0
    return run / "checkpoint.pt"


def _eval(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--quiet", *extra]


SMALL = [
    "--max-images", "16", "--batch-size", "16", "--pgd-steps", "2", "--cw-steps", "3",
    "--corruption-subset", "fog,gaussian_noise", "--severities", "1,5",
    "--corruption-max-images", "4", "--hessian-batches", "1", "--hutchinson-samples", "2",
    "--set", "hessian_batch_size=8", "--set", "hessian_iters=3", "--set", "feature_images=2",
    "--set", "landscape_batches=1", "--set", "landscape_batch_size=8",
    "--set", "landscape_points=3", "--set", "landscape_points_2d=3",
    "--set", "advbn_train_images=16", "--set", "advbn_decoder_epochs=1",
    "--set", "advbn_show_images=2", "--set", "advbn_show_eps=[1.1]",
]  # fmt: skip


def test_every_suite_runs_and_writes_json_report_and_plots(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    assert main(_eval(checkpoint, out, "--suite", "all", *SMALL)) == 0
    printed = capsys.readouterr().out
    assert "clean top-1" in printed and f"results: {out}" in printed
    res = json.loads(out.read_text())
    assert res["format"] == "advfeat-eval/1"
    assert res["run"]["method"] == "standard" and res["run"]["model"] == "resnet20"
    assert res["config"]["suite_options"]["attacks"]["pgd_steps"] == 2 and res["config"][
        "suite_options"
    ]["corruptions"]["severities"] == [1, 5]
    assert res["environment"]["torch"] and "imagecorruptions" in res["environment"]
    suites = res["suites"]
    assert list(suites) == [
        "clean", "attacks", "corruptions", "shift", "bn", "divergence", "hessian", "features",
        "landscape", "advbn",
    ]  # fmt: skip
    clean = suites["clean"]["top1"]
    assert "top5" in suites["clean"]  # shapes has more than five classes
    for name in ("pgd", "fgsm", "cw"):
        assert suites["attacks"][name]["accuracy"] <= clean
    curve = suites["attacks"]["curve"]["accuracy"]
    assert all(b <= a for a, b in itertools.pairwise(curve))
    assert set(suites["shift"]["domains"]) == {"colour", "fog", "noise", "style"}
    assert "skipped" in suites["bn"]  # a standard model has one BN branch
    assert set(suites["divergence"]["pairs"]) == {f"test|{d}" for d in suites["shift"]["domains"]}
    assert suites["hessian"]["parameters"] > 0
    assert suites["landscape"]["1d"]["alpha"] == [-1.0, 0.0, 1.0]
    assert suites["advbn"]["n"] == 16 and (tmp_path / "eval_advbn" / "advbn").is_dir()
    plots = {Path(p).name for p in res["plots"].values()}
    assert plots == {
        "accuracy_vs_eps.png",
        "corruptions.png",
        "divergence.png",
        "advbn_images.png",
        "feature_maps.png",
        "loss_landscape.png",
        "training_curves.png",
    }
    for rel in res["plots"].values():
        assert (out.parent / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = out.with_suffix(".md").read_text()
    for heading in ("## Summary", "## Attacks", "## Corruptions", "## Shifted domains",
                    "## Feature divergence", "## Hessian", "## Plots", "## Configuration"):  # fmt: skip
        assert heading in report


def test_resume_reuses_finished_units(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    args = _eval(checkpoint, out, "--suite", "clean", "--max-images", "8", "--no-plots")
    assert main(args) == 0
    first = json.loads(out.read_text())
    # an interrupted run leaves its partial file behind: fake one holding a finished unit
    partial = out.with_name("e.json.partial")
    fingerprint = first["resume_key"]
    partial.write_text(json.dumps({
        "format": PARTIAL_FORMAT, "fingerprint": fingerprint,
        "units": {"clean": first["suites"]["clean"]},
    }))  # fmt: skip
    assert main([*args, "--resume"]) == 0
    resumed = json.loads(out.read_text())
    assert resumed["reused_units"] == 1 and resumed["suites"] == first["suites"]


def test_partial_results_of_an_earlier_format_are_refused_in_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Format 1 held a classifier's shifted-domain units under ``accuracy``: reusing them would
    mix two formats in one file, so --resume refuses and says how to start again."""
    out = tmp_path / "e.json"
    args = _eval(checkpoint, out, "--suite", "clean", "--max-images", "8", "--no-plots")
    assert main(args) == 0
    old = {"colour": {"accuracy": 0.5, "n": 8}}
    partial = out.with_name("e.json.partial")
    partial.write_text(json.dumps({
        "format": "advfeat-eval-partial/1", "fingerprint": json.loads(out.read_text())["resume_key"],
        "units": {"shift/colour": old["colour"]},
    }))  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another version of advfeat" in err and "--force" in err
    assert partial.is_file()  # the user's partial results are kept


def test_landscape_reference_checkpoint_is_cut_along_the_same_directions(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "land.json"
    args = _eval(checkpoint, out, "--suite", "landscape", "--no-plots", "--no-report")
    args += ["--set", "landscape_batches=1", "--set", "landscape_batch_size=8"]
    args += ["--set", "landscape_points=5", "--set", "landscape_points_2d=0"]
    assert main([*args, "--landscape-reference", str(checkpoint)]) == 0
    land = json.loads(out.read_text())["suites"]["landscape"]
    assert "2d" not in land
    ref = land["reference"]
    assert ref["source"] == str(checkpoint) and ref["run"]["method"] == "standard"
    # the same weights cut with the same seeded directions on the same images: the same curve
    assert ref["1d"]["loss"] == pytest.approx(land["1d"]["loss"], rel=1e-6)
    assert land["1d"]["loss"][2] == pytest.approx(land["1d"]["loss_at_zero"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--suite", "atacks"], "did you mean 'attacks'"),
        (["--model", "resnet32"], "do not fit this architecture"),
        (["--suite", "corruptions", "--severities", "0,3"], "1 to 5"),
        (["--eps", "3"], r"in \[0, 1\]"),
        (["--eps", "eight"], "8/255"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/data"], "CIFAR-10 not found"),
        (["--dataset", "shapez"], "did you mean 'shapes'"),
        (["--autoattack"], "pip install"),
        (["--domain", "x=/nonexistent/folder", "--suite", "shift"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
    request: pytest.FixtureRequest,
) -> None:
    if extra == ["--autoattack"]:
        request.getfixturevalue("no_autoattack")  # as on an install without the extra
    assert main(_eval(checkpoint, tmp_path / "e.json", *extra)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err


def test_missing_checkpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_eval(tmp_path / "none.pt", tmp_path / "e.json")) == 2
    assert "does not exist" in capsys.readouterr().err
