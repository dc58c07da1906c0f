"""``advfeat train``: one run, or with no ``--method`` the default preset side by side."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from advfeat import compare
from advfeat.commands.protocol import add_protocol_arguments, sources_from_args
from advfeat.train.compose import DEFAULT_METHODS, DEFAULT_SEEDS, TrainingPlan, plan_training

__all__ = ["DEFAULT_METHODS", "DEFAULT_SEEDS", "add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the default preset on the embedded dataset)",
        description="Train a model with one of the methods. With no arguments, trains the default "
        "preset (" + ", ".join(DEFAULT_METHODS) + ") on the embedded `shapes` dataset offline "
        "and prints a result table.",
    )
    p.add_argument("--method", help="training method (see `advfeat methods`)")
    add_protocol_arguments(p)
    p.add_argument("--seed", type=int, help="random seed (data, initialisation, order)")
    p.add_argument("--out", help="run folder (default: runs/<method>-<model>-<dataset>-s<seed>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out as it was saved (no other flags needed; flags that "
        "change the result are refused)",
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="for re-queued jobs: resume when --out holds a checkpoint, start fresh otherwise, "
        "and exit 0 at once when the run there is finished",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="discard the run in --out (finished or interrupted) and start again",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument(
        "--show-config", action="store_true", help="print the resolved configuration and exit"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    sources = sources_from_args(args)
    plan = plan_training(
        sources,
        method=args.method,
        out=args.out,
        resume=args.resume,
        auto_resume=args.auto_resume,
        show_config=args.show_config,
    )
    if plan.comparison:
        return compare.run_comparison(_default_comparison(plan))
    if args.show_config:
        for planned in plan.runs:
            print(yaml.safe_dump(planned.config.to_dict(), sort_keys=False))
        return 0
    return _train(plan, force=args.force)


def _default_comparison(plan: TrainingPlan) -> compare.Comparison:
    """The default run: :data:`DEFAULT_METHODS` × :data:`DEFAULT_SEEDS` (or ``--seed``) on the
    default preset, as ``advfeat compare`` runs it, into ``--out`` (default ``runs/default``)."""
    arms = compare.method_arms(plan.comparison)
    return compare.Comparison(arms, plan.seeds, plan.sources, plan.folder)


def _train(plan: TrainingPlan, *, force: bool) -> int:
    """Train the planned runs one after the other and print their result table."""
    from advfeat.train.trainer import Trainer

    results = []
    for planned in plan.runs:
        cfg, out = planned.config, planned.folder
        if planned.finished:
            print(f"advfeat: {out} holds a finished run; nothing to do", file=sys.stderr)
            results.append((out, json.loads((out / "metrics.json").read_text())))
            continue
        if cfg.progress:
            verb = "resuming" if planned.resume else "training"
            print(
                f"advfeat: {verb} {cfg.method} / {cfg.model} / {cfg.dataset} → {out}",
                file=sys.stderr,
            )
        metrics = Trainer(cfg, out, resume=planned.resume, force=force).fit()
        if metrics:
            results.append((out, metrics))
    if results:
        print(result_table([m for _, m in results]))
        for out, _ in results:
            print(f"run folder: {out}")
    return 0


# the headline metric of each kind of run: (metrics.json key, column title, shifted key)
HEADLINE = (
    ("clean_acc", "clean acc", "shifted_acc"),
    ("clean_ap50", "clean AP50", "shifted_ap50"),
    ("clean_miou", "clean mIoU", "shifted_miou"),
)


def result_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per run, clean and shifted-domain accuracy (AP50 / mIoU for
    detection / segmentation runs), training time."""
    key, title, shifted_key = next((h for h in HEADLINE if rows and h[0] in rows[0]), HEADLINE[0])
    shifted = sorted({k for r in rows for k in r.get(shifted_key, {})})
    name = title.removeprefix("clean ")
    head = ["method", "model", title, *[f"{s} {name}" for s in shifted], "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["method"], r["model"], f"{100 * r[key]:.1f} %" if key in r else "-"]
        cells += [
            f"{100 * r[shifted_key][s]:.1f} %" if s in r.get(shifted_key, {}) else "-"
            for s in shifted
        ]
        cells.append(f"{r['train_time_s']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
