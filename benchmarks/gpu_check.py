"""The parts of ``benchmarks/gpu_check.sh`` that run Python (see that script).

* ``parity``: the machine (torch, CUDA, the device, the measured bf16 matmul rate) into
  ``env.json``, then, per method, one training step from the same model, batch and random seed in
  eager fp32 and under each variant (bf16 autocast, channels_last, torch.compile), compared on
  the loss, the parameter gradient, the adversarial gap ``L_adv − L_clean`` and the perturbation
  δ itself (every attack's result, captured as it returns). JSON lines, written as they come.
* ``paper``: the papers' CIFAR-10 protocol (ALFA §4.1 / A-FAN S2.1, Table 2 of both) with
  ``advfeat compare``: a probe of a few steps per arm, the largest epoch count (≤ 200) whose
  runs fit before the deadline, the runs (seed-major, so every finished run counts), stopped at
  the deadline, and the paired table of the finished runs.
* ``summary``: ``summary.md`` from what the parts left in the scratch folder, and the short table
  printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gpu_check_graphs
import gpu_check_packing
import torch

METHODS = "standard,alfa,afan,l-alfa,advbn,advprop,fast-advprop,pgd-at,trades,mart,afa"
FEATURE_METHODS = ("alfa", "afan", "l-alfa", "advbn")
# (max relative loss difference, min gradient cosine, max relative gap difference, min δ cosine
# of the feature methods). fp32 variants differ by summation order only, bf16 keeps 8 bits of
# mantissa; either flips the sign step of gradient components near zero, and a multi-step pixel
# attack then follows another path (an H200 gave δ cosines of 0.86-0.90 for PGD-AT, MART and AFA
# under channels_last, 0.06 for TRADES, whose attack starts where the KL gradient is ~0), so δ
# gates only the feature methods; pixel methods are judged on the loss they reach (the gap).
TOLERANCE = {
    "bf16": (5e-2, 0.95, 0.5, 0.8),
    "channels_last": (5e-3, 0.95, 0.1, 0.9),
    "compile": (5e-3, 0.95, 0.1, 0.9),
}
PAPER_CLAIMS = {
    # ALFA Table 2 (ResNet-20s, CIFAR-10) and A-FAN Table 2 (ResNet-20s, CIFAR-10): SA %, the
    # checkpoint selected on a 10 % validation split, 200 epochs, raw CIFAR-10
    "standard": 91.25,
    "alfa": 92.52,
    "afan": 92.52,
}
PRESETS = {"alfa": "alfa-resnet20-cifar10", "afan": "afan-resnet20-cifar10"}


# --------------------------------------------------------------------------------- machine
def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    """Measured rate of an ``n × n`` bf16 matmul, TFLOP/s (best of three timings)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best / 1e12


