"""``advfeat compare``: statistics against hand-computed cases, aggregation, and one real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from advfeat.cli import build_parser, main
from advfeat.commands.compare import plan
from advfeat.compare import (
    Comparison,
    PlannedRun,
    aggregate,
    flatten_metrics,
    markdown,
    method_arms,
    parse_arm,
    place,
    run_comparison,
    verdicts,
)
from advfeat.errors import AdvfeatError
from advfeat.seed_stats import paired_difference, student_t_cdf, student_t_ppf, summarize
from advfeat.train.compose import ConfigSources
from advfeat.train.config import TrainConfig

# two-sided 95 % critical values of Student's t (statistical tables)
T_975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 9: 2.2621572, 30: 2.0422725}


@pytest.mark.parametrize(("df", "value"), sorted(T_975.items()))
def test_student_t_quantiles_match_the_tables(df: int, value: float) -> None:
    assert student_t_ppf(0.975, df) == pytest.approx(value, abs=1e-6)
    assert student_t_ppf(0.025, df) == pytest.approx(-value, abs=1e-6)
    assert student_t_cdf(value, df) == pytest.approx(0.975, abs=1e-8)  # 7-digit tables


def test_student_t_cdf_closed_forms() -> None:
    # df = 1 is the Cauchy law, df = 2 has F(t) = 1/2 + t / (2·sqrt(2 + t²))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_paired_difference_by_hand() -> None:
    treatment, baseline = [0.80, 0.835, 0.85], [0.78, 0.81, 0.82]
    d = paired_difference(treatment, baseline)
    # d = (0.02, 0.025, 0.03): mean 0.025, sd 0.005, half-width t(0.975, 2)·0.005/√3
    half = 4.3026527 * 0.005 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(0.025) and d.std == pytest.approx(0.005)
    assert d.low == pytest.approx(0.025 - half) and d.high == pytest.approx(0.025 + half)
    assert d.excludes_zero
    # pairing matters: the same values unpaired would not exclude zero
    noisy = paired_difference([0.80, 0.79, 0.86], [0.78, 0.81, 0.82])
    assert not noisy.excludes_zero
    single = paired_difference([0.9], [0.8])
    assert single.low is None and single.std is None and not single.excludes_zero
    with pytest.raises(AdvfeatError, match="same seeds"):
        paired_difference([0.1, 0.2], [0.1])
    s = summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(math.sqrt(7 / 3))


def test_aggregate_pairs_by_seed_and_tabulates() -> None:
    results = {
        "standard": {0: {"clean_acc": 0.78}, 1: {"clean_acc": 0.81}, 2: {"clean_acc": 0.82}},
        "afan": {0: {"clean_acc": 0.80}, 2: {"clean_acc": 0.85}, 1: {"clean_acc": 0.835}},
        "alfa": {0: {"clean_acc": 0.70}},  # one seed only
    }
    summary = aggregate(results, ["standard", "afan", "alfa"], "standard")
    afan = summary["results"]["afan"]["metrics"]["clean_acc"]
    assert afan["mean"] == pytest.approx(0.82833333) and afan["n"] == 3
    diff = afan["diff_vs_baseline"]
    assert diff["mean"] == pytest.approx(0.025) and diff["seeds"] == [0, 1, 2]
    half = 4.3026527 * 0.005 / math.sqrt(3)
    assert diff["ci95"] == pytest.approx([0.025 - half, 0.025 + half])
    alfa = summary["results"]["alfa"]["metrics"]["clean_acc"]
    assert alfa["std"] is None and alfa["diff_vs_baseline"]["ci95"] is None
    assert "diff_vs_baseline" not in summary["results"]["standard"]["metrics"]["clean_acc"]
    table = markdown(summary)
    assert "| afan | 3 | 82.83 ± 2.57 |" in table
    assert f"**+2.50 [{100 * (0.025 - half):+.2f}, {100 * (0.025 + half):+.2f}]**" in table
    assert "| alfa | 1 | -8.00 |" in table


def test_verdicts_end_with_one_plain_sentence() -> None:
    standard = {0: {"clean_acc": 0.78}, 1: {"clean_acc": 0.81}, 2: {"clean_acc": 0.82}}
    ahead = {
        s: {"clean_acc": v["clean_acc"] + d}
        for (s, v), d in zip(standard.items(), (0.02, 0.025, 0.03), strict=True)
    }
    mixed = {
        s: {"clean_acc": v["clean_acc"] + d}
        for (s, v), d in zip(standard.items(), (0.02, -0.03, 0.01), strict=True)
    }
    summary = aggregate(
        {"standard": standard, "afan": ahead, "alfa": mixed},
        ["standard", "afan", "alfa"],
        "standard",
    )
    lines = verdicts(summary)
    assert lines[0].endswith("better than standard") and "no difference shown" in lines[1]
    assert lines[-1] == "In short: better than standard: afan (clean_acc)."
    summary = aggregate({"standard": standard, "alfa": mixed}, ["standard", "alfa"], "standard")
    assert (
        verdicts(summary)[-1] == "In short: no arm beats standard on clean_acc at this noise level."
    )
    one_seed = aggregate(
        {"standard": {0: {"clean_acc": 0.8}}, "afan": {0: {"clean_acc": 0.9}}},
        ["standard", "afan"],
        "standard",
    )
    assert not any("In short" in line for line in verdicts(one_seed))  # no spread, no verdict


def test_flatten_metrics_reads_shifted_domains_and_their_mean() -> None:
    flat = flatten_metrics(
        {
            "clean_acc": 0.9,
            "train_time_s": 12.0,
            "shifted_acc": {"fog": 0.5, "noise": 0.7},
            "method": "afan",
            "suites": {
                "attacks": {"pgd": {"accuracy": 0.1}, "eps": [8]},
                "shift": {"domains": {"advbn": {"accuracy": 0.3}}},
            },
        }
    )
    assert flat == {
        "clean_acc": 0.9,
        "train_time_s": 12.0,
        "shifted_acc/fog": 0.5,
        "shifted_acc/noise": 0.7,
        "shifted_acc/mean": pytest.approx(0.6),
        "robust/pgd": 0.1,
        "shifted_acc/advbn": 0.3,
    }


def test_flatten_metrics_gives_one_metric_per_budget_of_an_eps_curve() -> None:
    curve = {"eps_255": [0.0, 4.0, 0.5], "accuracy": [0.9, 0.4, 0.8], "steps": 20}
    flat = flatten_metrics({"suites": {"attacks": {"curve": curve}}})
    assert flat == {
        "robust/curve@0/255": 0.9,
        "robust/curve@4/255": 0.4,
        "robust/curve@0.5/255": 0.8,
    }


def test_arm_syntax_and_errors() -> None:
    arm = parse_arm("afan-mean: method=afan method_options.loss_weighting=mean")
    assert arm.label == "afan-mean"
    assert arm.overrides == {"method": "afan", "method_options.loss_weighting": "mean"}
    for bad in ("afan", "a b: method=afan", "x:", "x/y: method=afan"):
        with pytest.raises(AdvfeatError, match=r"--arm|sets no"):
            parse_arm(bad)


def test_arm_values_name_the_seed_of_their_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arm = parse_arm("ft: method=advbn method_options.init_checkpoint=runs/std-s{seed}/ck.pt")
    assert arm.for_seed(2) == {
        "method": "advbn",
        "method_options.init_checkpoint": "runs/std-s2/ck.pt",
    }
    # every seed's own checkpoint is checked before anything is written: seed 1's is missing
    (tmp_path / "s0.pt").write_bytes(b"")
    out = tmp_path / "cmp"
    ft = f"ft: method=advbn method_options.init_checkpoint={tmp_path}/s{{seed}}.pt"
    assert main(["compare", "--arm", ft, "--seeds", "0", "1", "--out", str(out)]) == 2
    assert "s1.pt' does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_run_is_resumed_and_another_protocol_refused(tmp_path: Path) -> None:
    cfg = TrainConfig(method="standard", epochs=2)
    run = PlannedRun("standard", 0, cfg, tmp_path / "r", tmp_path / "c.yaml", tmp_path / "l.log")
    assert run.command()[-1] == "--auto-resume" and not run.interrupted
    run.folder.mkdir()
    (run.folder / "checkpoint.pt").write_bytes(b"x")
    assert run.interrupted and not run.finished
    (run.folder / "config.yaml").write_text("method: standard\nepochs: 5\n")
    with pytest.raises(AdvfeatError, match=r"another protocol.*epochs"):
        run.check_folder()


def test_bad_input_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert (
        main(["compare", "--methods", "standard,afan", "--out", str(out), "--set", "epochs=0"]) == 2
    )
    assert main(["compare", "--out", str(out)]) == 2
    assert main(["compare", "--methods", "standard,standard", "--out", str(out)]) == 2
    assert main(["compare", "--methods", "standard", "--seeds", "0", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "epochs" in err and "appears twice" in err
    assert not out.exists()


@pytest.mark.slow
def test_compare_end_to_end_matches_the_run_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare", "--methods", "standard", "--arm", "afan-mean: method=afan "
        "method_options.loss_weighting=mean", "--seeds", "0", "1", "--epochs", "1",
        "--set", "dataset_options.n_train=64", "--set", "dataset_options.n_test=32",
        "--set", "batch_size=32", "--out", str(out), "--jobs", "2",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["arms"] == ["standard", "afan-mean"] and summary["missing"] == []
    assert (out / "compare.md").read_text() in capsys.readouterr().out
    for arm in ("standard", "afan-mean"):
        values = summary["results"][arm]["metrics"]["clean_acc"]["values"]
        for seed in (0, 1):
            run = json.loads((out / "runs" / f"{arm}-s{seed}" / "metrics.json").read_text())
            assert values[str(seed)] == run["clean_acc"] and run["seed"] == seed
    afan = json.loads((out / "runs" / "afan-mean-s0" / "metrics.json").read_text())
    assert afan["method"] == "afan" and afan["config"]["method_options"]["loss_weighting"] == "mean"
    diff = summary["results"]["afan-mean"]["metrics"]["clean_acc"]["diff_vs_baseline"]
    std = summary["results"]["standard"]["metrics"]["clean_acc"]["values"]
    fan = summary["results"]["afan-mean"]["metrics"]["clean_acc"]["values"]
    assert diff["mean"] == pytest.approx((fan["0"] - std["0"] + fan["1"] - std["1"]) / 2)
    # a second call trains nothing and reports the same numbers
    stamp = (out / "runs" / "standard-s0" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "standard-s0" / "metrics.json").stat().st_mtime_ns == stamp
    assert "4 of 4 runs already finished" in capsys.readouterr().err


def test_runs_from_other_comparisons_are_tabulated_and_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compare", "--methods", "standard,afan", "--seeds", "0", "1", "--epochs", "1"]
    _, planned = plan(build_parser().parse_args([*argv, "--out", str(tmp_path / "x")]))
    configs = {f"{r.arm}-s{r.seed}": r.config for r in planned}

    def finished(folder: Path, name: str, acc: float, **changes: object) -> None:
        folder = folder / "runs" / name
        folder.mkdir(parents=True)
        config = {**configs[name].to_dict(), **changes}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / "metrics.json").write_text(json.dumps({"clean_acc": acc}))

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "all"
    finished(a, "standard-s0", 50.0)
    finished(a, "standard-s1", 60.0)
    finished(b, "afan-s0", 70.0)
    finished(b, "afan-s1", 90.0)
    finished(out, "afan-s1", 80.0)  # the comparison's own finished run comes first
    sources = ["--runs-from", str(a), "--runs-from", str(b)]
    assert main([*argv, "--out", str(out), *sources, "--report-only"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["missing"] == []
    assert summary["run_folders"]["afan-s0"] == str(b / "runs" / "afan-s0")
    assert summary["run_folders"]["afan-s1"] == str(out / "runs" / "afan-s1")
    diff = summary["results"]["afan"]["metrics"]["clean_acc"]["diff_vs_baseline"]
    assert diff["mean"] == pytest.approx(((70 - 50) + (80 - 60)) / 2)
    assert "3 finished runs taken from --runs-from" in capsys.readouterr().err
    # a run of another protocol is refused, naming what differs; so is a folder with no runs
    finished(tmp_path / "c", "standard-s0", 55.0, epochs=3)
    other = ["--runs-from", str(tmp_path / "c"), "--report-only"]
    assert main([*argv, "--out", str(tmp_path / "d"), *other]) == 2
    assert main([*argv, "--out", str(tmp_path / "d"), "--runs-from", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "another protocol (epochs: 3 there, 1 now)" in err and "no runs/ folder" in err


def test_a_script_runs_the_same_comparison_as_the_command(tmp_path: Path) -> None:
    """``run_comparison`` lives below the command line: a :class:`Comparison` built in Python
    places the same runs and writes the same table as ``advfeat compare`` does."""
    argv = ["compare", "--methods", "standard,afan", "--seeds", "0", "1", "--epochs", "1"]
    _, planned = plan(build_parser().parse_args([*argv, "--out", str(tmp_path / "cli")]))
    for out in (tmp_path / "cli", tmp_path / "script"):
        for run, acc in zip(planned, (50.0, 70.0, 60.0, 80.0), strict=True):
            folder = out / "runs" / f"{run.arm}-s{run.seed}"
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text(yaml.safe_dump(run.config.to_dict()))
            (folder / "metrics.json").write_text(json.dumps({"clean_acc": acc}))
    assert main([*argv, "--out", str(tmp_path / "cli"), "--report-only"]) == 0
    comparison = Comparison(
        arms=method_arms(["standard", "afan"]),
        seeds=[0, 1],
        sources=ConfigSources(flags={"epochs": 1}),
        out=tmp_path / "script",
        report_only=True,
    )
    assert [(r.arm, r.seed, r.config) for r in place(comparison)[1]] == [
        (r.arm, r.seed, r.config) for r in planned
    ]
    assert run_comparison(comparison) == 0
    cli, script = (
        json.loads((tmp_path / d / "compare.json").read_text()) for d in ("cli", "script")
    )
    assert script["results"] == cli["results"] and script["protocol"] == cli["protocol"]
    diff = script["results"]["afan"]["metrics"]["clean_acc"]["diff_vs_baseline"]
    assert diff["mean"] == pytest.approx(((70 - 50) + (80 - 60)) / 2)
