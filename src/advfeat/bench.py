"""Time training steps of several methods in one process (``advfeat bench``).

Each method gets a fresh copy of the same initial model, prepared by the method, and a full
training step (method forward, backward, SGD step) on one fixed batch. After ``warmup`` steps
each, the methods are timed in interleaved rounds (A, B, C, A, B, C, ...) so that a drift in the
machine's speed affects them alike; the median step time is reported with its ratio to
``standard`` and the ratio that the method's extra floating-point work predicts (matmul and
convolution FLOPs of one step, forward and backward, counted by ``torch.utils.flop_counter``,
with the weight gradient of a grouped convolution counted per group: :func:`conv_backward_flops`).

Peak memory of one step, above what is resident before it (model, optimizer state, batch):
on CUDA ``torch.cuda.max_memory_allocated`` (reset per method, in the timing process); on CPU
the peak resident set size of a fresh process per method (``VmHWM`` after resetting it through
``/proc/self/clear_refs``), so that memory freed by an earlier method and kept by the allocator
does not hide a later method's peak; that process has glibc serve large blocks from ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so that its resident set follows what is allocated.

Detectors and segmenters (:data:`advfeat.tasks.DETECTORS`, :data:`advfeat.tasks.SEGMENTERS`)
are benchmarked on a batch of the generated ``shapes-det`` / ``shapes-seg`` data through their
task (:mod:`advfeat.tasks`), with the methods that train that task (``standard``, ``alfa``,
``afan``) at their task defaults. A method that fine-tunes a trained model (AdvBN) starts from
the benchmark's base model unless its options name a checkpoint.

Order (``order``): ``"interleaved"`` (default) prepares every method, then times them in
interleaved rounds; ``"sequential"`` prepares and times one method after the other (``standard``
first) and drops each method's step before the next, so that a benchmark stopped part-way keeps
the methods it finished. ``on_rows`` receives the rows measured so far whenever they change
(after each method, or after each round): ``advfeat bench --json`` rewrites its file then.

A method can be benchmarked under several configurations in one run: ``LABEL=METHOD`` names a
configuration, whose options are then set with ``--set LABEL.option=value``. Bench-only
settings per label (:data:`BENCH_SETTINGS`): ``frontier=false`` runs a site inside a residual
block with the full-model fallback (as before frontiers were captured), ``live_site=SITE`` holds
L-ALFA's strengths η one-hot at ``SITE`` (η converged to one live site).

Every step runs as the trainer runs it: the attacks' finiteness checks are left to the caller
(no host read per attack). ``cuda_graph=True`` (CUDA only) times the step captured as one CUDA
graph (:mod:`advfeat.train.graphs`), as ``cuda_graph`` trains it, for each method whose step can
be captured; the others are timed eagerly and their row says why (``steps``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from advfeat.attacks.base import ImageRange, deferred_finite_checks, deferred_image_checks
from advfeat.checkpoint import InitialWeights
from advfeat.errors import AdvfeatError
from advfeat.methods import METHODS, Method, PrepareContext
from advfeat.methods.registry import build_task_method
from advfeat.models import build_model
from advfeat.sites import frontier_capture
from advfeat.tasks import DETECTORS, SEGMENTERS, ClassificationTask, Task, build_task
from advfeat.train.graphs import CapturedStep, CudaGraphs, GraphBackend, use_tensor_learning_rates

__all__ = [
    "BENCH_SETTINGS",
    "ORDERS",
    "BenchResult",
    "MethodSpec",
    "bench_table",
    "conv_backward_flops",
    "count_step_flops",
    "parse_method_specs",
    "run_bench",
]

BENCH_SETTINGS = ("frontier", "live_site")
ORDERS = ("interleaved", "sequential")
"""How the methods are timed (module doc)."""
"""Per-label settings of the benchmark itself (not method options); see the module doc."""


@dataclass
class BenchResult:
    method: str
    step_ms: float
    step_ms_min: float
    step_ms_max: float
    ratio_vs_standard: float
    flops_per_step: float
    flops_ratio_vs_standard: float
    ratio_over_flops_ratio: float
    options: dict[str, Any]
    peak_mem_mb: float | None = None
    mem_ratio_vs_standard: float | None = None
    label: str = ""
    bench_settings: dict[str, Any] = field(default_factory=dict)
    images_per_s: float = 0.0
    steps: str = "eager"
    """``captured`` (one CUDA graph per step) or ``eager`` (and why not captured)."""


@dataclass(frozen=True)
class MethodSpec:
    """One configuration to benchmark: ``label`` (table row), ``method`` (registered name)."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    frontier: bool = True
    live_site: str | None = None