def machine(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Versions, the device and its bf16 matmul rate."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
        total = torch.cuda.get_device_properties(device).total_memory
        info["memory_gib"] = round(total / 2**30, 1)
    n, reps = (256, 2) if tiny else (8192, 20)
    info["bf16_matmul_tflops"] = float(f"{matmul_tflops(device, n, reps):.4g}")
    info["bf16_matmul_size"] = n
    return info


# ---------------------------------------------------------------------------------- parity
@contextlib.contextmanager
def captured_perturbations() -> Iterator[list[torch.Tensor]]:
    """Every attack's perturbation of this block, in call order (float32, on the CPU): pixel
    attacks ``x_adv − x``, feature attacks δ, AdvBN ``f_adv − f``."""
    from advfeat.attacks.base import Attack
    from advfeat.attacks.feature import FeatureAttack

    found: list[torch.Tensor] = []
    call, sites = Attack.__call__, FeatureAttack.attack_sites

    def pixel(self: Any, x: torch.Tensor, y: Any, **kwargs: Any) -> torch.Tensor:
        out = call(self, x, y, **kwargs)
        found.append((out.detach().float() - x.detach().float()).flatten().cpu())
        return out

    def feature(self: Any, x: Any, y: Any, features: Any, **options: Any) -> Any:
        out = sites(self, x, y, features, **options)
        for site in self.sites:
            result = out[site].detach().float()
            if self.returns == "feature" and site in features:
                result = result - features[site].detach().float()
            found.append(result.flatten().cpu())
        return out

    Attack.__call__ = pixel  # type: ignore[method-assign]
    FeatureAttack.attack_sites = feature  # type: ignore[method-assign]
    try:
        yield found
    finally:
        Attack.__call__ = call  # type: ignore[method-assign]
        FeatureAttack.attack_sites = sites  # type: ignore[method-assign]


def adversarial_gap(name: str, logs: dict[str, float], options: dict[str, Any]) -> float | None:
    """``L_adv − L_clean`` of a step from its logs (the mean of n adversarial terms; TRADES'
    adversarial term is already its KL divergence from the clean output)."""
    if "loss_adv" not in logs:
        return None
    if name == "trades":
        return logs["loss_adv"]
    if "loss_clean" not in logs:
        return None
    n = {"afan": options.get("k", 3), "afa": options.get("num_branches", 5) - 1}.get(name, 1)
    return logs["loss_adv"] / n - logs["loss_clean"]


class Subject:
    """One method, its prepared model and a fixed batch; every step starts from the same state
    (weights, BN statistics, the method's own state) on the same model instance, so that the
    traces a method keeps per model are built once."""

    def __init__(self, name: str, args: argparse.Namespace, ckpt: Path) -> None:
        from advfeat.checkpoint import save_checkpoint
        from advfeat.methods import METHODS as REGISTRY
        from advfeat.methods import build_method
        from advfeat.models import build_model

        self.name, self.args = name, args
        self.dev = torch.device(args.device)
        torch.manual_seed(0)
        base = build_model(args.model, num_classes=10, image_size=args.image_size)
        g = torch.Generator().manual_seed(0)
        size = (args.batch_size, 3, args.image_size, args.image_size)
        self.x = torch.rand(size, generator=g).to(self.dev)
        self.y = torch.randint(0, 10, (args.batch_size,), generator=g).to(self.dev)
        options: dict[str, Any] = {}
        if "init_checkpoint" in REGISTRY.get(name).defaults():
            if not ckpt.exists():
                save_checkpoint(ckpt, {"model": base.state_dict(), "config": {}, "epoch": 0})
            options["init_checkpoint"] = str(ckpt)
        if name == "advprop":
            options["eps"] = 1
        self.method = build_method(name, **options)
        self.model = self.method.prepare(base).to(self.dev).train()
        self.method.to(self.dev)
        self.model_state = copy.deepcopy(self.model.state_dict())
        self.method_state = copy.deepcopy(self.method.state_dict())

    def step(self, variant: str) -> dict[str, Any]:
        """Loss, parameter gradient, adversarial gap and perturbations of one training step."""
        model, method, x = self.model, self.method, self.x
        model.load_state_dict(self.model_state)
        method.load_state_dict(self.method_state)
        for p in [*model.parameters(), *method.parameters()]:
            p.grad = None
        run: Any = model
        if variant == "channels_last":
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        elif variant == "compile":
            run = torch.compile(model, backend=self.args.compile_backend)
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if variant == "bf16":
            autocast = torch.autocast(self.dev.type, dtype=torch.bfloat16)
        torch.manual_seed(1)  # the method's own randomness (strengths, random starts)
        try:
            with captured_perturbations() as deltas, autocast:
                out = method(run, x, self.y)
            out.loss.float().backward()
        finally:
            model.to(memory_format=torch.contiguous_format)
        grads = [p.grad.flatten().float() for p in model.parameters() if p.grad is not None]
        return {
            "loss": float(out.loss.detach().float()),
            "grad": torch.cat(grads).cpu(),
            "gap": adversarial_gap(self.name, out.logs, dict(method.opts.__dict__)),
            "deltas": list(deltas),
        }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def compare_steps(
    name: str, ref: dict[str, Any], got: dict[str, Any], variant: str
) -> dict[str, Any]:
    """The differences of a variant's step from the eager fp32 step, and pass or FAIL."""
    max_rel, min_cos, max_gap, min_delta_cos = TOLERANCE[variant]
    rel = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
    row: dict[str, Any] = {
        "loss_eager": ref["loss"],
        "loss": got["loss"],
        "loss_rel_diff": rel,
        "grad_cosine": _cosine(got["grad"], ref["grad"]),
    }
    ok = rel <= max_rel and row["grad_cosine"] >= min_cos
    if ref["gap"] is not None and got["gap"] is not None:
        row["gap_eager"], row["gap"] = ref["gap"], got["gap"]
        diff = abs(got["gap"] - ref["gap"])
        row["gap_rel_diff"] = diff / max(abs(ref["gap"]), 1e-6)
        # the gap is a difference of losses: it is known no better than the loss itself
        ok = ok and diff <= max_gap * abs(ref["gap"]) + 2 * abs(got["loss"] - ref["loss"])
    if ref["deltas"] and len(ref["deltas"]) == len(got["deltas"]):
        d_ref, d_got = torch.cat(ref["deltas"]), torch.cat(got["deltas"])
        if d_ref.shape == d_got.shape and float(d_ref.norm()) > 0:
            row["delta_norm_eager"] = float(d_ref.norm())
            row["delta_rel_diff"] = float((d_got - d_ref).norm() / d_ref.norm())
            row["delta_cosine"] = _cosine(d_got, d_ref)
            if name in FEATURE_METHODS:
                ok = ok and row["delta_cosine"] >= min_delta_cos
    elif ref["deltas"]:
        row["delta_note"] = f"{len(ref['deltas'])} attack calls in eager, {len(got['deltas'])} here"
    row["status"] = "pass" if ok else "FAIL"
    return row


def parity(args: argparse.Namespace) -> int:
    start = time.monotonic()
    dev = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # the reference is true fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    info = machine(dev, args.tiny)
    Path(args.env).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    variants = [v for v in args.variants.split(",") if v]
    compile_methods = [m for m in args.compile_methods.split(",") if m]
    plan = [(m, v) for m in args.methods.split(",") for v in variants if v != "compile"]
    plan += [(m, "compile") for m in compile_methods if "compile" in variants]
    refs: dict[str, dict[str, Any]] = {}
    subjects: dict[str, Subject] = {}
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "a") as out:
        ckpt = Path(tmp) / "init.pt"
        for name, variant in plan:
            record: dict[str, Any] = {"method": name, "variant": variant}
            if time.monotonic() - start > args.budget_s:
                record["status"] = "not run (time box)"
            else:
                t0 = time.monotonic()
                try:
                    if name not in subjects:
                        subjects[name] = Subject(name, args, ckpt)
                    if name not in refs:
                        refs[name] = subjects[name].step("eager")
                    got = subjects[name].step(variant)
                    record.update(compare_steps(name, refs[name], got, variant))
                except Exception as err:  # a failing variant is reported, not fatal
                    record["status"] = f"error: {type(err).__name__}: {err}"[:300]
                record["seconds"] = round(time.monotonic() - t0, 2)
            gpu_check_graphs.emit(out, record)
    return 0


