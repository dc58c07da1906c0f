"""Run evaluation suites on any classifier, detector or segmenter and write JSON, a Markdown
report and plots.

Two entry points:

* :func:`evaluate` — a user's own ``nn.Module`` (images in [0, 1] in, logits out) on a dataset::

      from advfeat.eval import evaluate
      results = evaluate(model, bundle, suites=["clean", "attacks"], max_images=500)
      results["suites"]["attacks"]["pgd"]["accuracy"]

* :func:`evaluate_checkpoint` — a run written by ``advfeat train`` (what ``advfeat eval`` calls).

Detection and segmentation models are evaluated through their task
(:class:`~advfeat.tasks.DetectionTask` / :class:`~advfeat.tasks.SegmentationTask`): pass a
detection / segmentation ``DatasetBundle`` (its task is built), a
:class:`~advfeat.eval.loading.DenseEvalData`, or a ``Dataset`` with ``task=...``. Their suites
are ``clean``, ``attacks`` and ``shift`` (AP / mIoU), with A-FAN's PGD-10 protocol as default
(:meth:`EvalConfig.for_task`).

The model is put in eval mode for the evaluation and every module's flag is restored afterwards.
With ``out=FILE.json`` every finished unit of work is saved atomically to ``FILE.json.partial``;
``resume=True`` reuses it when the settings are the same, so an interrupted evaluation continues
where it stopped. Results are deterministic for a given ``seed``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from advfeat.checkpoint import atomic_write_json, atomic_write_text
from advfeat.data import DatasetBundle
from advfeat.errors import AdvfeatError
from advfeat.eval.accuracy import eval_mode
from advfeat.eval.config import DEFAULT_SUITES, EvalConfig, check_task
from advfeat.eval.context import EvalContext, EvalData, PartialStore
from advfeat.eval.folders import ImageFolderDomain
from advfeat.eval.loading import DenseEvalData, eval_data, load_run
from advfeat.eval.plots import load_history, plot_all
from advfeat.eval.preflight import announce, missing_packages
from advfeat.eval.report import markdown_report
from advfeat.eval.suites import SUITES, chosen_suites, ordered_suites, split_options, suite_options
from advfeat.eval.trajectories import eta_trajectories
from advfeat.tasks import DenseTask, Task, is_classifier_task

__all__ = [
    "RESULT_FORMAT",
    "environment",
    "evaluate",
    "evaluate_checkpoint",
    "partial_path",
    "resume_key",
]

RESULT_FORMAT = "advfeat-eval/1"


def partial_path(out: str | Path) -> Path:
    """Where the partial results of ``out`` are kept while it runs."""
    p = Path(out)
    return p.with_name(p.name + ".partial")


def resume_key(cfg: EvalConfig, run_info: dict[str, Any] | None, data: EvalData) -> str:
    """What partial results are keyed by: the evaluation settings, the evaluated weights (the
    checkpoint's digest) and the data, so ``--resume`` never reuses another model's results."""
    import hashlib

    identity = {
        "config": cfg.fingerprint(),
        "run": {k: v for k, v in (run_info or {}).items() if k != "checkpoint"},
        "data": [type(data.test).__name__, len(data.test), data.num_classes],  # type: ignore[arg-type]
        "shifted": sorted(data.shifted),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    from advfeat.eval.autoattack import autoattack_backend
    from advfeat.version import __version__

    env: dict[str, Any] = {
        "advfeat": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "imagecorruptions": _version("imagecorruptions-imaug") or _version("imagecorruptions"),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    backend = autoattack_backend()
    if backend is not None:
        env["autoattack_backend"] = f"{backend} {_version(backend) or ''}".strip()
    return env


def _as_data(
    dataset: DatasetBundle | EvalData | Dataset,
    model: nn.Module,
    device: torch.device,
    task: Task | None = None,
) -> EvalData:
    if task is not None and not isinstance(task, Task):
        raise AdvfeatError(
            "task must be an advfeat Task (advfeat.tasks: ClassificationTask, DetectionTask, "
            f"SegmentationTask), got {type(task).__name__}"
        )
    if isinstance(dataset, EvalData):
        if task is not None and dataset.task is not task:
            raise AdvfeatError("pass the task inside EvalData(task=...) or with a Dataset")
        return dataset
    if isinstance(dataset, DatasetBundle):
        return eval_data(dataset, task)
    if not isinstance(dataset, Dataset):
        raise AdvfeatError(
            "dataset must be an advfeat DatasetBundle, an EvalData or a torch Dataset of "
            f"(image, label) pairs, got {type(dataset).__name__}"
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise AdvfeatError("the dataset is empty")
    if isinstance(task, DenseTask):  # targets are boxes or masks: the task knows the classes
        return DenseEvalData(test=dataset, num_classes=task.num_classes, task=task)
    image, _ = dataset[0]
    with torch.no_grad(), eval_mode(model):
        classes = int(model(image[None].to(device)).shape[1])
    data = EvalData(test=dataset, num_classes=classes, image_size=int(image.shape[-1]))
    return data if task is None else replace(data, task=task)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _add_domains(data: EvalData, domains: dict[str, str] | None) -> EvalData:
    if not domains:
        return data
    shifted = dict(data.shifted)
    for name, path in domains.items():
        if name in shifted:
            raise AdvfeatError(f"domain name {name!r} is already taken; choose another NAME=PATH")
        shifted[name] = ImageFolderDomain(path, data.class_names, data.image_size)
    return replace(data, shifted=shifted)


def _check_dense_extras(task: str, **given: Any) -> None:
    """Surrogates, mCE baselines and image-folder domains are for classifiers only."""
    if is_classifier_task(task):
        return
    for name, value in given.items():
        if value:
            raise AdvfeatError(
                f"{name} applies to classification models only; a {task} model is evaluated "
                "with the suites clean, attacks and shift"
            )


def _check_ready(cfg: EvalConfig, *, plots: bool = False) -> None:
    """Fail before any work when an asked-for optional package is missing (each chosen suite
    says which it needs, :func:`advfeat.eval.preflight.missing_packages`)."""
    missing = missing_packages(cfg, plots=plots)
    if missing:
        raise AdvfeatError("; ".join(missing))


def _load_baseline(baseline: Any, device: torch.device) -> tuple[Any, str | None]:
    """An eval JSON (dict), a model to evaluate, or None; and a label for the results."""
    if baseline is None or isinstance(baseline, (dict, nn.Module)):
        return baseline, None if baseline is None else "given"
    path = Path(baseline)
    if not path.is_file():
        raise AdvfeatError(f"baseline {str(path)!r} does not exist (an eval JSON or a checkpoint)")
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text()), str(path)
        except json.JSONDecodeError as err:
            raise AdvfeatError(f"baseline {str(path)!r} is not valid JSON ({err})") from None
    return load_run(path, device=device).model, str(path)


def _load_surrogate(surrogate: Any, device: torch.device) -> tuple[nn.Module | None, str | None]:
    if surrogate is None or isinstance(surrogate, nn.Module):
        return surrogate, None if surrogate is None else "given model"
    return load_run(surrogate, device=device).model, str(surrogate)


def evaluate(
    model: nn.Module,
    dataset: DatasetBundle | EvalData | Dataset,
    suites: Iterable[str] | str = DEFAULT_SUITES,
    *,
    config: EvalConfig | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    raw_model: nn.Module | None = None,
    surrogate: nn.Module | str | Path | None = None,
    baseline: dict[str, Any] | nn.Module | str | Path | None = None,
    domains: dict[str, str] | None = None,
    run_info: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    report: bool = True,
    plots: bool = True,
    task: Task | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` (images in [0, 1] → logits) on ``dataset`` with the named suites.

    Args:
        dataset: a :class:`~advfeat.data.DatasetBundle` (test, train and shifted domains), an
            :class:`EvalData` (:class:`~advfeat.eval.loading.DenseEvalData` for detection /
            segmentation), or a plain test ``Dataset`` of ``(image, label)`` (of
            ``(image, target)`` with ``task``).
        suites: names from :data:`advfeat.eval.SUITES` (``clean``, ``attacks``, ``corruptions``,
            ``shift``, ``bn``, ``divergence``, ``hessian``, ``features``, ``landscape``,
            ``advbn``; ``all``); detection and
            segmentation take ``clean``, ``attacks``, ``shift``.
        config / options: an :class:`EvalConfig`, or its fields as keywords
            (``max_images=500``, ``eps=8/255``, ``corruptions=["fog"]``, ...). Unset options of
            a detection / segmentation evaluation follow A-FAN (:meth:`EvalConfig.for_task`).
        out: write the results JSON there, with a Markdown report and PNG plots beside it.
        resume: reuse the partial results of an interrupted run with the same settings.
        surrogate: model (or checkpoint path) for the black-box transfer attack.
        baseline: eval JSON, checkpoint path or model normalising the corruption error (mCE).
        domains: extra shifted domains, ``{name: image folder}``.
        task: the :class:`~advfeat.tasks.Task` that evaluates ``model`` (a
            :class:`~advfeat.tasks.DetectionTask` / :class:`~advfeat.tasks.SegmentationTask` for a
            plain ``Dataset`` of dense targets; default: a bundle's own task, classification
            for a plain ``Dataset``).

    Returns the results (the JSON written to ``out``).
    """
    if config is not None and options:
        raise AdvfeatError("pass either config=EvalConfig(...) or keyword options, not both")
    dev = torch.device(device) if device is not None else _device_of(model)
    model.to(dev)
    data = _as_data(dataset, model, dev, task)
    kind = check_task(data.task_name)
    _check_dense_extras(kind, surrogate=surrogate, baseline=baseline, domains=domains)
    names = chosen_suites(suites, kind)
    shared, per_suite = split_options(options)
    cfg = (
        EvalConfig.for_task(kind, suites=names, **shared)
        if config is None
        else config.replace(suites=names, task=kind)
    )
    cfg.suite_options = suite_options({**cfg.suite_options, **per_suite}, kind)
    data = _add_domains(data, domains)
    _check_ready(cfg, plots=plots and out is not None)
    surrogate_model, surrogate_label = _load_surrogate(surrogate, dev)
    baseline_value, baseline_label = _load_baseline(baseline, dev)
    if surrogate_label:
        cfg.extra["surrogate"] = surrogate_label
    if baseline_label:
        cfg.extra["baseline"] = baseline_label
    key = resume_key(cfg, run_info, data)
    store = PartialStore(partial_path(out) if out else None, key, resume=resume)
    ctx = EvalContext(
        model,
        data,
        cfg,
        device=dev,
        store=store,
        progress=progress,
        raw_model=raw_model,
        surrogate=surrogate_model,
        baseline=baseline_value,
    )
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with ExitStack() as stack:
        for m in {id(x): x for x in (model, raw_model, surrogate_model) if x is not None}.values():
            stack.enter_context(eval_mode(m))
        if progress:
            announce(ctx)
        for name in cfg.suites:
            t0 = time.perf_counter()
            results[name] = SUITES.get(name).run(ctx)
            timings[name] = round(time.perf_counter() - t0, 3)
    output: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": dict(run_info or {"model": type(model).__name__}),
        "data": {
            "task": kind,
            "num_classes": data.num_classes,
            "test_size": len(data.test),  # type: ignore[arg-type]
            "shifted_domains": sorted(data.shifted),
        },
        "config": cfg.to_dict(),
        "environment": environment(dev),
        "suites": results,
        "timing_s": {**timings, "total": round(time.perf_counter() - started, 3)},
        "reused_units": store.reused,
        "resume_key": key,
    }
    if run_dir is not None:
        eta = eta_trajectories(load_history(run_dir))
        if eta:
            output["training"] = {"eta": eta}
    if out is not None:
        write_outputs(output, out, run_dir=run_dir, report=report, plots=plots)
        store.discard()
    return output