@dataclass(frozen=True)
class _Setup:
    """What every method's step is built from (picklable: CPU memory runs in a subprocess)."""

    model_name: str
    batch_size: int
    image_size: int
    num_classes: int
    seed: int
    device: str
    threads: int
    amp: str | None = None
    channels_last: bool = False
    cuda_graph: bool = False
    model_options: tuple[tuple[str, Any], ...] = ()


def parse_method_specs(
    methods: list[str], options: dict[str, dict[str, Any]] | None = None
) -> list[MethodSpec]:
    """``["standard", "alfa", "bn2=alfa"]`` and ``{label: {option: value}}`` into specs;
    ``standard`` comes first (added when missing). Bench settings are taken out of the options."""
    options = options or {}
    specs: list[MethodSpec] = []
    labels: list[str] = []
    for entry in methods:
        label, _, method = entry.partition("=")
        label, method = label.strip(), (method or label).strip()
        if not label or not method:
            raise AdvfeatError(f"a method is NAME or LABEL=NAME, got {entry!r}")
        METHODS.get(method)  # unknown names list close matches
        if label in labels:
            raise AdvfeatError(f"method label {label!r} is given twice; use LABEL=METHOD")
        labels.append(label)
        opts = dict(options.get(label, {}))
        frontier = opts.pop("frontier", True)
        live_site = opts.pop("live_site", None)
        if not isinstance(frontier, bool):
            raise AdvfeatError(f"{label}.frontier must be true or false, got {frontier!r}")
        if live_site is not None and not isinstance(live_site, str):
            raise AdvfeatError(f"{label}.live_site must be a site name, got {live_site!r}")
        specs.append(MethodSpec(label, method, opts, frontier, live_site))
    unknown = sorted(set(options) - set(labels))
    if unknown:
        raise AdvfeatError(
            f"--set names {', '.join(map(repr, unknown))}, which is not among the benchmarked "
            f"methods {labels}"
        )
    if "standard" not in labels:
        specs.insert(0, MethodSpec("standard", "standard"))
    else:
        specs.sort(key=lambda s: s.label != "standard")
    return specs


def _hold_strengths(method: Method, site: str) -> Callable[[], None]:
    """Set L-ALFA's η one-hot at ``site``; the returned function puts it back after a step."""
    eta = getattr(method, "eta", None)
    sites = getattr(method, "eta_sites", None)
    if not isinstance(eta, torch.Tensor) or sites is None:
        raise AdvfeatError(f"live_site holds L-ALFA's strengths η; method {method.name!r} has none")
    if site not in sites:
        raise AdvfeatError(f"live_site {site!r} is not one of L-ALFA's sites {sites}")
    one_hot = torch.zeros_like(eta.detach())
    one_hot[sites.index(site)] = 1.0

    @torch.no_grad()
    def hold() -> None:
        eta.copy_(one_hot)

    hold()
    return hold


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``--amp`` choices: the step's forward passes run under ``torch.autocast`` with this dtype."""