# ----------------------------------------------------------------------------------- paper
def _compare_cmd(protocol: list[str], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "advfeat.cli", "compare", *protocol, "--out", str(out), *extra]


def _arms() -> list[str]:
    """``--methods``/``--arm`` flags: standard, and ALFA and A-FAN with their presets' (Table 2)
    method options."""
    from advfeat.presets import load_preset

    flags = ["--methods", "standard"]
    for label, preset in PRESETS.items():
        opts = load_preset(preset)["method_options"]
        keys = " ".join(f"method_options.{k}={json.dumps(v)}" for k, v in opts.items())
        flags += ["--arm", f"{label}: method={label} {keys}"]
    return flags


def _protocol(args: argparse.Namespace, data_root: Path | None) -> tuple[list[str], str]:
    """The train flags shared by every arm, and the dataset's description."""
    flags = ["--model", "resnet20", "--device", args.device, "--threads", "1"]
    flags += [
        "--set",
        "eval_shifted=false",
        "--set",
        "momentum=0.9",
        "--set",
        "weight_decay=0.0005",
    ]
    if data_root is not None:
        flags += ["--dataset", "cifar10-jpeg", "--data-dir", str(data_root)]
        flags += ["--batch-size", "128", "--lr", "0.1"]
        return flags, f"CIFAR-10 JPEG ({data_root / 'cifar10-jpeg.zip'}), 50,000 / 10,000 images"
    n_train = 64
    flags += ["--dataset", "shapes", "--batch-size", "16", "--lr", "0.1"]
    flags += ["--set", f"dataset_options.n_train={n_train}", "--set", "dataset_options.n_test=32"]
    flags += ["--set", "dataset_options.image_size=16"]
    why = "TINY" if args.shapes else "the CIFAR-10 JPEG zip is absent"
    return flags, f"`shapes` ({n_train} training images; {why})"


