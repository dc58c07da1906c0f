"""Export a trained run as the model people deploy and share: plain weights, a model card, and
RobustBench's ``model_info`` JSON.

The exported model is what ``advfeat eval`` evaluates (``method.eval_model``): auxiliary BN
branches stripped (the evaluated branch only: the main one unless the method's ``eval_branch``
says otherwise, AdvProp Sec. 4.3; an AFA stage-I run keeps its ``eval_branch``, by default
``eps0``, the clean BN_0), the original architecture's state_dict keys (a torchvision / timm
model exports torchvision's / timm's keys), and the input normalization *persisted* as two extra
entries, ``normalize.mean`` and ``normalize.std`` (shape ``C×1×1``), so the weights carry their
own preprocessing. It takes images in [0, 1] and returns logits: the contract of
``robustbench.eval.benchmark``.

An AFA stage-II run is the one exception: its model mixes two BN branches per sample with a
weight generator, which no stock architecture does. It is exported as what it is, an
:class:`~advfeat.norm.AdaptiveFeatureAlignment` (keys ``model.*``: the stock backbone with every
BN layer as ``first`` / ``last``, BN_0 and BN_{K−1}; ``generator.*``: the weight generator;
normalization as ``model.normalize.mean`` / ``model.normalize.std``). ``export.json``'s
``contents`` says which of the two an export holds (``kind``: ``stock`` or ``afa-stage2``) and
how to rebuild it; :func:`build_exported` rebuilds and loads either.

Formats:

- ``state_dict``: ``model.pt``, a dict of tensors (``torch.load(..., weights_only=True)``);
- ``safetensors``: ``model.safetensors`` (optional package ``safetensors``), the same tensors;
- ``torchscript``: ``model.torchscript.pt``, the whole model traced with its normalization
  (``torch.jit.load`` needs neither advfeat nor the architecture's source).

To load the weights without advfeat: pop ``normalize.mean`` / ``normalize.std``, load the rest
into the architecture (``strict=True``) and feed it ``(x - mean) / std``; with advfeat,
:func:`load_exported` does it, and :func:`build_exported` builds the architecture too.
``export.json`` records how the architecture was built (e.g. the 3×3 stride-1 stem without
max-pool that torchvision ResNets get for images of at most 64 px).
"""

from __future__ import annotations

import copy
import json
import platform
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.models.normalize import Normalize

__all__ = [
    "FORMATS",
    "KINDS",
    "ExportedRun",
    "build_exported",
    "deployable",
    "export_run",
    "load_exported",
    "load_exported_state",
    "model_card",
    "robustbench_model_info",
    "save_weights",
]

FORMATS = ("state_dict", "safetensors", "torchscript")
WEIGHT_FILES = {
    "state_dict": "model.pt",
    "safetensors": "model.safetensors",
    "torchscript": "model.torchscript.pt",
}
NORMALIZE_KEYS = ("normalize.mean", "normalize.std")
STOCK, AFA_STAGE2 = "stock", "afa-stage2"
KINDS = (STOCK, AFA_STAGE2)
"""What an export holds: the stock architecture, or AFA's stage-II model (not a stock one)."""
SAFETENSORS_HINT = "the safetensors format needs the package safetensors: pip install safetensors"


