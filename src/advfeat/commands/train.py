"""``advfeat train``: one run, or with no ``--method`` the default preset side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from advfeat.commands import compare
from advfeat.commands.protocol import (
    FLAG_KEYS,
    add_protocol_arguments,
    config_from_args,
    protocol_keys,
)
from advfeat.presets import load_preset
from advfeat.train.build import check_config
from advfeat.train.config import TrainConfig, load_yaml, parse_override

__all__ = ["DEFAULT_METHODS", "DEFAULT_SEEDS", "add_parser", "run"]

DEFAULT_METHODS: tuple[str, ...] = ("standard", "afan")
"""Methods trained side by side (same seeds, same data) by ``advfeat train`` without
``--method``: standard training and the method that ``docs/results.md`` supports on this
protocol."""

DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
"""Seeds of the default run: a difference between methods is shown with its seed spread."""


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


def _default_out(cfg: TrainConfig) -> Path:
    model = cfg.model.replace(":", "-").replace("/", "-")
    return Path("runs") / f"{cfg.method}-{model}-{cfg.dataset}-s{cfg.seed}"


def run(args: argparse.Namespace) -> int:
    from advfeat.train.trainer import Trainer

    methods = [args.method] if args.method else _resumed_methods(args) or _preset_methods(args)
    configs = [config_from_args(args, m) for m in methods]
    if len(configs) > 1 and not args.show_config:
        return _default_comparison(args)
    runs = [_resume_plan(args, cfg, _out_dir(args, cfg, len(configs))) for cfg in configs]
    if args.show_config:
        for cfg, _, _ in runs:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    for cfg, out, _ in runs:  # what each run checks at its start, before any run starts
        if not _finished(args, out):
            check_config(cfg)
    results = []
    for cfg, out, resume in runs:
        if _finished(args, out):
            print(f"advfeat: {out} holds a finished run; nothing to do", file=sys.stderr)
            results.append((out, json.loads((out / "metrics.json").read_text())))
            continue
        if cfg.progress:
            verb = "resuming" if resume else "training"
            print(
                f"advfeat: {verb} {cfg.method} / {cfg.model} / {cfg.dataset} → {out}",
                file=sys.stderr,
            )
        metrics = Trainer(cfg, out, resume=resume, force=args.force).fit()
        if metrics:
            results.append((out, metrics))
    if results:
        print(result_table([m for _, m in results]))
        for out, _ in results:
            print(f"run folder: {out}")
    return 0


def _default_comparison(args: argparse.Namespace) -> int:
    """The default run: :data:`DEFAULT_METHODS` × :data:`DEFAULT_SEEDS` (or ``--seed``) on the
    default preset, as ``advfeat compare`` does it, into ``--out`` (default ``runs/default``)."""
    seeds = [args.seed] if args.seed is not None else list(DEFAULT_SEEDS)
    argv = ["--methods", ",".join(DEFAULT_METHODS), "--seeds", *map(str, seeds)]
    ns = compare.parse([*argv, "--out", args.out or "runs/default"])
    for key in protocol_keys():  # the protocol flags given to `advfeat train`
        setattr(ns, key, getattr(args, key))
    return compare.run(ns)


def _finished(args: argparse.Namespace, out: Path) -> bool:
    """``--auto-resume`` of a run folder whose run has finished: nothing to train."""
    return bool(args.auto_resume) and (out / "metrics.json").is_file()


def _out_dir(args: argparse.Namespace, cfg: TrainConfig, n_runs: int) -> Path:
    if n_runs > 1:
        return Path(args.out or "runs/default") / cfg.method
    return Path(args.out) if args.out else _default_out(cfg)


def explicit_keys(args: argparse.Namespace) -> list[str]:
    """The config keys the command line sets: flags, ``--set``, ``--config`` and ``--preset``."""
    keys = [key for attr, key in FLAG_KEYS.items() if getattr(args, attr) is not None]
    keys += [parse_override(o)[0] for o in args.overrides]
    if args.config:
        keys += list(load_yaml(args.config))
    if args.preset:
        keys += list(load_preset(args.preset))
    return keys


def _resumed_methods(args: argparse.Namespace) -> list[str]:
    """``--resume`` / ``--auto-resume`` of one run folder without ``--method``: its method."""
    from advfeat.train.rundir import read_saved_config

    if not ((args.resume or args.auto_resume) and args.out):
        return []
    checkpoint = Path(args.out) / "checkpoint.pt"
    return [read_saved_config(checkpoint).method] if checkpoint.is_file() else []


def _resume_plan(
    args: argparse.Namespace, cfg: TrainConfig, out: Path
) -> tuple[TrainConfig, Path, bool]:
    """``(config, run folder, resume?)``: a resumed run takes the saved configuration, with only
    the keys that do not change the result taken from the command line."""
    from advfeat.train.rundir import resumed_config

    resume = args.resume or (args.auto_resume and (out / "checkpoint.pt").is_file())
    if resume and (out / "checkpoint.pt").is_file():
        cfg = resumed_config(out, cfg, explicit_keys(args))
    return cfg, out, resume


def _preset_methods(args: argparse.Namespace) -> list[str]:
    """No ``--method``: the default preset's methods (or the preset's / config file's method)."""
    if args.preset:
        return [str(load_preset(args.preset).get("method", "standard"))]
    if args.config and "method" in load_yaml(args.config):
        return [str(load_yaml(args.config)["method"])]
    if any(o.split("=", 1)[0].strip() == "method" for o in args.overrides):
        return [str(dict(parse_override(o) for o in args.overrides)["method"])]
    return list(DEFAULT_METHODS)


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