def _schedule_flags(tiny: bool) -> list[str]:
    if not tiny:
        return ["--recipe", "afan"]  # ×0.1 at 1/4 and 3/4 of the run, 200 warm-up steps
    # a handful of steps cannot hold 200 warm-up steps before the first decay
    return ["--set", "schedule=multistep", "--set", "milestones=[0.25, 0.75]"]


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to ``proc``'s process group (a trainer checkpoints and stops), SIGKILL after
    ``grace`` seconds to whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a trainer still shutting down
    proc.wait()


def _run_group(cmd: list[str], log: Path, deadline: float, grace: float = 15.0) -> str:
    """Run ``cmd`` in its own process group until it ends or ``deadline`` (``time.time()``),
    then stop the group (:func:`_stop_group`); also when this process is told to stop."""
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(deadline - time.time(), 1.0))
        except subprocess.TimeoutExpired:
            _stop_group(proc, grace)
            return "stopped at the time box"
        finally:
            if proc.returncode is None:  # SIGTERM to this process: leave no trainer behind
                _stop_group(proc, grace)
        return "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})"


def _makespan(durations: list[float], jobs: int) -> float:
    """When the last of ``durations`` ends, run in order on ``jobs`` slots (first free slot)."""
    slots = [0.0] * max(1, jobs)
    for d in durations:
        i = slots.index(min(slots))
        slots[i] += d
    return max(slots)


def choose_epochs(
    step_s: dict[str, float],
    overhead_s: float,
    steps_per_epoch: int,
    seeds: int,
    jobs: int,
    available_s: float,
    max_epochs: int,
    min_epochs: int,
    safety: float = 1.5,
) -> int:
    """The largest epoch count (at most ``max_epochs``) whose runs, seed-major on ``jobs``
    slots, end within ``available_s``; ``min_epochs`` when none does."""
    best = min_epochs
    for epochs in range(min_epochs, max_epochs + 1):
        one = [overhead_s + safety * epochs * steps_per_epoch * s for s in step_s.values()]
        if _makespan(one * seeds, jobs) <= available_s:
            best = epochs
        else:
            break
    return best


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_epoch_time(history: Path) -> float | None:
    """``epoch_time_s`` of the last epoch in a run's ``history.csv`` (written every epoch)."""
    import csv

    try:
        rows = list(csv.DictReader(history.read_text().splitlines()))
        return float(rows[-1]["epoch_time_s"])
    except (OSError, LookupError, ValueError):
        return None


def _probe_step_times(probe_dir: Path, seeds: list[str], steps: int) -> dict[str, float]:
    """Seconds per step of each arm: the slowest of its probe runs' last (warm) epoch time ÷
    its steps. The runs of a short probe overlap less than the long runs do (an H200 under MPS,
    nine runs: 8.6 / 6.7 / 10.1 ms per step in a 40-step probe, 14 / 16 / 23 ms in the runs),
    hence the 1.5 safety factor of :func:`choose_epochs`."""
    step_s: dict[str, float] = {}
    for label in ("standard", *PRESETS):
        times = [
            _last_epoch_time(probe_dir / "runs" / f"{label}-s{seed}" / "history.csv")
            for seed in seeds
        ]
        measured = [t for t in times if t is not None]
        if measured:
            step_s[label] = max(measured) / steps
    return step_s


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through _run_group, which stops its group