def deployable(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy of ``model`` with one BN branch and persistent normalization
    (``normalize.mean`` / ``normalize.std`` in its state_dict).

    A multi-branch model keeps its main branch; a :class:`~advfeat.norm.BranchModel` (AFA stage
    I) becomes the plain model with its branch in every BN layer. An AFA stage-II model
    (:class:`~advfeat.norm.AdaptiveFeatureAlignment`) stays one: its backbone's normalization
    persists (``model.normalize.mean`` / ``model.normalize.std``).
    """
    from advfeat.norm import BranchModel, has_branches, strip_branches

    deployed = copy.deepcopy(model).cpu().eval()
    branch = None
    if isinstance(deployed, BranchModel):
        branch, deployed = deployed.branch, deployed.model
    if has_branches(deployed):
        deployed = strip_branches(deployed, keep=branch, inplace=True)
    owner, _ = _normalize_owner(deployed)
    old = getattr(owner, "normalize", None)
    if not isinstance(old, Normalize):
        raise AdvfeatError(
            f"{type(model).__name__} has no advfeat Normalize child 'normalize'; export models "
            "built by advfeat.build_model or trained by advfeat train"
        )
    owner._modules["normalize"] = Normalize(old.mean.flatten(), old.std.flatten(), persistent=True)
    for p in deployed.parameters():
        p.requires_grad_(False)
    return deployed.eval()


def _normalize_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module whose child ``normalize`` preprocesses ``model``'s input, and its key prefix
    (the backbone, ``model.``, of an AFA stage-II model; else ``model`` itself)."""
    from advfeat.norm import AdaptiveFeatureAlignment

    if isinstance(model, AdaptiveFeatureAlignment):
        return model.model, "model."
    return model, ""


def _plain_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(
    model: nn.Module,
    path: str | Path,
    fmt: str,
    *,
    metadata: Mapping[str, str] | None = None,
    example: Tensor | None = None,
) -> Path:
    """Write a :func:`deployable` model in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise unknown_name("export format", fmt, FORMATS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        torch.save(_plain_tensors(model), path)
    elif fmt == "safetensors":
        save_file = _safetensors().save_file
        save_file(_plain_tensors(model), str(path), metadata=dict(metadata or {}))
    else:
        if example is None:
            raise AdvfeatError("the torchscript format traces the model: give an example batch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(path))  # type: ignore[no-untyped-call]
    return path


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError:
        raise AdvfeatError(SAFETENSORS_HINT) from None
    return st


def load_exported_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an exported ``model.pt`` or ``model.safetensors``."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return dict(_safetensors().load_file(str(p)))
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise AdvfeatError(f"{str(p)!r} holds no state dict")
    return state


def load_exported(model: nn.Module, path: str | Path | Mapping[str, Tensor]) -> nn.Module:
    """Load exported weights into a fresh advfeat model (``build_model``, or the AFA stage-II
    model that :func:`build_exported` builds), strictly, with the exported normalization. Works
    in place and returns ``model``."""
    state = dict(path) if isinstance(path, Mapping) else load_exported_state(path)
    owner, prefix = _normalize_owner(model)
    keys = [prefix + k for k in NORMALIZE_KEYS]
    missing = [k for k in keys if k not in state]
    if missing:
        raise AdvfeatError(f"the exported weights lack {missing}; export them with advfeat export")
    mean, std = state.pop(keys[0]), state.pop(keys[1])
    if not isinstance(getattr(owner, "normalize", None), Normalize):
        raise AdvfeatError("load_exported needs a model built by advfeat.build_model")
    reference = next(model.parameters(), mean)
    owner._modules["normalize"] = Normalize(mean.flatten(), std.flatten()).to(reference.device)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AdvfeatError(
            f"the exported weights do not fit {type(model).__name__}: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model


def _versions(model_name: str) -> dict[str, str | None]:
    import importlib.metadata as md

    from advfeat.version import __version__

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    out: dict[str, str | None] = {
        "advfeat": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
    }
    if model_name.startswith("timm:"):
        out["timm"] = version("timm")
    return out


@dataclass
class ExportedRun:
    """What :func:`export_run` wrote (paths) and the facts it recorded (``info``)."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _architecture(cfg: Any, data: Any, model: nn.Module) -> dict[str, Any]:
    """How to rebuild the exported architecture (``export.json``)."""
    from torchvision import models as tv_models

    arch: dict[str, Any] = {
        "name": cfg.model,
        "num_classes": int(data.num_classes),
        "image_size": int(data.image_size),
        "model_options": dict(cfg.model_options),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
    }
    if isinstance(model, tv_models.ResNet):
        small_stem = isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)
        arch["cifar_stem"] = small_stem
        if small_stem:
            arch["rebuild"] = (
                "torchvision.models.NAME(num_classes=N); then conv1 = Conv2d(3, 64, 3, stride=1, "
                "padding=1, bias=False) and maxpool = Identity()"
            )
    return arch


def _kept_branch(rebuilt: Any, branches: list[str]) -> str:
    """The BN branch of a multi-branch run that its evaluated model uses in every BN layer."""
    from advfeat.methods.registry import METHODS
    from advfeat.norm import BranchModel

    if isinstance(rebuilt.model, BranchModel):
        return str(rebuilt.model.branch)
    cfg = rebuilt.config
    options = METHODS.get(cfg.method).parse_options(dict(cfg.method_options))
    chosen = getattr(options, "eval_branch", None)  # AdvProp, Fast AdvProp, AdvBN
    return chosen if isinstance(chosen, str) and chosen in branches else branches[0]


