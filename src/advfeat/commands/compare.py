"""``advfeat compare``: several methods (or variants) × several seeds under one protocol."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advfeat.checkpoint import atomic_write_json, atomic_write_text
from advfeat.commands.protocol import add_protocol_arguments, sources_from_args
from advfeat.compare import Arm, PlannedRun, aggregate, collect, markdown, parse_arm, plot, run_all
from advfeat.errors import AdvfeatError
from advfeat.launchers import LAUNCHERS, make_launcher
from advfeat.train.compose import ConfigSources, compose_comparison

__all__ = ["Comparison", "add_parser", "method_arms", "place", "plan", "run", "run_comparison"]


@dataclass(frozen=True)
class Comparison:
    """What ``advfeat compare`` is asked: its arms × seeds on the protocol ``sources`` describe,
    into ``out``, and how its runs are started (``advfeat train``'s default run is one too)."""

    arms: list[Arm]
    seeds: list[int]
    sources: ConfigSources
    out: Path
    baseline: str | None = None
    jobs: int | None = None
    threads: int = 1
    launcher: str = "process"
    slurm: tuple[str, ...] = ()
    runs_from: tuple[str, ...] = ()
    report_only: bool = False


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="train methods × seeds under one protocol; mean ± std and paired differences",
        description="Train every arm (a method, or a variant given by --arm) with every seed "
        "under one protocol (the train flags below; default: the default preset), as many runs "
        "at once as --jobs, each an ordinary `advfeat train` run folder under OUT/runs. "
        "Finished runs are kept and interrupted ones resumed, so the command can be re-run. "
        "Writes OUT/compare.json, OUT/compare.md and OUT/compare.png: per arm the mean ± std "
        "of every metric and the difference to the baseline arm paired by seed with its 95 %% "
        "Student-t interval. Method recipes are not applied: every arm trains under the same "
        "schedule.",
    )
    _add_arguments(p)
    p.set_defaults(handler=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--methods", help="comma-separated methods, one arm each (e.g. standard,alfa,afan)"
    )
    p.add_argument(
        "--arm",
        dest="arms",
        action="append",
        default=[],
        metavar="'LABEL: KEY=VALUE ...'",
        help="an arm with its own config keys, e.g. "
        "--arm 'afan-mean: method=afan method_options.loss_weighting=mean'; {seed} in a value "
        "becomes the run's seed (method_options.init_checkpoint=cmp/runs/standard-s{seed}/"
        "checkpoint.pt)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--baseline", help="the arm differences refer to (default: the first)")
    add_protocol_arguments(p)
    p.add_argument("--out", required=True, help="folder of the comparison")
    p.add_argument(
        "--jobs", type=int, help="runs trained at once (default: CPU cores // --threads)"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="process",
        help="process: runs on this machine (default; --jobs > 1 share its GPU's memory); slurm: "
        "one SLURM job per run through submitit, requeued at its time limit or on preemption; "
        "submitit-local: those jobs on this machine",
    )
    p.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the SLURM jobs (submitit's SlurmExecutor), e.g. --slurm time=240 "
        "(minutes, required) --slurm partition=gpu --slurm gpus_per_task=1 --slurm mem=32G; "
        "cpus_per_task defaults to --threads",
    )
    p.add_argument(
        "--runs-from",
        action="append",
        default=[],
        metavar="DIR",
        help="another comparison folder whose finished runs (DIR/runs/LABEL-sSEED, same "
        "protocol) are used instead of training them again; may be repeated",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the runs finished so far",
    )


def method_arms(methods: Sequence[str]) -> list[Arm]:
    """One arm per method, labelled with its name."""
    return [Arm(m.strip(), {"method": m.strip()}) for m in methods if m.strip()]


def _arms(args: argparse.Namespace) -> list[Arm]:
    arms = method_arms((args.methods or "").split(","))
    arms += [parse_arm(text) for text in args.arms]
    if not arms:
        raise AdvfeatError("give the arms: --methods standard,afan and/or --arm 'LABEL: key=value'")
    labels = [a.label for a in arms]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise AdvfeatError(f"arm labels must be unique, {', '.join(twice)} appears twice")
    return arms


def _runs_folder(folder: Path) -> Path:
    """The ``runs`` folder of a comparison given to ``--runs-from``."""
    if not (folder / "runs").is_dir():
        raise AdvfeatError(
            f"--runs-from {folder}: no comparison there (it has no runs/ folder); give the --out "
            f"folder of an earlier `advfeat compare`"
        )
    return folder / "runs"


