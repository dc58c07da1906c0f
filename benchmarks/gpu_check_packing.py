"""Part b of ``benchmarks/gpu_check.sh``, second half: several seeds of one arm in one process.

Issue 24 asks whether training S seeds of one arm as *one* model (the S models' parameters
stacked along a leading seed dimension, the forward pass vectorised over it with
``torch.func.vmap``, one optimiser over the stacked tensors) is faster than S separate models
stepped one after the other in one process. SGD's update (momentum, weight decay) is
element-wise, so the stacked update is exactly S independent updates, and each seed's loss
depends only on its own slice: the two ways train the same S models, up to the order of floating
point sums in the vectorised convolutions. ``standard`` training only (no feature hooks), each seed
its own batch on the device, SGD lr 0.1, momentum 0.9, weight decay 5e-4.

1. Equivalence: from the same initial weights and batches, after ``--check-steps`` steps, each
   seed's packed weights against its separate model's (relative L2 difference; pass under 1e-3).
2. Speed: blocks of ``--steps`` steps of each way, alternated (packed, separate, packed, ...)
   so that both see the machine's drifts; the median per step. On CUDA with bf16 autocast, each
   way's whole step captured as one CUDA graph (as the trainer captures ``standard``).
   ``ms_per_seed_step`` = step time ÷ S; ``packed_speedup`` = separate ÷ packed.

JSON lines, one per S::

    python benchmarks/gpu_check_packing.py --device cuda --seeds 3,9 --out packing.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from gpu_check_graphs import ReplayByCalling, cell, emit
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def _optimizer(params: list[Tensor], device: torch.device) -> torch.optim.SGD:
    from advfeat.train.graphs import use_tensor_learning_rates

    opt = torch.optim.SGD(params, **SGD)
    if device.type == "cuda":
        use_tensor_learning_rates(opt, device)  # fused update, rate on the device: capturable
    return opt


class Separate:
    """S models, each stepped on its own batch, one after the other."""

    def __init__(self, models: list[nn.Module], device: torch.device, amp: bool) -> None:
        self.models = models
        self.opts = [_optimizer(list(m.parameters()), device) for m in models]
        self.amp = amp

    def step(self, x: Tensor, y: Tensor) -> None:
        for model, opt, xs, ys in zip(self.models, self.opts, x, y, strict=True):
            with torch.autocast(xs.device.type, torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

    def weights(self, seed: int) -> Tensor:
        return torch.cat([p.detach().double().flatten() for p in self.models[seed].parameters()])


class Packed:
    """The S models as one: parameters and buffers stacked on a leading seed dimension, the
    forward pass vectorised over it, one optimiser over the stacked tensors."""

    def __init__(self, models: list[nn.Module], device: torch.device, amp: bool) -> None:
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        self.base = copy.deepcopy(models[0]).to("meta")
        self.opt = _optimizer(list(self.params.values()), device)
        self.amp = amp

        def loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(self.base, (p, b), (x,)), y)

        self.losses = vmap(loss)

    def step(self, x: Tensor, y: Tensor) -> None:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp):
            losses = self.losses(self.params, self.buffers, x, y)
        losses.sum().backward()  # each seed's gradient is its own loss's gradient
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)

    def weights(self, seed: int) -> Tensor:
        return torch.cat([p[seed].detach().double().flatten() for p in self.params.values()])


def _models(n: int, args: argparse.Namespace, device: torch.device) -> list[nn.Module]:
    from advfeat.models import build_model

    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model(args.model, num_classes=10).to(device).train())
    return out


def _batches(n: int, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1234)
    size = (n, args.batch_size, 3, args.image_size, args.image_size)
    x = torch.rand(size, generator=gen).to(device)
    y = torch.randint(0, 10, (n, args.batch_size), generator=gen).to(device)
    return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def equivalence(n: int, args: argparse.Namespace, device: torch.device) -> float:
    """The largest relative weight difference, over seeds, between packed and separate
    training from the same weights and batches (fp32, eager)."""
    models = _models(n, args, device)
    packed = Packed(copy.deepcopy(models), device, amp=False)
    separate = Separate(models, device, amp=False)
    x, y = _batches(n, args, device)
    for _ in range(args.check_steps):
        packed.step(x, y)
        separate.step(x, y)
    return max(_rel(packed.weights(s), separate.weights(s)) for s in range(n))


def _stepper(way: Any, x: Tensor, y: Tensor, device: torch.device, capture: bool) -> Any:
    """The way's step, captured as one CUDA graph when ``capture`` (else eager)."""
    from advfeat.train.graphs import CapturedStep, CudaGraphs

    if not capture:
        return lambda: way.step(x, y)
    backend = CudaGraphs(device) if device.type == "cuda" else ReplayByCalling(device)
    captured = CapturedStep(way.step, backend, warmup=3, required=True)
    return lambda: captured(x, y)


def speed(n: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    amp = device.type == "cuda"
    capture = device.type == "cuda" or args.cpu_replay
    x, y = _batches(n, args, device)
    models = _models(n, args, device)
    ways = {
        "packed": _stepper(Packed(copy.deepcopy(models), device, amp), x, y, device, capture),
        "separate": _stepper(Separate(models, device, amp), x, y, device, capture),
    }
    for run in ways.values():  # warm-up, and the capture when there is one
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, run in ways.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            _sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    packed = statistics.median(times["packed"])
    separate = statistics.median(times["separate"])
    return {
        "packed_step_ms": 1e3 * packed,
        "separate_step_ms": 1e3 * separate,
        "packed_ms_per_seed_step": 1e3 * packed / n,
        "separate_ms_per_seed_step": 1e3 * separate / n,
        "packed_speedup": separate / packed,
        "captured": capture,
        "amp": "bf16" if amp else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--seeds", default="3,9", help="comma-separated numbers of seeds S")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--check-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks of each way")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    parser.add_argument(
        "--cpu-replay", action="store_true", help="plumbing only: capture by calling, on the CPU"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    start = time.monotonic()
    with open(args.out, "a") as out:
        for n in (int(s) for s in args.seeds.split(",")):
            record: dict[str, Any] = {
                "model": args.model,
                "batch_size": args.batch_size,
                "seeds": n,
            }
            if time.monotonic() - start > args.budget_s:
                record["status"] = "not run (time box)"
            else:
                try:
                    diff = equivalence(n, args, device)
                    record["weights_rel_diff"] = diff
                    record.update(speed(n, args, device))
                    record["status"] = "pass" if diff < 1e-3 else "FAIL"
                except Exception as err:  # reported, not fatal
                    record["status"] = f"error: {type(err).__name__}: {err}"[:300]
                with contextlib.suppress(Exception):
                    _sync(device)
            emit(out, record)
    return 0


def packing_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the JSON lines (for ``summary.md``)."""

    lines = [
        "| seeds S | status | weights rel. diff | packed ms/step | separate ms/step "
        "| packed ms per seed-step | separate ms per seed-step | packed speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('seeds')} | {r.get('status')} | {cell(r.get('weights_rel_diff'), '.1e')} | "
            f"{cell(r.get('packed_step_ms'), '.2f')} | {cell(r.get('separate_step_ms'), '.2f')} | "
            f"{cell(r.get('packed_ms_per_seed_step'), '.2f')} | "
            f"{cell(r.get('separate_ms_per_seed_step'), '.2f')} | "
            f"{cell(r.get('packed_speedup'), '.2f')} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