def write_outputs(
    results: dict[str, Any],
    out: str | Path,
    *,
    run_dir: str | Path | None = None,
    report: bool = True,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``results`` to ``out`` (JSON), ``<stem>.md`` and ``<stem>_plots/*.png`` beside it."""
    out = Path(out)
    written: dict[str, Path] = {}
    images: dict[str, Path] = {}
    if plots:
        folder = out.with_name(out.stem + "_plots")
        images = plot_all(results, folder, ordered_suites(), run_dir=run_dir)
        results["plots"] = {k: str(v.relative_to(out.parent)) for k, v in images.items()}
    atomic_write_json(out, results)
    written["json"] = out
    if report:
        md = out.with_suffix(".md")
        atomic_write_text(md, markdown_report(results, ordered_suites()))
        written["report"] = md
    written.update(images)
    return written


def evaluate_checkpoint(
    checkpoint: str | Path,
    suites: Iterable[str] | str = DEFAULT_SUITES,
    *,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    dataset_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a checkpoint written by ``advfeat train`` (see :func:`evaluate` for the rest).

    Detection and segmentation runs are evaluated with their task (AP / mIoU).
    """
    run = load_run(
        checkpoint,
        device=device,
        model_name=model_name,
        dataset=dataset,
        data_dir=data_dir,
        dataset_options=dataset_options,
    )
    kwargs.setdefault("run_dir", run.run_dir)
    return evaluate(
        run.model,
        run.data,
        suites,
        device=device,
        raw_model=run.raw_model,
        run_info=run.info,
        task=run.task,
        **kwargs,
    )
