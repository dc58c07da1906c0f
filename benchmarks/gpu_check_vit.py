"""Part d of ``benchmarks/gpu_check.sh``: the ViT arms of ``docs/results.md`` section 15 on the
GPU (issue 22's evidence at a scale that fits there).

timm ViT-Tiny with patch 4 and depth 4 at 32 px; ``standard``, ALFA, A-FAN, and AdvProp with its
auxiliary LayerNorm ``separate`` and ``shared``; seeds 0-2, all fifteen runs at once; CIFAR-10
JPEG when the zip is there (``shapes`` otherwise), a fixed number of epochs (``--epochs``, cosine,
lr 0.1 at batch 128) stopped at the deadline (each run checkpoints), then ``advfeat compare
--report-only`` tabulates the finished runs, paired with ``standard``. No paper claims anything
for ViTs: the table is an observation, and it measures the ``aux_norm`` reading::

    python benchmarks/gpu_check_vit.py --scratch DIR --data data --deadline $(( $(date +%s) + 100 ))
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from gpu_check import _run_group

ARMS = [
    "--arm", "standard: method=standard",
    "--arm", "alfa: method=alfa",
    "--arm", "afan: method=afan",
    "--arm", "advprop-separate: method=advprop method_options.aux_norm=separate",
    "--arm", "advprop-shared: method=advprop method_options.aux_norm=shared",
]  # fmt: skip


def command(args: argparse.Namespace, out: Path) -> list[str]:
    """The ``advfeat compare`` command of the ViT arms."""
    model = ["--model", "timm:vit_tiny_patch16_224", "--set", "model_options.patch_size=4"]
    model += ["--set", f"model_options.depth={args.depth}"]
    zip_path = Path(args.data) / "cifar10-jpeg.zip"
    if zip_path.is_file() and not args.tiny:
        data = ["--dataset", "cifar10-jpeg", "--data-dir", args.data, "--batch-size", "128"]
        data += ["--lr", "0.1"]
    else:
        data = ["--dataset", "shapes", "--set", "dataset_options.n_train=32"]
        data += ["--set", "dataset_options.n_test=16", "--batch-size", "16", "--lr", "0.05"]
    flags = ["--device", args.device, "--threads", "1", "--set", "eval_shifted=false"]
    flags += ["--epochs", str(args.epochs), "--seeds", *map(str, args.seeds)]
    flags += ["--jobs", str(args.jobs), "--baseline", "standard", "--out", str(out)]
    return [sys.executable, "-m", "advfeat.cli", "compare", *model, *data, *ARMS, *flags]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--data", default="data")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline", type=float, required=True, help="time.time() to stop by")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=15)
    parser.add_argument("--reserve-s", type=float, default=10.0)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    scratch = Path(args.scratch)
    out = scratch / "vit"
    cmd = command(args, out)
    record = {"command": shlex.join(cmd[2:])}
    start = time.time()
    record["state"] = _run_group(cmd, scratch / "vit.log", args.deadline - args.reserve_s)
    record["wall_s"] = round(time.time() - start, 1)
    (scratch / "vit.json").write_text(json.dumps(record, indent=2) + "\n")
    if not (out / "compare.md").exists():  # stopped before compare wrote its table
        with contextlib.suppress(subprocess.TimeoutExpired):
            report = subprocess.run(
                [*cmd, "--report-only"],
                capture_output=True,
                text=True,
                timeout=max(args.deadline - time.time(), 5),
            )
            (scratch / "vit_report.txt").write_text(report.stdout + report.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