def _generator_spec(generator: nn.Module) -> dict[str, Any]:
    """The :class:`~advfeat.norm.WeightGenerator` arguments that rebuild ``generator``."""
    from advfeat.norm import WeightGenerator

    if not isinstance(generator, WeightGenerator):
        raise AdvfeatError(
            f"the AFA weight generator is a {type(generator).__name__}; advfeat export rebuilds "
            "advfeat's WeightGenerator only"
        )
    conv = next(m for m in generator.features.modules() if isinstance(m, nn.Conv2d))
    hidden = next(m for m in generator.head if isinstance(m, nn.Linear))
    return {
        "in_channels": generator.in_channels,
        "out_features": generator.out_features,
        "channels": conv.out_channels,
        "hidden": hidden.out_features,
        "final_relu": isinstance(list(generator.head)[-1], nn.ReLU),
    }


def _contents(rebuilt: Any, deployed: nn.Module) -> dict[str, Any]:
    """What the export holds (``export.json``'s ``contents``): its ``kind`` (:data:`KINDS`), a
    one-line ``summary``, the BN branch kept (multi-branch runs) or, for AFA stage II, what
    rebuilds the fused model (``afa``)."""
    from advfeat.methods.registry import METHODS
    from advfeat.norm import (
        AdaptiveFeatureAlignment,
        BranchNorm,
        afa_branches,
        has_running_statistics,
    )

    cfg = rebuilt.config
    if isinstance(deployed, AdaptiveFeatureAlignment):
        options = METHODS.get(cfg.method).parse_options(dict(cfg.method_options))
        stage1_branches = afa_branches(int(getattr(options, "num_branches", 2)))
        first, last = stage1_branches[0], stage1_branches[-1]
        source = deployed.source
        reads = "the input images" if source is None else f"the output of module {source!r}"
        return {
            "kind": AFA_STAGE2,
            "summary": (
                f"not a stock architecture: AFA stage II, the stock {cfg.model} backbone with a "
                f"dual BN in every BN layer (BN_0 = branch {first}, BN_K-1 = branch {last}, "
                f"mixed per sample by W_0) and the weight generator that computes W_0 from "
                f"{reads}; load it with advfeat.export.build_exported"
            ),
            "normalize_keys": [f"model.{k}" for k in NORMALIZE_KEYS],
            "afa": {
                "first": first,
                "last": last,
                "source": source,
                "per_layer": deployed.weights.per_layer,
                "prefix_weight": deployed.weights.prefix_weight,
                "fused_layers": len(deployed.fused_layers),
                "generator": _generator_spec(deployed.generator),
            },
        }
    contents: dict[str, Any] = {
        "kind": STOCK,
        "summary": f"the stock {cfg.model} (the architecture's own state_dict keys)",
        "normalize_keys": list(NORMALIZE_KEYS),
    }
    layers = [m for m in rebuilt.raw_model.modules() if isinstance(m, BranchNorm)]
    if layers:
        branches = list(layers[0].branches)
        kept = _kept_branch(rebuilt, branches)
        role = "the main branch" if kept == branches[0] else "an auxiliary branch"
        # batch norm only: "BN"; a LayerNorm / GroupNorm model: its normalization layers
        bn = all(has_running_statistics(m) for m in layers)
        where = (
            "BN branch {} ({}) in every BN layer" if bn else "branch {} ({}) in every norm layer"
        )
        contents["summary"] += (
            " with " + where.format(kept, role) + "; the run's other branches "
            f"({', '.join(b for b in branches if b != kept)}) are stripped"
        )
        contents.update(bn_branch=kept, bn_branches=branches)
    return contents


def _exported_architecture(info: dict[str, Any]) -> nn.Module:
    """A fresh model of the architecture ``export.json`` describes (weights not loaded)."""
    from advfeat.models import build_model
    from advfeat.norm import WeightGenerator, convert_branches, to_fused_dual_bn

    arch = info["architecture"]
    options = dict(arch.get("model_options") or {})
    if options.pop("pretrained", False) and "cifar_stem" in arch:  # the export has the weights
        options.setdefault("cifar_stem", arch["cifar_stem"])
    model = build_model(
        arch["name"],
        num_classes=int(arch["num_classes"]),
        image_size=int(arch["image_size"]),
        **options,
    )
    contents = info.get("contents") or {"kind": STOCK}  # exports before "contents" were stock
    kind = contents.get("kind")
    if kind == STOCK:
        return model
    if kind != AFA_STAGE2:
        raise unknown_name("export kind", str(kind), KINDS)
    afa = contents["afa"]
    convert_branches(model, (afa["first"], afa["last"]))
    return to_fused_dual_bn(
        model,
        WeightGenerator(**afa["generator"]),
        source=afa["source"],
        per_layer=afa["per_layer"],
        prefix_weight=afa["prefix_weight"],
    )


