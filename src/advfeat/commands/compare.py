"""``advfeat compare``: several methods (or variants) × several seeds under one protocol."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from advfeat.checkpoint import atomic_write_json, atomic_write_text
from advfeat.commands.protocol import add_protocol_arguments, config_from_args
from advfeat.compare import Arm, PlannedRun, aggregate, collect, markdown, parse_arm, plot, run_all
from advfeat.errors import AdvfeatError
from advfeat.launchers import LAUNCHERS, make_launcher
from advfeat.train.build import check_config

__all__ = ["add_parser", "parse", "plan", "run"]


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


def parse(argv: list[str]) -> argparse.Namespace:
    """The namespace of ``advfeat compare ARGV`` (what the default run of ``advfeat train``
    hands :func:`run`)."""
    parser = argparse.ArgumentParser(prog="advfeat compare")
    _add_arguments(parser)
    return parser.parse_args(argv)


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


def _arms(args: argparse.Namespace) -> list[Arm]:
    arms = [
        Arm(m.strip(), {"method": m.strip()}) for m in (args.methods or "").split(",") if m.strip()
    ]
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


def plan(args: argparse.Namespace) -> tuple[list[Arm], list[PlannedRun]]:
    """Validate every run's configuration (before anything is written) and place it."""
    arms = _arms(args)
    if getattr(args, "recipe", None) == "paper" and len(arms) > 1:
        raise AdvfeatError(
            "--recipe paper would train each arm under its own method's schedule; a comparison "
            "trains every arm under one: name the method whose recipe they share (--recipe afan)"
        )
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise AdvfeatError(f"--seeds must be distinct integers >= 0, got {args.seeds}")
    if args.threads < 1 or (args.jobs is not None and args.jobs < 1):
        raise AdvfeatError(f"--jobs and --threads must be >= 1, got {args.jobs}, {args.threads}")
    out = Path(args.out)
    sources = [_runs_folder(Path(d)) for d in args.runs_from]
    runs = []
    trains_here = not args.report_only and getattr(args, "launcher", "process") != "slurm"
    for arm in arms:  # what every run checks at its start, before any run starts
        for seed in args.seeds:
            cfg = config_from_args(args, extra={**arm.for_seed(seed), "seed": seed})
            check_config(cfg, check_device=trains_here)  # SLURM jobs have their own devices
    for seed in args.seeds:
        for arm in arms:
            extra = {**arm.for_seed(seed), "seed": seed, "progress": False}
            cfg = config_from_args(args, extra=extra)
            name = f"{arm.label}-s{seed}"
            runs.append(
                PlannedRun(
                    arm=arm.label,
                    seed=seed,
                    config=cfg,
                    folder=_run_folder(name, out / "runs", sources),
                    config_file=out / "configs" / f"{name}.yaml",
                    log_file=out / "logs" / f"{name}.log",
                )
            )
    return arms, runs


def run(args: argparse.Namespace) -> int:
    arms, runs = plan(args)
    labels = [a.label for a in arms]
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        raise AdvfeatError(f"--baseline {baseline!r} is not an arm ({', '.join(labels)})")
    out = Path(args.out)
    failed = []
    borrowed = [r for r in runs if r.folder.parent != out / "runs"]
    if borrowed:
        print(
            f"advfeat compare: {len(borrowed)} finished runs taken from --runs-from "
            f"({', '.join(sorted({str(r.folder.parent.parent) for r in borrowed}))})",
            file=sys.stderr,
        )
    if args.report_only:
        for r in runs:
            r.check_folder()
    else:
        launcher = make_launcher(args.launcher, args.slurm, out / "submitit", threads=args.threads)
        jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
        if args.launcher == "slurm":
            jobs = args.jobs or len(runs)  # the scheduler decides
        results = run_all(runs, jobs=jobs, threads=args.threads, launcher=launcher)
        failed = [r for r in results if r.returncode != 0]
    summary = aggregate(collect(runs), labels, baseline)
    summary["protocol"] = {
        k: v
        for k, v in runs[0].config.to_dict().items()
        if k not in ("method", "method_options", "seed", "progress")
    }
    summary["arm_overrides"] = {a.label: a.overrides for a in arms}
    summary["seeds"] = list(args.seeds)
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
