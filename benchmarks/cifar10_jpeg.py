"""Train ``standard``, ``alfa`` and ``afan`` on real CIFAR-10 (JPEG) and tabulate mean ± std.

A reduced protocol that fits a 2-core CPU (the papers train 200 epochs on a GPU): ResNet-20,
the first ``--per-class`` training images of each class, 10 % of them held out for validation
with the best-validation checkpoint evaluated on the full 10,000-image test set (the papers'
90 %/10 % protocol), SGD 0.1 / momentum 0.9 / weight decay 5e-4, cosine schedule, random crop
and flip, every method at its CIFAR default. Each (method, seed) is one run folder under
``--out``; a finished run is skipped and an interrupted one resumed, so the script can be
killed and started again. The table goes to ``--table`` (Markdown) and stdout::

    python benchmarks/cifar10_jpeg.py --data-dir ../shared/data --epochs 10 --per-class 500 \
        --seeds 0 1 2 --threads 1 --table docs/results-cifar10-jpeg.md

``--warmup-epochs`` adds the papers' linear warm-up (ALFA / A-FAN: 200 iterations); the loss of
``alfa`` and ``afan`` sums 2 and 4 cross-entropies, so without warm-up their first steps are
much larger than standard training's.

The JPEG re-encoding costs some accuracy: compare the methods with each other, never with
the papers' numbers on raw CIFAR-10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from advfeat.train import TrainConfig, Trainer

METHODS = ("standard", "alfa", "afan")


def run_config(args: argparse.Namespace, method: str, seed: int) -> TrainConfig:
    cfg = TrainConfig(
        method=method,
        model="resnet20",
        dataset="cifar10-jpeg",
        data_dir=str(args.data_dir),
        epochs=args.epochs,
        batch_size=128,
        lr=0.1,
        schedule="cosine",
        weight_decay=5e-4,
        warmup_epochs=args.warmup_epochs,
        val_fraction=0.1,
        select_best=True,
        seed=seed,
        device=args.device,
        progress=not args.quiet,
    )
    if args.per_class is not None:
        cfg.dataset_options = {"max_per_class": args.per_class, "limit_test": False}
    cfg.validate()
    return cfg


def train_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    out = Path(args.out) / f"{method}-s{seed}"
    done = out / "metrics.json"
    if done.exists():
        return dict(json.loads(done.read_text()))
    resume = (out / "checkpoint.pt").exists()
    print(f"== {method} seed {seed} → {out}{' (resuming)' if resume else ''}", file=sys.stderr)
    return Trainer(run_config(args, method, seed), out, resume=resume).fit()


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def table(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> str:
    base = statistics.mean(r["train_time_s"] for r in results["standard"])
    lines = [
        f"ResNet-20 on cifar10-jpeg, {args.epochs} epochs, "
        f"{'all' if args.per_class is None else args.per_class} training images per class "
        f"(90 % train / 10 % validation, best-validation checkpoint), full test set, "
        f"warm-up {args.warmup_epochs:g} epochs, "
        f"seeds {', '.join(map(str, args.seeds))}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| method | test acc (%) | best val acc (%) | train time (s) | time vs standard |",
        "|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        seconds = statistics.mean(r["train_time_s"] for r in runs)
        lines.append(
            f"| {method} | {mean_std([r['clean_acc'] for r in runs])} "
            f"| {mean_std([r['best_val_acc'] for r in runs])} "
            f"| {seconds:.0f} | {seconds / base:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--per-class", type=int, default=500, help="0 = the full 5,000")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear lr warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("runs/cifar10-jpeg"))
    p.add_argument("--table", type=Path, default=None, help="also write the table here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.per_class == 0:
        args.per_class = None
    if "standard" not in args.methods:
        args.methods.insert(0, "standard")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    results = {m: [train_one(args, m, s) for s in args.seeds] for m in args.methods}
    text = table(args, results)
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)
    print(f"total wall time {time.time() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
