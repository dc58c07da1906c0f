"""Equivalence checks behind ``benchmarks/gpu_speed.sh``: bf16 autocast, channels_last and
torch.compile against the eager fp32 training step, for every classification method.

For each method, one training step (method forward and backward) runs from the same initial
model, batch and random seed in eager fp32 and under each variant; the loss and the gradient of
every model parameter are compared (relative loss difference, cosine of the gradients). Results
are appended as JSON lines as they come, so a run stopped by its time box keeps what it did.

    python benchmarks/gpu_speed.py check --device cuda --out checks.jsonl --budget-s 120
    python benchmarks/gpu_speed.py table --checks checks.jsonl --bench r20.json ... > table.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from advfeat.methods import METHODS, build_method
from advfeat.models import build_model
from advfeat.train.checkpoint import save_checkpoint

METHOD_NAMES = "standard,alfa,afan,advprop,fast-advprop,advbn,l-alfa,pgd-at,trades,mart,afa"
# (max relative loss difference, min gradient cosine): fp32 variants differ only by
# summation order; bf16 keeps 8 bits of mantissa
TOLERANCE = {"bf16": (5e-2, 0.95), "channels_last": (1e-2, 0.99), "compile": (1e-2, 0.99)}


def _step(
    name: str, variant: str, args: argparse.Namespace, ckpt: Path
) -> tuple[float, torch.Tensor]:
    """Loss and flattened parameter gradient of one training step of method ``name``."""
    dev = torch.device(args.device)
    torch.manual_seed(0)
    base = build_model(args.model, num_classes=10, image_size=args.image_size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(dev)
    options: dict[str, Any] = {}
    if "init_checkpoint" in METHODS.get(name).defaults():
        if not ckpt.exists():
            save_checkpoint(ckpt, {"model": base.state_dict(), "config": {}, "epoch": 0})
        options["init_checkpoint"] = str(ckpt)
    if name == "advprop":
        options["eps"] = 1
    method = build_method(name, **options)
    model = method.prepare(copy.deepcopy(base)).to(dev).train()
    method.to(dev)
    run = model
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        run = model
    elif variant == "compile":
        run = torch.compile(model)
    autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if variant == "bf16":
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    torch.manual_seed(1)  # the method's own randomness (strengths, random starts)
    with autocast:
        out = method(run, x, y)
    out.loss.float().backward()
    grads = [p.grad.flatten().float() for p in model.parameters() if p.grad is not None]
    return float(out.loss.detach().float()), torch.cat(grads).cpu()


def _records(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    start = time.monotonic()
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "init.pt"
        for name in args.methods.split(","):
            ref: tuple[float, torch.Tensor] | None = None
            for variant in variants:
                record: dict[str, Any] = {"method": name, "variant": variant}
                if time.monotonic() - start > args.budget_s:
                    yield {**record, "status": "not run (time box)"}
                    continue
                t0 = time.monotonic()
                try:
                    if ref is None:
                        ref = _step(name, "eager", args, ckpt)
                    loss, grad = _step(name, variant, args, ckpt)
                except Exception as err:  # a failing variant is reported, not fatal
                    yield {**record, "status": f"error: {type(err).__name__}: {err}"[:300]}
                    continue
                rel = abs(loss - ref[0]) / max(abs(ref[0]), 1e-12)
                cos = float(torch.nn.functional.cosine_similarity(grad, ref[1], dim=0))
                max_rel, min_cos = TOLERANCE[variant]
                ok = rel <= max_rel and cos >= min_cos
                yield {
                    **record,
                    "status": "pass" if ok else "FAIL",
                    "loss_eager": ref[0],
                    "loss": loss,
                    "loss_rel_diff": rel,
                    "grad_cosine": cos,
                    "seconds": round(time.monotonic() - t0, 1),
                }


def check(args: argparse.Namespace) -> int:
    torch.backends.cudnn.allow_tf32 = False  # the reference is true fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    with open(args.out, "a") as f:
        for record in _records(args):
            f.write(json.dumps(record) + "\n")
            f.flush()
            print(json.dumps(record), flush=True)
    return 0


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def table(args: argparse.Namespace) -> int:
    lines = ["## Equivalence with eager fp32 (one training step)", ""]
    lines += [
        "| method | variant | status | loss rel. diff | gradient cosine |",
        "|---|---|---|---|---|",
    ]
    for r in _read_jsonl(args.checks):
        rel = f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else ""
        cos = f"{r['grad_cosine']:.4f}" if "grad_cosine" in r else ""
        lines.append(f"| {r['method']} | {r['variant']} | {r['status']} | {rel} | {cos} |")
    for path in args.bench:
        lines += ["", f"## Step time: `{Path(path).name}`", ""]
        if not Path(path).exists():
            lines.append("not measured (the part failed or ran out of time; see the log)")
            continue
        data = json.loads(Path(path).read_text())
        lines.append(
            f"{data.get('model')}, batch {data.get('batch_size')}, image "
            f"{data.get('image_size', '?')} px, amp {data.get('amp')}, channels_last "
            f"{data.get('channels_last')}, torch {data.get('torch')}"
        )
        lines += [
            "",
            "| method | step ms | images/s | × standard | × predicted by FLOPs "
            "| measured / predicted | peak memory MB | memory × standard |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, r in data["methods"].items():
            mem = r.get("peak_mem_mb")
            mem_ratio = r.get("mem_ratio_vs_standard")
            lines.append(
                f"| {label} | {r['step_ms']:.1f} | {r.get('images_per_s', 0):.0f} | "
                f"{r['ratio_vs_standard']:.2f} | {r['flops_ratio_vs_standard']:.2f} | "
                f"{r['ratio_over_flops_ratio']:.2f} | "
                f"{'n/a' if mem is None else f'{mem:.0f}'} | "
                f"{'n/a' if mem_ratio is None else f'{mem_ratio:.2f}'} |"
            )
    print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="bf16 / channels_last / compile against eager fp32")
    c.add_argument("--device", default="cuda")
    c.add_argument("--model", default="resnet20")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--image-size", type=int, default=32)
    c.add_argument("--methods", default=METHOD_NAMES)
    c.add_argument("--variants", default="bf16,channels_last,compile")
    c.add_argument("--budget-s", type=float, default=120.0)
    c.add_argument("--out", required=True, help="JSON lines, appended")
    c.set_defaults(handler=check)
    t = sub.add_parser("table", help="markdown table of the checks and bench JSON files")
    t.add_argument("--checks", required=True)
    t.add_argument("--bench", nargs="*", default=[])
    t.set_defaults(handler=table)
    args = parser.parse_args()
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