def _run_folder(name: str, own: Path, sources: list[Path]) -> Path:
    """Where run ``name`` lives: this comparison's own folder, unless it has not finished there
    and a ``--runs-from`` comparison holds it finished (the first one that does)."""
    if (own / name / "metrics.json").is_file():
        return own / name
    found = [s / name for s in sources if (s / name / "metrics.json").is_file()]
    return found[0] if found else own / name


def comparison_from_args(args: argparse.Namespace) -> Comparison:
    """The :class:`Comparison` that ``advfeat compare``'s flags ask for."""
    return Comparison(
        arms=_arms(args),
        seeds=list(args.seeds),
        sources=sources_from_args(args),
        out=Path(args.out),
        baseline=args.baseline,
        jobs=args.jobs,
        threads=args.threads,
        launcher=args.launcher,
        slurm=tuple(args.slurm),
        runs_from=tuple(args.runs_from),
        report_only=args.report_only,
    )


def plan(args: argparse.Namespace) -> tuple[list[Arm], list[PlannedRun]]:
    """Validate every run's configuration (before anything is written) and place it."""
    return place(comparison_from_args(args))


def place(comparison: Comparison) -> tuple[list[Arm], list[PlannedRun]]:
    """Every run of ``comparison``, its configuration validated and checked as the run checks it
    at its start (before anything is written), in its folder."""
    c = comparison
    if c.threads < 1 or (c.jobs is not None and c.jobs < 1):
        raise AdvfeatError(f"--jobs and --threads must be >= 1, got {c.jobs}, {c.threads}")
    sources = [_runs_folder(Path(d)) for d in c.runs_from]
    trains_here = not c.report_only and c.launcher != "slurm"  # SLURM jobs have their own devices
    names = [f"{arm.label}-s{seed}" for seed in c.seeds for arm in c.arms]
    folders = {name: _run_folder(name, c.out / "runs", sources) for name in names}
    configs = compose_comparison(c.sources, c.arms, c.seeds, check_device=trains_here)
    runs = [
        PlannedRun(
            arm=label,
            seed=seed,
            config=cfg,
            folder=folders[f"{label}-s{seed}"],
            config_file=c.out / "configs" / f"{label}-s{seed}.yaml",
            log_file=c.out / "logs" / f"{label}-s{seed}.log",
        )
        for (label, seed), cfg in configs.items()
    ]
    return c.arms, runs


def run(args: argparse.Namespace) -> int:
    return run_comparison(comparison_from_args(args))


def run_comparison(comparison: Comparison) -> int:
    """Train (or, ``report_only``, only tabulate) every run of ``comparison`` and write its
    tables: OUT/compare.json, OUT/compare.md, OUT/compare.png. Returns 1 when a run failed."""
    c = comparison
    arms, runs = place(c)
    labels = [a.label for a in arms]
    baseline = c.baseline or labels[0]
    if baseline not in labels:
        raise AdvfeatError(f"--baseline {baseline!r} is not an arm ({', '.join(labels)})")
    out = c.out
    failed = []
    borrowed = [r for r in runs if r.folder.parent != out / "runs"]
    if borrowed:
        print(
            f"advfeat compare: {len(borrowed)} finished runs taken from --runs-from "
            f"({', '.join(sorted({str(r.folder.parent.parent) for r in borrowed}))})",
            file=sys.stderr,
        )
    if c.report_only:
        for r in runs:
            r.check_folder()
    else:
        launcher = make_launcher(c.launcher, list(c.slurm), out / "submitit", threads=c.threads)
        jobs = c.jobs or max(1, (os.cpu_count() or 1) // c.threads)
        if c.launcher == "slurm":
            jobs = c.jobs or len(runs)  # the scheduler decides
        results = run_all(runs, jobs=jobs, threads=c.threads, launcher=launcher)
        failed = [r for r in results if r.returncode != 0]
    summary = aggregate(collect(runs), labels, baseline)
    summary["protocol"] = {
        k: v
        for k, v in runs[0].config.to_dict().items()
        if k not in ("method", "method_options", "seed", "progress")
    }
    summary["arm_overrides"] = {a.label: a.overrides for a in arms}
    summary["seeds"] = list(c.seeds)
    summary["command"] = (
        "advfeat " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    )
    summary["run_folders"] = {f"{r.arm}-s{r.seed}": str(r.folder) for r in runs}
    summary["missing"] = [f"{r.arm}-s{r.seed}" for r in runs if not r.finished]
    table = markdown(summary)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", table)
    drawn = plot(summary, out / "compare.png")
    print(table)
    print(
        f"comparison: {out / 'compare.json'}, {out / 'compare.md'}"
        + (f", {out / 'compare.png'}" if drawn else "")
    )
    if summary["missing"]:
        print(f"not finished: {', '.join(summary['missing'])}", file=sys.stderr)
    return 1 if failed else 0
