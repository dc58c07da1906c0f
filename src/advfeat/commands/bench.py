"""``advfeat bench``: time training steps of several methods in one process."""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import asdict
from typing import Any

import torch

from advfeat.train.config import parse_override

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="time training steps of each method and compare with standard training"
    )
    p.add_argument("--model", default="resnet20", help="architecture (default resnet20)")
    p.add_argument(
        "--model-option",
        dest="model_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the architecture, as train's model_options, e.g. "
        "--model-option patch_size=4 --model-option depth=2",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument(
        "--methods",
        default="standard,alfa,afan,advprop,advbn",
        help="comma-separated method names; LABEL=NAME benchmarks a named configuration "
        "(options then set with --set LABEL.option=value)",
    )
    p.add_argument("--iters", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="a method option, e.g. --set afan.k=5; bench settings per method or label: "
        "LABEL.frontier=false (full-model fallback for a site inside a block), "
        "LABEL.live_site=SITE (L-ALFA: η held one-hot at SITE)",
    )
    p.add_argument(
        "--amp", choices=["bf16", "fp16"], help="run the forward passes under torch.autocast"
    )
    p.add_argument(
        "--channels-last", action="store_true", help="model and batch in channels_last format"
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time each step captured as one CUDA graph, as cuda_graph trains it (CUDA only; "
        "methods whose step cannot be captured are timed eagerly and their row says why)",
    )
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak-memory measurement (on CPU: one fresh process per method)",
    )
    p.add_argument(
        "--order",
        choices=["interleaved", "sequential"],
        default="interleaved",
        help="interleaved: prepare every method, then time them in interleaved rounds "
        "(default); sequential: prepare and time one method after the other, so that a "
        "benchmark stopped part-way keeps the methods it finished",
    )
    p.add_argument(
        "--json",
        help="write the results to this JSON file, rewritten as rows come in (after each "
        "method with --order sequential, after each round otherwise); 'complete' says "
        "whether every method was measured",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from advfeat.bench import BenchResult, bench_table, run_bench
    from advfeat.checkpoint import atomic_write_json
    from advfeat.errors import AdvfeatError

    options: dict[str, dict[str, Any]] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        method, _, option = key.partition(".")
        if not option:
            raise AdvfeatError(f"--set for bench expects METHOD.OPTION=VALUE, got {text!r}")
        options.setdefault(method, {})[option] = value
    model_options = dict(parse_override(text) for text in args.model_options)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        raise AdvfeatError(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    if args.json:
        from pathlib import Path

        from advfeat.train.rundir import check_writable

        target = Path(args.json)
        if target.is_dir():
            raise AdvfeatError(f"--json {args.json!r} is a folder; --json names the results file")
        check_writable(target.parent)

    def payload(rows: list[BenchResult], complete: bool) -> dict[str, Any]:
        return {
            "model": args.model,
            "model_options": model_options,
            "batch_size": args.batch_size,
            "iters": args.iters,
            "device": args.device,
            "image_size": args.image_size,
            "amp": args.amp,
            "channels_last": args.channels_last,
            "cuda_graph": args.cuda_graph,
            "order": args.order,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "memory": (
                "peak CUDA memory allocated during one step, above that before it"
                if args.device.startswith("cuda")
                else "peak resident memory of one step above that before it (a fresh process "
                "per method)"
            ),
            "complete": complete,
            "methods": {r.label or r.method: asdict(r) for r in rows},
        }

    def write(rows: list[BenchResult]) -> None:
        if args.json:
            atomic_write_json(args.json, payload(rows, complete=False))

    results = run_bench(
        methods,
        model_name=args.model,
        batch_size=args.batch_size,
        iters=args.iters,
        warmup=args.warmup,
        image_size=args.image_size,
        device=args.device,
        seed=args.seed,
        method_options=options,
        memory=args.memory,
        amp=args.amp,
        channels_last=args.channels_last,
        progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True),
        order=args.order,
        on_rows=write,
        cuda_graph=args.cuda_graph,
        model_options=model_options,
    )
    print(bench_table(results))
    if args.json:
        atomic_write_json(args.json, payload(results, complete=True))
    return 0