def paper(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    log = scratch / "paper.log"
    zip_path = Path(args.data) / "cifar10-jpeg.zip"
    data_root = Path(args.data) if zip_path.is_file() and not args.shapes else None
    protocol, data_text = _protocol(args, data_root)
    arms = _arms()
    seeds = [str(s) for s in args.seeds]
    record: dict[str, Any] = {
        "data": data_text,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "protocol": protocol + _schedule_flags(args.tiny),
        "arms": arms,
        "claims": PAPER_CLAIMS,
    }
    write = lambda: (scratch / "paper.json").write_text(json.dumps(record, indent=2) + "\n")  # noqa: E731
    write()
    # 1. probe: two epochs of a few steps of as many runs at once as will train at once (every
    # arm, and as many seeds as the slots hold); the second epoch's time (warm: kernels chosen,
    # memory allocated, the step captured) gives the time of a step
    probe_dir = scratch / "probe"
    t0 = time.time()
    probe_seeds = seeds[: max(1, min(len(seeds), args.jobs // (1 + len(PRESETS))))]
    record["probe_seeds"] = probe_seeds
    probe = _compare_cmd(
        protocol + arms,
        probe_dir,
        [
            "--epochs",
            "2",
            "--seeds",
            *probe_seeds,
            "--jobs",
            str(args.jobs),
            "--set",
            f"max_steps_per_epoch={args.probe_steps}",
            "--set",
            "eval_every=2",
        ],
    )
    record["probe_state"] = _run_group(probe, log, min(args.deadline, t0 + args.probe_s))
    step_s = _probe_step_times(probe_dir, probe_seeds, args.probe_steps)
    if len(step_s) < 1 + len(PRESETS) and os.environ.pop("CUDA_MPS_PIPE_DIRECTORY", None):
        # the runs could not share the GPU through MPS: once more, without it
        record["mps"] = f"the probe failed through MPS ({record['probe_state']}); runs without it"
        shutil.rmtree(probe_dir, ignore_errors=True)
        t0 = time.time()
        record["probe_state"] = _run_group(probe, log, min(args.deadline, t0 + args.probe_s))
        step_s = _probe_step_times(probe_dir, probe_seeds, args.probe_steps)
    record["probe_wall_s"] = round(time.time() - t0, 1)
    record["probe_step_s"] = step_s
    steps_per_epoch = (50_000 // 128) if data_root is not None else (64 // 16)
    record["steps_per_epoch"] = steps_per_epoch
    if len(step_s) < 1 + len(PRESETS):
        record["plan"] = "the probe did not time every arm (see paper.log): nothing trained"
        write()
        return 1
    overhead = max(record["probe_wall_s"] - 2 * max(step_s.values()) * args.probe_steps, 1.0)
    record["run_overhead_s"] = round(overhead, 1)
    available = args.deadline - time.time() - args.reserve_s
    min_epochs = 1 if args.tiny else 3  # the recipe's 200 warm-up steps end before 1/4
    epochs = choose_epochs(
        step_s, overhead, steps_per_epoch, len(seeds), args.jobs, available, args.max_epochs,
        min_epochs,
    )  # fmt: skip
    full = [overhead + epochs * steps_per_epoch * s for s in step_s.values()] * len(seeds)
    record["epochs"] = epochs
    record["available_s"] = round(available, 1)
    record["predicted_s"] = round(_makespan(full, args.jobs), 1)
    need = _makespan(
        [overhead + args.max_epochs * steps_per_epoch * s for s in step_s.values()] * len(seeds),
        args.jobs,
    )
    record["predicted_s_at_max_epochs"] = round(need, 1)
    record["plan"] = (
        f"{args.max_epochs} epochs fit ({need:.0f} s predicted for {available:.0f} s left)"
        if epochs >= args.max_epochs
        else f"{args.max_epochs} epochs do not fit ({need:.0f} s predicted, {available:.0f} s "
        f"left): {epochs} epochs, the largest that does"
    )
    write()
    # 2. the runs: seed-major on `jobs` slots (all arms of seed 0, then seed 1, ...), each
    # checkpointed every epoch, stopped at the deadline
    main = scratch / "paper"
    flags = ["--epochs", str(epochs), "--seeds", *seeds, "--jobs", str(args.jobs)]
    flags += ["--set", f"eval_every={epochs}"]  # test accuracy of the final model only
    cmd = _compare_cmd(protocol + arms + _schedule_flags(args.tiny), main, flags)
    record["command"] = shlex.join(cmd[2:])
    t1 = time.time()
    record["runs_state"] = _run_group(cmd, log, args.deadline - args.reserve_s)
    record["runs_wall_s"] = round(time.time() - t1, 1)
    write()
    # 3. the paired table of the finished runs
    report = subprocess.run(
        [*cmd, "--report-only"], capture_output=True, text=True, timeout=max(args.reserve_s, 5)
    )
    (scratch / "compare_report.txt").write_text(report.stdout + report.stderr)
    summary = _read_json(main / "compare.json")
    record["finished_runs"] = sorted(
        summary.get("run_folders", {}).keys() - set(summary.get("missing", []))
    )
    record["missing_runs"] = summary.get("missing", [])
    write()
    return 0


# --------------------------------------------------------------------------------- summary
def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def parity_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | variant | status | loss rel. diff | grad cosine | L_adv−L_clean eager "
        "| L_adv−L_clean variant | gap rel. diff | δ rel. diff | δ cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('method')} | {r.get('variant')} | {r.get('status')} | "
            f"{gpu_check_graphs.cell(r.get('loss_rel_diff'), '.1e')} | {gpu_check_graphs.cell(r.get('grad_cosine'), '.4f')} | "
            f"{gpu_check_graphs.cell(r.get('gap_eager'), '.4g')} | {gpu_check_graphs.cell(r.get('gap'), '.4g')} | "
            f"{gpu_check_graphs.cell(r.get('gap_rel_diff'), '.2g')} | {gpu_check_graphs.cell(r.get('delta_rel_diff'), '.2g')} | "
            f"{gpu_check_graphs.cell(r.get('delta_cosine'), '.4f')} |"
        )
    return lines


def speed_table(path: Path, tflops: float | None) -> list[str]:
    data = _read_json(path)
    if not data.get("methods"):
        return ["not measured (the part failed or ran out of time before its first method)"]
    lines = [
        f"{data.get('model')}, batch {data.get('batch_size')}, {data.get('image_size')} px, "
        f"amp {data.get('amp')}, channels_last {data.get('channels_last')}, "
        f"{'all methods' if data.get('complete') else 'INCOMPLETE (time box)'}; limit = "
        f"measured bf16 matmul rate ÷ the step's training FLOPs per image",
        "",
        "| method | step ms | images/s | × standard | × FLOPs | limit images/s | % of limit "
        "| peak memory MB | memory × standard |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    batch = data.get("batch_size") or 1
    for label, r in data["methods"].items():
        per_image = r["flops_per_step"] / batch
        limit = tflops * 1e12 / per_image if tflops and per_image else None
        share = 100 * r["images_per_s"] / limit if limit else None
        label += ", captured" if r.get("steps") == "captured" else ""
        lines.append(
            f"| {label} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['ratio_vs_standard']:.2f} | {r['flops_ratio_vs_standard']:.2f} | "
            f"{gpu_check_graphs.cell(limit, '.0f')} | {gpu_check_graphs.cell(share, '.1f')} | {gpu_check_graphs.cell(r.get('peak_mem_mb'), '.0f')} "
            f"| {gpu_check_graphs.cell(r.get('mem_ratio_vs_standard'), '.2f')} |"
        )
    return lines


def _status(scratch: Path) -> dict[str, str]:
    out = {}
    for line in (
        (scratch / "status.txt").read_text().splitlines()
        if (scratch / "status.txt").exists()
        else []
    ):
        name, _, rest = line.partition(": ")
        out[name] = rest
    return out


def summary(args: argparse.Namespace) -> int:
    scratch = Path(args.scratch)
    env = _read_json(scratch / "env.json")
    status = _status(scratch)
    tflops = env.get("bf16_matmul_tflops")
    rows = _jsonl(scratch / "parity.jsonl")
    lines = ["# GPU check", ""]
    lines += ["| part | how it ended |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in status.items()]
    lines += ["", "## a. Environment and parity", "", "```"]
    lines += [(scratch / "env.txt").read_text().rstrip() if (scratch / "env.txt").exists() else ""]
    lines += ["```", ""]
    lines += [f"bf16 matmul ({env.get('bf16_matmul_size')}²): {tflops} TFLOP/s", ""]
    lines += [
        "One training step of ResNet-20 from the same weights, batch and seed, eager fp32 "
        "(TF32 off) against each variant. L_adv − L_clean: the mean adversarial loss minus the "
        "clean loss (TRADES: its KL term); δ: every attack's result (pixel: x_adv − x; "
        "AdvBN: f_adv − f), concatenated.",
        "",
    ]
    lines += parity_table(rows)
    passed = sum(r.get("status") == "pass" for r in rows)
    lines += ["", f"{passed} of {len(rows)} rows pass.", ""]
    graph_rows = _jsonl(scratch / "graphs.jsonl")
    lines += ["### Captured steps (`cuda_graph`) against eager steps, in the trainer", ""]
    lines += [(gpu_check_graphs.__doc__ or "").split("\n\n")[1].replace("\n", " "), ""]
    lines += gpu_check_graphs.graphs_table(graph_rows)
    graphs_passed = sum(r.get("status") == "pass" for r in graph_rows)
    graphs_run = [r for r in graph_rows if not str(r.get("status", "")).startswith("not run")]
    lines += ["", f"{graphs_passed} of {len(graph_rows)} methods pass.", ""]
    lines += ["## b. Speed", ""]
    packing_rows = _jsonl(scratch / "packing.jsonl")
    lines += ["### Several seeds in one process (`standard`, ResNet-20)", ""]
    lines += [(gpu_check_packing.__doc__ or "").split("\n\n")[1].replace("\n", " "), ""]
    lines += [*gpu_check_packing.packing_table(packing_rows), ""]
    for name in ("bench_resnet20.json", "bench_resnet50.json"):
        lines += [f"### `{name}`", "", *speed_table(scratch / name, tflops), ""]
    lines += ["## c. The papers' protocol (ResNet-20, CIFAR-10)", ""]
    rec = _read_json(scratch / "paper.json")
    schedule = (
        "batch 16 on the tiny data, ×0.1 at 1/4 and 3/4 without warm-up (TINY: the plumbing)"
        if "--recipe" not in rec.get("protocol", [])
        else "batch 128, `--recipe afan` (×0.1 at 1/4 and 3/4, 200 warm-up steps)"
    )
    lines += [
        f"Data: {rec.get('data')}. Arms: standard, ALFA and A-FAN with the method options of "
        f"the presets {', '.join(PRESETS.values())} (Table 2 of both papers: PGD-5 on the last "
        "block, α = 0.5/255, unbounded ε for ALFA; k = 3 strengths from [0, α] for A-FAN), "
        f"seeds {rec.get('seeds')}, SGD lr 0.1 momentum 0.9 weight decay 5e-4, {schedule}, "
        "bf16 autocast on CUDA (the trainer's default), test accuracy of the final model only.",
        "",
        f"Command: `advfeat {rec.get('command', '').partition('advfeat.cli ')[2]}`",
        "",
        f"Probe ({rec.get('probe_state')}, {rec.get('probe_wall_s')} s): seconds per step "
        f"{json.dumps(rec.get('probe_step_s'))}, {rec.get('run_overhead_s')} s per run besides "
        f"its steps.",
        "",
        f"**Plan: {rec.get('plan')}.** Runs: {rec.get('runs_state')} after "
        f"{rec.get('runs_wall_s')} s; finished {rec.get('finished_runs')}, not finished "
        f"{rec.get('missing_runs')}.",
        "",
        "Primary: the final model's accuracy on the test set (`clean_acc`). Paired "
        "table (`advfeat compare --report-only`):",
        "",
    ]
    report = scratch / "paper" / "compare.md"
    lines += [report.read_text().rstrip() if report.exists() else "no table (no run finished)"]
    vit = _read_json(scratch / "vit.json")
    vit_report = scratch / "vit" / "compare.md"
    vit_lines = [
        "",
        "## d. A small ViT (docs/results.md section 15)",
        "",
        f"`advfeat {vit.get('command', '').partition('advfeat.cli ')[2]}`: {vit.get('state')} "
        f"after {vit.get('wall_s')} s. No paper claim: an observation.",
        "",
        vit_report.read_text().rstrip() if vit_report.exists() else "no table (no run finished)",
    ]
    lines += [
        "",
        "Claimed (SA %, ResNet-20s on raw CIFAR-10, 200 epochs, checkpoint selected on a 10 % "
        "validation split): ALFA Table 2: standard 91.25, ALFA 92.52 (+1.27); A-FAN Table 2: "
        "baseline 91.25, A-FAN 92.52 (+1.27). Not comparable in level: JPEG CIFAR-10, fewer "
        "epochs, the final model; compare the paired differences.",
        "",
        "Secondary (the papers' selection): not run here, it needs its own runs on 45,000 "
        "images. The trainer records it with `--set val_fraction=0.1 --set select_best=true`: "
        "every epoch is evaluated on the 5,000 held-out images, the best epoch is kept in "
        "`best.pt` and restored at the end, `metrics.json` holds `best_val_acc` and its "
        "`clean_acc` is then the selected checkpoint's test accuracy (the `best_val_acc` row of "
        "the compare table).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines + vit_lines) + "\n")
    # the short table, printed last
    short = ["| part | how it ended | result |", "|---|---|---|"]
    a_text = (
        f"{passed}/{len(rows)} parity rows pass; captured steps: {graphs_passed}/"
        f"{len(graphs_run)} pass ({len(graph_rows) - len(graphs_run)} not run in the time box); "
        f"bf16 matmul {tflops} TFLOP/s"
    )
    b_parts = []
    for name in ("bench_resnet20.json", "bench_resnet50.json"):
        data = _read_json(scratch / name)
        std = (data.get("methods") or {}).get("standard")
        if std:
            b_parts.append(
                f"{data.get('model')}: {len(data['methods'])} methods, standard "
                f"{std['images_per_s']:.0f} img/s"
            )
    b_parts += [
        f"{r['seeds']} seeds packed: {r['packed_speedup']:.2f}x"
        for r in packing_rows
        if "packed_speedup" in r
    ]
    c_text = f"{rec.get('epochs')} epochs; finished {len(rec.get('finished_runs') or [])} runs"
    d_text = f"ViT arms: {vit.get('state', 'not run')}"
    parts = (("a", a_text), ("b", "; ".join(b_parts) or "no rows"), ("c", c_text), ("d", d_text))
    for key, text in parts:
        state = "; ".join(v for k, v in status.items() if k.startswith(key + "_")) or "not run"
        short.append(f"| {key} | {state} | {text} |")
    print("\n".join(short))
    return 0


# ------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="machine, then each variant against eager fp32")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--variants", default="bf16,channels_last,compile")
    p.add_argument("--compile-methods", default="standard,alfa,afan,pgd-at")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--budget-s", type=float, default=45.0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--env", required=True, help="machine JSON")
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.set_defaults(handler=parity)
    q = sub.add_parser("paper", help="probe, plan, runs and paired table")
    q.add_argument("--scratch", required=True)
    q.add_argument("--data", default="data")
    q.add_argument("--shapes", action="store_true", help="use `shapes` even if the zip exists")
    q.add_argument("--device", default="cuda")
    q.add_argument("--deadline", type=float, required=True, help="time.time() to stop by")
    q.add_argument("--reserve-s", type=float, default=20.0, help="kept for stopping and the table")
    q.add_argument("--probe-steps", type=int, default=100)
    q.add_argument("--probe-s", type=float, default=90.0)
    q.add_argument("--jobs", type=int, default=3)
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--max-epochs", type=int, default=200)
    q.add_argument("--tiny", action="store_true")
    q.set_defaults(handler=paper)
    s = sub.add_parser("summary", help="summary.md and the short table")
    s.add_argument("--scratch", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(handler=summary)
    args = parser.parse_args()
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
