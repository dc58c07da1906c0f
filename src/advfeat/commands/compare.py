"""``advfeat compare``: several methods (or variants) × several seeds under one protocol."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from advfeat.commands.protocol import add_protocol_arguments, sources_from_args
from advfeat.compare import (
    Arm,
    Comparison,
    PlannedRun,
    method_arms,
    parse_arm,
    place,
    run_comparison,
)
from advfeat.errors import AdvfeatError
from advfeat.launchers import LAUNCHERS

__all__ = ["add_parser", "plan", "run"]


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


def run(args: argparse.Namespace) -> int:
    return run_comparison(comparison_from_args(args))
