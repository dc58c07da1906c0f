"""A run's configuration composed once, from what the user gave, below the command line.

Defaults ← packaged preset ← paper recipe ← config file ← flags ← ``--set`` overrides ← a
comparison arm ← the method: :func:`compose` layers them into one validated
:class:`~advfeat.train.config.TrainConfig`. :func:`plan_training` places the runs of
``advfeat train`` (their run folders, and whether each resumes the saved experiment) and
:func:`compose_comparison` the configurations of every (arm, seed) of a comparison; the command
line only turns its flags into :class:`ConfigSources` and runs what comes back.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from advfeat.data.bundle import fetches_into
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.presets import load_preset
from advfeat.train.build import check_config
from advfeat.train.config import TrainConfig, apply_overrides, load_yaml, parse_override
from advfeat.train.rundir import read_saved_config, resumed_config

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_PRESET",
    "DEFAULT_SEEDS",
    "SCHEDULE_KEYS",
    "ComparisonArm",
    "ConfigSources",
    "PlannedTraining",
    "TrainingPlan",
    "compose",
    "compose_comparison",
    "method_recipe",
    "plan_training",
]

DEFAULT_PRESET = "default"
"""The preset under ``advfeat train`` when no method, preset, config file or dataset is given."""

DEFAULT_METHODS: tuple[str, ...] = ("standard", "afan")
"""Methods trained side by side (same seeds, same data) by ``advfeat train`` without
``--method``: standard training and the method that ``docs/results.md`` supports on this
protocol."""

DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
"""Seeds of the default run: a difference between methods is shown with its seed spread."""

SCHEDULE_KEYS: tuple[str, ...] = (
    "schedule",
    "milestones",
    "gamma",
    "poly_power",
    "warmup_epochs",
    "warmup_steps",
)
"""The config keys that make up a learning-rate schedule: a paper recipe sets all of them."""


@dataclass(frozen=True)
class ConfigSources:
    """What the user gave for a run's configuration, read once (:meth:`read`): each a layer of
    :func:`compose`.

    ``preset`` and ``file`` are the keys of the packaged preset and of the config file (``None``:
    not given), ``flags`` the config keys that command-line flags set (``{"lr": 0.05}``),
    ``overrides`` those of ``--set KEY=VALUE``, ``recipe`` the method whose paper schedule the
    run trains under (``paper``: the run's own method's), ``quiet`` switches progress output off.
    """

    preset: dict[str, Any] | None = None
    file: dict[str, Any] | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    quiet: bool = False

    @classmethod
    def read(
        cls,
        preset: str | None = None,
        file: str | Path | None = None,
        flags: dict[str, Any] | None = None,
        overrides: Sequence[str] = (),
        *,
        recipe: str | None = None,
        quiet: bool = False,
    ) -> ConfigSources:
        """Read preset ``preset``, the YAML ``file`` and the ``KEY=VALUE`` texts ``overrides``."""
        return cls(
            preset=load_preset(preset) if preset else None,
            file=load_yaml(file) if file else None,
            flags=dict(flags or {}),
            overrides=dict(parse_override(o) for o in overrides),
            recipe=recipe,
            quiet=quiet,
        )

    def explicit_keys(self) -> list[str]:
        """The config keys these sources set: flags, overrides, the config file and the preset."""
        return [*self.flags, *self.overrides, *(self.file or {}), *(self.preset or {})]

    def named_method(self) -> str | None:
        """The method the preset, the config file or an override names (in that order), if any."""
        if self.preset is not None:
            return str(self.preset.get("method", "standard"))
        if self.file is not None and "method" in self.file:
            return str(self.file["method"])
        if "method" in self.overrides:
            return str(self.overrides["method"])
        return None

    def for_comparison(self) -> ConfigSources:
        """The protocol these sources describe, without the keys each run of a comparison sets
        itself (method, seed) and without ``quiet`` (a comparison's runs are quiet anyway)."""
        flags = {k: v for k, v in self.flags.items() if k not in ("method", "seed")}
        return ConfigSources(self.preset, self.file, flags, self.overrides, self.recipe)


def compose(
    sources: ConfigSources, method: str | None = None, *, arm: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults ← preset ← recipe ← config file ← flags ← overrides ← ``arm`` (a comparison's
    keys for one run) ← ``method``, validated.

    Without a preset, a method, a config file or a dataset the run starts from the default
    preset (:data:`DEFAULT_PRESET`). A paper recipe (``sources.recipe``) is applied whole: it
    replaces every schedule key (:data:`SCHEDULE_KEYS`) of the preset and the defaults, and a
    config file, override or arm that also sets one is refused, so that no run trains under a mix
    of two schedules. Without a recipe every method trains under the same schedule.
    """
    base = _base_layers(sources)
    user = [*([sources.file] if sources.file is not None else []), sources.flags]
    user += [sources.overrides, *([arm] if arm else [])]
    user += [{"method": method}] if method is not None else []
    cfg = _layered([*base, *user])
    if sources.recipe:
        schedule = _recipe_schedule(sources.recipe, cfg.method, cfg.model, user)
        cfg = _layered([*base, schedule, *user])
    if sources.quiet:
        cfg.progress = False
    _absolute_paths(cfg)
    _check_data_dir(cfg)
    cfg.validate()
    return cfg


def _base_layers(sources: ConfigSources) -> list[dict[str, Any]]:
    """The preset; without one, the default preset unless a method, a config file or a
    dataset is given."""
    if sources.preset is not None:
        return [sources.preset]
    named = sources.flags.get("method") or sources.flags.get("dataset")
    return [] if named or sources.file is not None else [load_preset(DEFAULT_PRESET)]


def _layered(layers: list[dict[str, Any]]) -> TrainConfig:
    """:class:`TrainConfig`'s defaults with ``layers`` set on them in order (copies: a run's
    configuration shares no list or mapping with another's)."""
    cfg = TrainConfig()
    for layer in layers:
        apply_overrides(cfg, copy.deepcopy(layer))
    return cfg


def _recipe_schedule(
    name: str, method: str, model: str, user: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every schedule key, from the recipe of method ``name`` (``paper``: ``method``'s own) where
    it declares one and from :class:`TrainConfig`'s defaults elsewhere."""
    from advfeat.methods import METHODS

    owner = method if name == "paper" else name
    if owner not in METHODS:
        raise unknown_name("--recipe method", owner, METHODS.names())
    recipe = method_recipe(owner, model)
    if not recipe:
        having = [m for m in METHODS.names() if METHODS.get(m).training_recipe]
        raise AdvfeatError(
            f"--recipe {name}: {owner} declares no paper recipe for {model} (detection and "
            f"segmentation recipes are presets); methods with one: {', '.join(having)}"
        )
    mixed = sorted({k.partition(".")[0] for layer in user for k in layer} & set(SCHEDULE_KEYS))
    if mixed:
        raise AdvfeatError(
            f"--recipe {name} sets the whole schedule ({', '.join(SCHEDULE_KEYS)}); it cannot be "
            f"mixed with {', '.join(mixed)} from --config, --set or an arm: drop one or the other"
        )
    defaults = TrainConfig()
    return {key: recipe.get(key, getattr(defaults, key)) for key in SCHEDULE_KEYS}


def method_recipe(name: str, model: str = "") -> dict[str, Any]:
    """The classification training recipe declared by method ``name`` (empty for methods that
    declare none, and for detection / segmentation models, whose papers' recipes are the
    presets)."""
    from advfeat.methods import METHODS
    from advfeat.tasks import DETECTORS, SEGMENTERS

    if name not in METHODS or model in DETECTORS or model in SEGMENTERS:
        return {}
    return dict(METHODS.get(name).training_recipe)


def _absolute_paths(cfg: TrainConfig) -> None:
    """Record checkpoint options and the data folder as absolute paths in the run's config, so
    that the run can be evaluated or resumed from another working directory."""
    for key, value in cfg.method_options.items():
        if key.endswith("checkpoint") and isinstance(value, str) and Path(value).exists():
            cfg.method_options[key] = str(Path(value).resolve())
    if cfg.data_dir is not None and Path(cfg.data_dir).exists():
        cfg.data_dir = str(Path(cfg.data_dir).resolve())


def _check_data_dir(cfg: TrainConfig) -> None:
    """Refuse a ``data_dir`` that does not exist, unless the dataset downloads into it."""
    missing = cfg.data_dir is not None and not Path(cfg.data_dir).exists()
    if missing and not fetches_into(cfg.dataset, str(cfg.data_dir)):
        raise AdvfeatError(f"--data-dir {cfg.data_dir!r} does not exist")


@dataclass(frozen=True)
class PlannedTraining:
    """One run of ``advfeat train``: its configuration, its folder and whether it resumes."""

    config: TrainConfig
    folder: Path
    resume: bool
    finished: bool
    """``--auto-resume`` of a folder whose run has finished: nothing to train."""


@dataclass(frozen=True)
class TrainingPlan:
    """What ``advfeat train`` does: its runs, or (``comparison``) the default comparison of
    these methods × ``seeds`` into ``folder``, on the protocol ``sources`` describe."""

    runs: list[PlannedTraining]
    comparison: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    folder: Path = Path("runs/default")
    sources: ConfigSources = field(default_factory=ConfigSources)


def plan_training(
    sources: ConfigSources,
    *,
    method: str | None = None,
    out: str | None = None,
    resume: bool = False,
    auto_resume: bool = False,
    show_config: bool = False,
) -> TrainingPlan:
    """The runs of ``advfeat train``, each configuration validated and, unless it is only shown
    (``show_config``) or already finished, checked as a run checks it at its start.

    Without a method, the method of the run resumed in ``out``, or the one the preset, config file
    or overrides name; with none of them, :data:`DEFAULT_METHODS` × :data:`DEFAULT_SEEDS` (or the
    ``seed`` flag) trained side by side as a comparison. A resumed run takes the saved
    configuration, with only the keys that do not change the result taken from ``sources``.
    """
    folder = Path(out) if out else None
    methods = [method] if method else _resumed_methods(folder, resume or auto_resume)
    if not methods:
        named = sources.named_method()
        methods = [named] if named is not None else list(DEFAULT_METHODS)
    if len(methods) > 1 and not show_config:  # composed and checked run by run in the comparison
        seed = sources.flags.get("seed")
        return TrainingPlan(
            runs=[],
            comparison=methods,
            seeds=[seed] if seed is not None else list(DEFAULT_SEEDS),
            folder=folder or Path("runs/default"),
            sources=sources.for_comparison(),
        )
    configs = [compose(sources, m) for m in methods]
    runs = []
    for cfg in configs:
        run_folder = _run_folder(cfg, folder, len(configs))
        planned = _planned(sources, cfg, run_folder, resume, auto_resume)
        runs.append(planned)
    if not show_config:
        for planned in runs:  # what each run checks at its start, before any run starts
            if not planned.finished:
                check_config(planned.config)
    return TrainingPlan(runs=runs)


def _resumed_methods(folder: Path | None, resuming: bool) -> list[str]:
    """Resuming one run folder without a method: its method."""
    if not (resuming and folder is not None and (folder / "checkpoint.pt").is_file()):
        return []
    return [read_saved_config(folder / "checkpoint.pt").method]


def _run_folder(cfg: TrainConfig, out: Path | None, n_runs: int) -> Path:
    if n_runs > 1:
        return (out or Path("runs/default")) / cfg.method
    if out is not None:
        return out
    model = cfg.model.replace(":", "-").replace("/", "-")
    return Path("runs") / f"{cfg.method}-{model}-{cfg.dataset}-s{cfg.seed}"


def _planned(
    sources: ConfigSources, cfg: TrainConfig, folder: Path, resume: bool, auto_resume: bool
) -> PlannedTraining:
    """A resumed run takes the saved configuration, with only the keys that do not change the
    result taken from the command line."""
    saved = (folder / "checkpoint.pt").is_file()
    resume = resume or (auto_resume and saved)
    if resume and saved:
        cfg = resumed_config(folder, cfg, sources.explicit_keys())
    finished = auto_resume and (folder / "metrics.json").is_file()
    return PlannedTraining(cfg, folder, resume, finished)


class ComparisonArm(Protocol):
    """An arm of a comparison (:class:`advfeat.compare.Arm`): a label and its config keys."""

    @property
    def label(self) -> str: ...

    def for_seed(self, seed: int) -> dict[str, Any]:
        """The arm's config keys for the run with this seed."""
        ...


def compose_comparison(
    sources: ConfigSources,
    arms: Sequence[ComparisonArm],
    seeds: Sequence[int],
    *,
    check_device: bool = True,
) -> dict[tuple[str, int], TrainConfig]:
    """The configuration of every (arm label, seed) of a comparison, seed by seed, each checked
    as its run checks it at its start (the device too, unless ``check_device`` is false), before
    any run starts."""
    if sources.recipe == "paper" and len(arms) > 1:
        raise AdvfeatError(
            "--recipe paper would train each arm under its own method's schedule; a comparison "
            "trains every arm under one: name the method whose recipe they share (--recipe afan)"
        )
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise AdvfeatError(f"--seeds must be distinct integers >= 0, got {list(seeds)}")
    composed = {}
    for arm in arms:  # arm by arm, as the runs are listed in the command
        for seed in seeds:
            keys = {**arm.for_seed(seed), "seed": seed, "progress": False}
            composed[arm.label, seed] = compose(sources, arm=keys)
            check_config(composed[arm.label, seed], check_device=check_device)
    return {(arm.label, seed): composed[arm.label, seed] for seed in seeds for arm in arms}