def build_exported(folder: str | Path) -> nn.Module:
    """The model of an export folder (:func:`export_run`), in eval mode: the architecture
    ``export.json`` describes (a stock one, or AFA's stage-II model), loaded strictly with its
    ``model.pt`` or ``model.safetensors`` and normalization. It takes images in [0, 1]."""
    folder = Path(folder)
    meta = folder / "export.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdvfeatError(
            f"{str(meta)!r} could not be read ({type(err).__name__}); give the folder that "
            "advfeat export wrote"
        ) from None
    files = info.get("files") or {}
    weights = [folder / files[fmt] for fmt in ("state_dict", "safetensors") if fmt in files]
    if not weights:
        raise AdvfeatError(
            f"{str(folder)!r} holds no weights to load (formats {sorted(files)}); export the run "
            "with --format state_dict or safetensors"
        )
    return load_exported(_exported_architecture(info), weights[0]).eval()


def _metrics(run_dir: Path) -> dict[str, Any]:
    """Metrics of the run folder: ``metrics.json`` (training) and ``eval.json`` if present."""
    found: dict[str, Any] = {}
    for name in ("metrics.json", "eval.json"):
        p = run_dir / name
        if p.is_file():
            try:
                found[name] = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
    return found


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Clean and AutoAttack accuracy (fractions), and the ε and AutoAttack set-up, when known."""
    train = metrics.get("metrics.json", {})
    ev = metrics.get("eval.json", {})
    suites = ev.get("suites", {})
    clean = (suites.get("clean") or {}).get("top1", train.get("clean_acc"))
    attacks = suites.get("attacks") or {}
    aa = attacks.get("autoattack") or {}
    out: dict[str, Any] = {"clean_acc": clean}
    if isinstance(aa, dict) and "accuracy" in aa:
        out["autoattack_acc"] = aa["accuracy"]
        out["autoattack"] = {k: aa.get(k) for k in ("backend", "backend_version", "version")}
    config = ev.get("config") or {}
    eps = config.get("suite_options", {}).get("attacks", {}).get("eps", config.get("eps"))
    if eps is not None:
        out["eps"] = eps
    return out


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.2f}"


def _fraction_255(eps: float | None) -> str:
    if eps is None:
        return ""
    scaled = eps * 255
    return f"{round(scaled)}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{eps:g}"


def robustbench_model_info(info: dict[str, Any]) -> dict[str, Any]:
    """RobustBench's ``model_info`` JSON (the fields of its model claims) from export facts;
    bibliographic fields are left empty for the author to fill."""
    head = info.get("metrics", {})
    dataset = str(info.get("dataset", ""))
    architecture = info["architecture"]["name"]
    if (info.get("contents") or {}).get("kind") == AFA_STAGE2:
        architecture += " with AFA dual BN and weight generator"
    return {
        "link": "",
        "name": "",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": {"cifar10-jpeg": "cifar10"}.get(dataset, dataset),
        "venue": "",
        "architecture": architecture,
        "eps": _fraction_255(head.get("eps")),
        "clean_acc": _percent(head.get("clean_acc")),
        "reported": "",
        "autoattack_acc": _percent(head.get("autoattack_acc")),
        "footnote": (
            f"trained with advfeat {info['versions']['advfeat']} ({info['method']}); "
            + (
                "AutoAttack: " + json.dumps(head["autoattack"], sort_keys=True)
                if "autoattack" in head
                else "no AutoAttack figure in the run folder (run advfeat eval --autoattack)"
            )
        ),
    }


def _loading_lines(arch: dict[str, Any], kind: str) -> list[str]:
    name = arch["name"]
    external = not arch["class"].startswith("advfeat.")  # a torchvision / timm / user class
    lines = ["```python"]
    if kind == AFA_STAGE2:
        lines += [
            "from advfeat.export import build_exported",
            "model = build_exported('.')  # this folder: export.json and model.pt; "
            "model(x), x in [0, 1]",
        ]
    elif external:
        lines += [
            "state = torch.load('model.pt', weights_only=True)  # or safetensors' load_file",
            "mean, std = state.pop('normalize.mean'), state.pop('normalize.std')",
            f"model.load_state_dict(state)  # a fresh {name} (see Architecture), strict",
            "logits = model((x - mean) / std)  # x in [0, 1]",
        ]
    else:
        lines += [
            "import advfeat",
            "from advfeat.export import load_exported",
            f"model = advfeat.build_model({name!r}, num_classes={arch['num_classes']}, "
            f"**{arch['model_options']!r})",
            "load_exported(model, 'model.pt')  # weights and normalization; model(x), x in [0, 1]",
        ]
    lines += [
        "# without any architecture code: torch.jit.load('model.torchscript.pt')(x)",
        "```",
    ]
    return lines


def model_card(info: dict[str, Any]) -> str:
    """A Markdown model card: what the model is, how to load it, its metrics, config, versions."""
    arch = info["architecture"]
    head = info.get("metrics", {})
    contents = info.get("contents") or {}
    kind = contents.get("kind", STOCK)
    mean_key, std_key = contents.get("normalize_keys", NORMALIZE_KEYS)
    lines = [
        f"# {arch['name']} trained with {info['method']} on {info['dataset']}",
        "",
        f"- input: images in [0, 1], {arch['image_size']}×{arch['image_size']} px, NCHW; "
        "output: logits over "
        f"{arch['num_classes']} classes ({', '.join(info['class_names'][:20])})",
        f"- normalization inside the model: mean {info['mean']}, std {info['std']} "
        f"(also in the weights as `{mean_key}` / `{std_key}`)",
        f"- contents: {contents.get('summary', 'the stock architecture')}",
        f"- source checkpoint: `{info['checkpoint']}` (digest {info['checkpoint_digest'][:16]}…), "
        f"epoch {info['epochs_trained']}",
        "",
        "## Loading",
        "",
        *_loading_lines(arch, kind),
        "",
        f"Architecture: `{arch['name']}` ({arch['class']}), options {arch['model_options']}."
        + (f" Rebuild: {arch['rebuild']}." if "rebuild" in arch else ""),
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in head.items():
        lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(info["config"], indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Versions",
        "",
        *[f"- {k}: {v}" for k, v in info["versions"].items()],
        "",
    ]
    return "\n".join(lines)


def export_run(
    checkpoint: str | Path,
    out: str | Path,
    formats: tuple[str, ...] = ("state_dict",),
    *,
    robustbench: bool = False,
) -> ExportedRun:
    """Export the run of ``checkpoint`` (a ``checkpoint.pt`` or its run folder) into ``out``.

    Writes one weight file per format (:data:`FORMATS`), ``export.json`` (contents, architecture,
    classes, normalization, metrics, configuration, versions), ``MODEL_CARD.md`` and, with
    ``robustbench=True``, ``model_info.json``. The training data is not read.
    """
    from advfeat.checkpoint import atomic_write_json, atomic_write_text, checkpoint_digest
    from advfeat.eval.loading import rebuild_model
    from advfeat.tasks import ClassificationTask

    for fmt in formats:
        if fmt not in FORMATS:
            raise unknown_name("export format", fmt, FORMATS)
    if "safetensors" in formats:
        _safetensors()
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    rebuilt = rebuild_model(path)
    if not isinstance(rebuilt.task, ClassificationTask):
        raise AdvfeatError(
            f"advfeat export writes classifiers; this run is a {rebuilt.task.name} model"
        )
    deployed = deployable(rebuilt.model)
    backbone, _ = _normalize_owner(deployed)
    data, cfg = rebuilt.data, rebuilt.config
    info: dict[str, Any] = {
        "format": "advfeat-export/1",
        "checkpoint": str(path),
        "checkpoint_digest": checkpoint_digest(rebuilt.state),
        "epochs_trained": int(rebuilt.state.get("epoch", -1)) + 1,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "class_names": list(data.class_names),
        "mean": [float(v) for v in data.mean],
        "std": [float(v) for v in data.std],
        "contents": _contents(rebuilt, deployed),
        "architecture": _architecture(cfg, data, backbone),
        "metrics": _headline(_metrics(path.parent)),
        "config": cfg.to_dict(),
        "versions": _versions(cfg.model),
    }
    folder = Path(out)
    result = ExportedRun(folder, info=info)
    size = int(data.image_size)
    example = torch.rand(2, len(info["mean"]), size, size)
    described = ("contents", "architecture", "mean", "std")
    metadata = {"advfeat_export": json.dumps({k: info[k] for k in described})}
    for fmt in formats:
        result.files[fmt] = save_weights(
            deployed, folder / WEIGHT_FILES[fmt], fmt, metadata=metadata, example=example
        )
    info["files"] = {fmt: p.name for fmt, p in result.files.items()}
    atomic_write_json(folder / "export.json", info)
    atomic_write_text(folder / "MODEL_CARD.md", model_card(info))
    result.files["export.json"] = folder / "export.json"
    result.files["MODEL_CARD.md"] = folder / "MODEL_CARD.md"
    if robustbench:
        atomic_write_json(folder / "model_info.json", robustbench_model_info(info))
        result.files["model_info.json"] = folder / "model_info.json"
    return result
