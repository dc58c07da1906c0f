"""Part a of ``benchmarks/gpu_check.sh``, second half: training steps captured as CUDA graphs
(``cuda_graph``) against eager steps, in the trainer itself.

Per method (``standard``, ALFA and A-FAN with their presets' Table 2 options, PGD-AT (PGD-10
with a random start drawn on the device, its images' range noted on the device), then AdvProp
and Fast AdvProp (as the time box allows), the same run
(ResNet-20, generated 32-px ``shapes`` images held on the device, batch 128, 2 epochs of
``--steps`` steps, seed 0, bf16 autocast as the trainer runs on CUDA) three times: eager, eager
again, captured. Two eager runs differ by cuDNN's non-deterministic kernels; the captured run
*passes* when its step was captured and its weights and last-epoch loss are no further from the
first eager run's than the second eager run is (× 3, plus a floor of 1e-4 relative). Speed: the
second epoch's seconds per step of each run, in one process (the captured epoch includes its
one eager step and its capture). JSON lines, written as they come::

    python benchmarks/gpu_check_graphs.py --device cuda --out graphs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PRESETS = {"alfa": "alfa-resnet20-cifar10", "afan": "afan-resnet20-cifar10"}


def _run(name: str, mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from advfeat.methods import unwrap
    from advfeat.presets import load_preset
    from advfeat.train import TrainConfig, Trainer

    options = load_preset(PRESETS[name])["method_options"] if name in PRESETS else {}
    cfg = TrainConfig(
        method=name,
        method_options=dict(options),
        model=args.model,
        dataset="shapes",
        dataset_options={
            "n_train": args.batch_size * args.steps,
            "n_test": 256,
            "image_size": args.image_size,
        },
        epochs=2,
        batch_size=args.batch_size,
        eval_batch_size=256,
        lr=0.1,
        device=args.device,
        progress=False,
        eval_shifted=False,
        seed=0,
        cuda_graph=mode,
        device_data="true",
    )
    trainer = Trainer(cfg, out)
    metrics = trainer.fit()
    weights = torch.cat(
        [t.detach().float().flatten().cpu() for t in unwrap(trainer.model).state_dict().values()
         if t.is_floating_point()]
    )  # fmt: skip
    last = trainer.history[-1]
    return {
        "weights": weights,
        "loss": float(last["train_loss"]),
        "step_s": float(last["epoch_time_s"]) / args.steps,
        "steps": metrics.get("steps"),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def emit(out: Any, record: dict[str, Any]) -> None:
    """Write ``record`` as one JSON line to ``out`` (flushed: a run cut short keeps it) and
    print it."""
    line = json.dumps(record)
    out.write(line + "\n")
    out.flush()
    print(line, flush=True)


def cell(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec`` in a table cell; empty when it is not a number."""
    return format(value, spec) if isinstance(value, int | float) else ""


class ReplayByCalling:
    """``--cpu-replay`` (the tiny CPU run of the plumbing): warm-up and capture as on a GPU, a
    "replay" that runs the step again."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def warm(self, run: Any) -> None:
        run()

    def capture(self, run: Any) -> Any:
        return run


def check(args: argparse.Namespace) -> int:
    start = time.monotonic()
    if args.cpu_replay:
        from advfeat.train import trainer as trainer_module

        trainer_module.CudaGraphs = ReplayByCalling  # type: ignore[assignment,misc]
        trainer_module.run_refusal = lambda cfg, device, refusal, **kw: refusal  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "a") as out:
        for name in args.methods.split(","):
            record: dict[str, Any] = {"method": name}
            if time.monotonic() - start > args.budget_s:
                record["status"] = "not run (time box)"
            else:
                try:
                    runs = {
                        mode: _run(name, flag, args, Path(tmp) / f"{name}-{mode}")
                        for mode, flag in (
                            ("eager", "false"),
                            ("eager2", "false"),
                            ("graph", "true"),
                        )
                    }
                    ref = runs["eager"]
                    spread_w = _rel(runs["eager2"]["weights"], ref["weights"])
                    spread_l = abs(runs["eager2"]["loss"] - ref["loss"]) / abs(ref["loss"])
                    diff_w = _rel(runs["graph"]["weights"], ref["weights"])
                    diff_l = abs(runs["graph"]["loss"] - ref["loss"]) / abs(ref["loss"])
                    record.update(
                        steps=runs["graph"]["steps"],
                        weights_rel_diff=diff_w,
                        eager_weights_rel_diff=spread_w,
                        loss_rel_diff=diff_l,
                        eager_loss_rel_diff=spread_l,
                        eager_step_ms=1e3 * ref["step_s"],
                        graph_step_ms=1e3 * runs["graph"]["step_s"],
                        speedup=ref["step_s"] / runs["graph"]["step_s"],
                    )
                    close = diff_w <= 3 * spread_w + 1e-4 and diff_l <= 3 * spread_l + 1e-4
                    captured = runs["graph"]["steps"] == "captured"
                    record["status"] = "pass" if captured and close else "FAIL"
                except Exception as err:  # reported, not fatal
                    record["status"] = f"error: {type(err).__name__}: {err}"[:300]
            emit(out, record)
    return 0


def graphs_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of ``check``'s JSON lines (for ``summary.md``)."""

    lines = [
        "| method | status | steps | weights rel. diff (eager vs eager) | loss rel. diff "
        "(eager vs eager) | eager ms/step | captured ms/step | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('method')} | {r.get('status')} | {r.get('steps', '')} | "
            f"{cell(r.get('weights_rel_diff'), '.1e')} ({cell(r.get('eager_weights_rel_diff'), '.1e')}) | "
            f"{cell(r.get('loss_rel_diff'), '.1e')} ({cell(r.get('eager_loss_rel_diff'), '.1e')}) | "
            f"{cell(r.get('eager_step_ms'), '.2f')} | {cell(r.get('graph_step_ms'), '.2f')} | "
            f"{cell(r.get('speedup'), '.2f')} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--methods", default="standard,alfa,afan,pgd-at,advprop,fast-advprop")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    parser.add_argument(
        "--cpu-replay", action="store_true", help="plumbing only: replay by calling, on the CPU"
    )
    return check(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