def _make_step(
    method: Method,
    model: nn.Module,
    x: Any,
    y: Any,
    spec: MethodSpec,
    amp: str | None = None,
    device_type: str = "cpu",
    graphed: bool = False,
) -> Callable[[], None]:
    opt = torch.optim.SGD(method.parameter_groups(model), lr=1e-3, momentum=0.9)
    if graphed:  # the update a captured step runs: fused, the rate in a device tensor
        use_tensor_learning_rates(opt, torch.device(device_type))
    hold = _hold_strengths(method, spec.live_site) if spec.live_site else None

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=AMP_DTYPES[amp])

    # the benchmark draws its images in [0, 1] itself: their range is noted on the device, as
    # in training, so that a pixel attack's step reads nothing and can be captured
    seen = ImageRange(torch.device(device_type))

    def step() -> None:
        with (
            frontier_capture(spec.frontier),
            autocast(),
            deferred_finite_checks(),
            deferred_image_checks(seen),
        ):
            out = method(model, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if hold is not None:
            hold()

    return step


def _task_batch(setup: _Setup, dev: torch.device) -> tuple[Task, nn.Module, Any, Any]:
    """The task, the initial model and one fixed batch on ``dev`` (seeded)."""
    torch.manual_seed(setup.seed)
    name, size, batch = setup.model_name, setup.image_size, setup.batch_size
    if name in DETECTORS or name in SEGMENTERS:
        from advfeat.data import build_dataset

        detection = name in DETECTORS
        bundle = build_dataset(
            "shapes-det" if detection else "shapes-seg",
            n_train=batch,
            n_test=1,
            image_size=size,
            augment=False,
            seed=setup.seed,
        )
        task = build_task(bundle.task, bundle.num_classes)
        model = task.build_model(name, bundle)
        x, y = task.collate([bundle.train[i] for i in range(batch)])
        x, y = task.to_device(x, y, dev)
        return task, model, x, y
    model = build_model(
        name, num_classes=setup.num_classes, image_size=size, **dict(setup.model_options)
    )
    g = torch.Generator().manual_seed(setup.seed)
    x = torch.rand((batch, 3, size, size), generator=g).to(dev)
    y = torch.randint(0, setup.num_classes, (batch,), generator=g).to(dev)
    return ClassificationTask(setup.num_classes), model, x, y


def _build(setup: _Setup, spec: MethodSpec) -> tuple[Callable[[], None], Method]:
    """The training step of ``spec`` on the benchmark's model and batch (seeded)."""
    dev = torch.device(setup.device)
    task, base, x, y = _task_batch(setup, dev)
    method = build_task_method(spec.method, task, **spec.options)
    initial = (
        None
        if method.initial_checkpoint()
        else InitialWeights(base.state_dict(), source="the benchmark's base model")
    )
    shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else tuple(x[0].shape)
    model = method.prepare_with(
        copy.deepcopy(base), PrepareContext(input_shape=shape, initial=initial)
    )
    model = model.to(dev).train()
    if setup.channels_last and isinstance(x, torch.Tensor):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    method.to(dev)
    graphed = setup.cuda_graph and method.capture_refusal() is None
    return _make_step(method, model, x, y, spec, setup.amp, dev.type, graphed), method


def graph_backend(device: torch.device) -> GraphBackend:
    """How ``cuda_graph=True`` captures a step (tests replace it to run on the CPU)."""
    return CudaGraphs(device)


def _captured(
    step: Callable[[], None], method: Method, dev: torch.device
) -> tuple[Callable[[], None], str]:
    """``step`` captured as one CUDA graph (one eager step, capture, one replay), or ``step``
    itself when the method's step cannot be captured; with how it runs."""
    refusal = method.capture_refusal()
    if refusal is not None:
        return step, f"eager ({refusal})"
    captured = CapturedStep(step, graph_backend(dev), warmup=1)
    captured()
    captured()
    if captured.failure is not None:
        return step, f"eager (capture failed: {captured.failure})"
    return captured, "captured"


def conv_backward_flops(
    grad_out_shape: Any,
    x_shape: Any,
    w_shape: Any,
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: Any,
    **_: Any,
) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward convolution's FLOPs once for the input
    gradient and once for the weight gradient (each forward multiply-add ``x·w`` is one
    multiply-add of ``∂x`` and one of ``∂w``), as many times as ``output_mask`` asks.

    ``torch.utils.flop_counter`` counts the weight gradient as a convolution of the input with
    the output gradient over *all* input channels, which for a grouped convolution is ``groups``
    times the real work (960× for a depthwise layer of MobileNetV3's last stage); for
    ``groups == 1`` the two counts are equal.
    """
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_step_flops(step: Callable[[], None]) -> float:
    """Matmul and convolution FLOPs of one call of ``step`` (forward and backward), as
    ``torch.utils.flop_counter`` counts them but with :func:`conv_backward_flops`."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------ peak memory


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_peak_mb(setup: _Setup, spec: MethodSpec, warmup: int) -> float | None:
    """Peak resident memory of one step above the resident memory before it (in a fresh
    process: run by :func:`_cpu_peak_in_subprocess`). ``None`` where Linux's counters are
    not available."""
    torch.set_num_threads(setup.threads)
    step, _ = _build(setup, spec)
    for _ in range(max(warmup, 1)):  # one-time allocations: optimizer state, traces
        step()
    _release_free_memory()
    try:
        before = _proc_status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        step()
        peak = _proc_status_kb("VmHWM")
    except OSError:
        return None
    return max(peak - before, 0) / 1024


# glibc: large blocks always come from (and go back to) mmap, so that the resident set follows
# what is allocated instead of what the allocator keeps cached (in the measuring process only)
_EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _cpu_peak_in_subprocess(setup: _Setup, spec: MethodSpec, warmup: int) -> float | None:
    ctx = multiprocessing.get_context("spawn")
    saved = {k: os.environ.get(k) for k in _EXACT_MALLOC}
    os.environ.update(_EXACT_MALLOC)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(_cpu_peak_mb, setup, spec, warmup).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cuda_peak_mb(step: Callable[[], None], dev: torch.device) -> float:
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - before) / 2**20


# ------------------------------------------------------------------------------------ run


def run_bench(
    methods: list[str] | list[MethodSpec],
    *,
    model_name: str = "resnet20",
    batch_size: int = 128,
    iters: int = 10,
    warmup: int = 2,
    image_size: int = 32,
    num_classes: int = 10,
    device: str = "cpu",
    seed: int = 0,
    method_options: dict[str, dict[str, Any]] | None = None,
    memory: bool = True,
    amp: str | None = None,
    channels_last: bool = False,
    progress: Callable[[str], None] | None = None,
    order: str = "interleaved",
    on_rows: Callable[[list[BenchResult]], None] | None = None,
    cuda_graph: bool = False,
    model_options: dict[str, Any] | None = None,
) -> list[BenchResult]:
    """Benchmark ``methods`` (``standard`` is added first when missing) and return one row each.

    ``methods`` are names or ``LABEL=NAME`` (options per label in ``method_options``), or
    :class:`MethodSpec` objects. ``memory=False`` skips the peak-memory measurement.
    ``amp="bf16"`` runs the forward passes under autocast; ``channels_last`` converts the model
    and the batch to that memory format. ``order``, ``on_rows`` and ``cuda_graph``: see the
    module doc. ``model_options`` go to :func:`advfeat.models.build_model` (``depth=2``).
    """
    if order not in ORDERS:
        raise AdvfeatError(f"order must be one of {list(ORDERS)}, got {order!r}")
    if amp is not None and amp not in AMP_DTYPES:
        raise AdvfeatError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    if iters <= 0 or warmup < 0 or batch_size <= 0:
        raise AdvfeatError(
            f"iters and batch size must be positive, warmup >= 0 (got {iters}, {batch_size}, {warmup})"
        )
    given = [m for m in methods if isinstance(m, MethodSpec)]
    specs: list[MethodSpec]
    if given and len(given) == len(methods):
        specs = [s for s in given if s.label == "standard"] or [MethodSpec("standard", "standard")]
        specs += [s for s in given if s.label != "standard"]
    else:
        specs = parse_method_specs([str(m) for m in methods], method_options)
    setup = _Setup(
        model_name,
        batch_size,
        image_size,
        num_classes,
        seed,
        device,
        torch.get_num_threads(),
        amp,
        channels_last,
        cuda_graph,
        tuple(sorted((model_options or {}).items())),
    )
    dev = torch.device(device)
    labels = [s.label for s in specs]
    steps: dict[str, Callable[[], None]] = {}
    flops: dict[str, float] = {}
    used: dict[str, dict[str, Any]] = {}
    peak: dict[str, float | None] = dict.fromkeys(labels)
    times: dict[str, list[float]] = {n: [] for n in labels}
    how: dict[str, str] = dict.fromkeys(labels, "eager")

    def prepare(spec: MethodSpec) -> None:
        step, method = _build(setup, spec)
        steps[spec.label] = step
        used[spec.label] = {k: v for k, v in asdict(method.opts).items() if k != "init_checkpoint"}
        flops[spec.label] = count_step_flops(step)
        for _ in range(warmup):
            step()
        if memory and dev.type == "cuda":
            peak[spec.label] = _cuda_peak_mb(step, dev)
        if cuda_graph:
            steps[spec.label], how[spec.label] = _captured(step, method, dev)
        if progress:
            progress(f"prepared {spec.label}")

    def time_step(label: str) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        steps[label]()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times[label].append(time.perf_counter() - start)

    def cpu_peak(spec: MethodSpec) -> None:
        if memory and dev.type != "cuda":
            peak[spec.label] = _cpu_peak_in_subprocess(setup, spec, warmup)
            if progress:
                progress(f"peak memory of {spec.label}: {peak[spec.label]} MB")

    def report(done: list[MethodSpec]) -> None:
        if on_rows is not None:
            on_rows(_results(done, times, flops, used, peak, batch_size, how))

    if order == "sequential":
        for i, spec in enumerate(specs):
            prepare(spec)
            for _ in range(iters):
                time_step(spec.label)
            steps.clear()  # the next method starts from what is resident before a step
            gc.collect()
            cpu_peak(spec)
            if progress:
                progress(f"timed {spec.label} ({i + 1}/{len(specs)})")
            report(specs[: i + 1])
        return _results(specs, times, flops, used, peak, batch_size, how)
    for spec in specs:
        prepare(spec)
    for r in range(iters):
        for label in labels:
            time_step(label)
        if progress:
            progress(f"round {r + 1}/{iters}")
        report(specs)
    steps.clear()
    if memory and dev.type != "cuda":
        for spec in specs:
            cpu_peak(spec)
        report(specs)
    return _results(specs, times, flops, used, peak, batch_size, how)


def _results(
    specs: list[MethodSpec],
    times: dict[str, list[float]],
    flops: dict[str, float],
    used: dict[str, dict[str, Any]],
    peak: dict[str, float | None],
    batch_size: int,
    how: dict[str, str],
) -> list[BenchResult]:
    ref_ms = statistics.median(times["standard"]) * 1e3
    ref_mem = peak["standard"]
    results = []
    for spec in specs:
        label = spec.label
        ms = statistics.median(times[label]) * 1e3
        flops_ratio = flops[label] / flops["standard"]
        ratio = ms / ref_ms
        mem = peak[label]
        mem_ratio = None if mem is None or not ref_mem else round(mem / ref_mem, 3)
        settings: dict[str, Any] = {}
        if not spec.frontier:
            settings["frontier"] = False
        if spec.live_site:
            settings["live_site"] = spec.live_site
        results.append(
            BenchResult(
                method=spec.method,
                step_ms=round(ms, 2),
                step_ms_min=round(min(times[label]) * 1e3, 2),
                step_ms_max=round(max(times[label]) * 1e3, 2),
                ratio_vs_standard=round(ratio, 3),
                flops_per_step=flops[label],
                flops_ratio_vs_standard=round(flops_ratio, 3),
                ratio_over_flops_ratio=round(ratio / flops_ratio, 3),
                options=used[label],
                peak_mem_mb=None if mem is None else round(mem, 1),
                mem_ratio_vs_standard=mem_ratio,
                label=label,
                bench_settings=settings,
                images_per_s=round(batch_size / (ms / 1e3), 1),
                steps=how[label],
            )
        )
    return results


def bench_table(results: list[BenchResult]) -> str:
    """Markdown table of a benchmark."""
    lines = [
        "| method | step ms (median) | images/s | × standard | × predicted by FLOPs "
        "| measured / predicted | peak memory MB | memory × standard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r.label if r.label in ("", r.method) else f"{r.label} ({r.method})"
        name += ", captured" if r.steps == "captured" else ""
        mem = "n/a" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
        mem_ratio = "n/a" if r.mem_ratio_vs_standard is None else f"{r.mem_ratio_vs_standard:.2f}"
        lines.append(
            f"| {name or r.method} | {r.step_ms:.1f} | {r.images_per_s:.0f} | "
            f"{r.ratio_vs_standard:.2f} | "
            f"{r.flops_ratio_vs_standard:.2f} | {r.ratio_over_flops_ratio:.2f} | {mem} | "
            f"{mem_ratio} |"
        )
    return "\n".join(lines)
