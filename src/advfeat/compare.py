"""Compare methods the way papers do: several arms × several seeds under one protocol.

An *arm* is a label and the config keys that distinguish it (``method=afan``,
``method_options.loss_weighting=mean``); every arm shares the *protocol* (dataset, model,
schedule, epochs: everything else). Each (arm, seed) is an ordinary run folder trained by
``advfeat train`` in its own process or SLURM job (:mod:`advfeat.launchers`), so a comparison can
be killed and started again (finished runs are kept, interrupted ones resumed) and any run can be
inspected or re-evaluated alone.

A :class:`Comparison` (arms × seeds on one protocol, into a folder) is conducted by
:func:`run_comparison`: :func:`place` composes and checks every run's configuration before any
starts, :func:`run_all` trains the unfinished ones through a launcher, and the tables are
written. ``advfeat compare``, ``advfeat train``'s default run and a script all call it.
:func:`collect` reads the run folders, :func:`aggregate` gives per arm the mean ± standard
deviation of every metric and the difference to the baseline arm paired by seed with its 95 %
Student-t interval (:mod:`advfeat.seed_stats`); :func:`markdown` and :func:`plot` render them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from advfeat.checkpoint import atomic_write_json, atomic_write_text
from advfeat.errors import AdvfeatError
from advfeat.launchers import Launcher, ProcessLauncher, make_launcher, run_environment
from advfeat.seed_stats import paired_difference, summarize
from advfeat.train.compose import ConfigSources, compose_comparison
from advfeat.train.config import TrainConfig

__all__ = [
    "Arm",
    "Comparison",
    "PlannedRun",
    "RunResult",
    "aggregate",
    "collect",
    "flatten_metrics",
    "markdown",
    "method_arms",
    "parse_arm",
    "place",
    "plot",
    "run_all",
    "run_comparison",
    "verdicts",
]

# metrics.json keys reported per run (when present), in this order
SCALAR_METRICS = (
    "clean_acc",
    "clean_ap50",
    "clean_ap",
    "clean_miou",
    "best_val_acc",
    "train_time_s",
)
SHIFTED_METRICS = ("shifted_acc", "shifted_ap50", "shifted_miou")
# keys of the configuration that never change a result
_NEUTRAL_KEYS = {"progress", "workers", "device"}


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: a label and the config overrides that define it."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def for_seed(self, seed: int) -> dict[str, Any]:
        """The overrides of the run with this seed: ``{seed}`` in a text value becomes the seed
        (e.g. ``init_checkpoint=cmp/runs/standard-s{seed}/checkpoint.pt``, so a fine-tuning
        arm starts from the pre-trained run of its own seed)."""
        return {
            key: value.replace("{seed}", str(seed)) if isinstance(value, str) else value
            for key, value in self.overrides.items()
        }


def parse_arm(text: str) -> Arm:
    """``"LABEL: key=value key=value"`` → :class:`Arm` (values parsed as YAML)."""
    from advfeat.train.config import parse_override

    label, sep, rest = text.partition(":")
    label = label.strip()
    if not sep or not label or any(c in label for c in "/\\ "):
        raise AdvfeatError(
            f"--arm expects 'LABEL: key=value ...' with a label without spaces or slashes, got "
            f"{text!r} (e.g. --arm 'afan-mean: method=afan method_options.loss_weighting=mean')"
        )
    overrides = dict(parse_override(item) for item in rest.split())
    if not overrides:
        raise AdvfeatError(f"arm {label!r} sets no config key (e.g. '{label}: method=afan')")
    return Arm(label, overrides)


@dataclass
class PlannedRun:
    """One (arm, seed) of a comparison and where it lives."""

    arm: str
    seed: int
    config: TrainConfig
    folder: Path
    config_file: Path
    log_file: Path

    @property
    def finished(self) -> bool:
        return (self.folder / "metrics.json").is_file()

    @property
    def interrupted(self) -> bool:
        return not self.finished and (self.folder / "checkpoint.pt").is_file()

    def command(self) -> list[str]:
        """The ``advfeat train`` command line of this run (``--auto-resume``: an interrupted run
        continues, a new one starts)."""
        cmd = [sys.executable, "-m", "advfeat.cli", "train", "--config", str(self.config_file)]
        return [*cmd, "--out", str(self.folder), "--quiet", "--auto-resume"]

    def check_folder(self) -> None:
        """Refuse a run folder that holds another experiment (listing what differs)."""
        saved_file = self.folder / "config.yaml"
        if not saved_file.is_file():
            return
        saved = TrainConfig.from_dict(yaml.safe_load(saved_file.read_text()) or {}).to_dict()
        planned = self.config.to_dict()
        diffs = [
            f"{k}: {saved.get(k)!r} there, {v!r} now"
            for k, v in planned.items()
            if k not in _NEUTRAL_KEYS and saved.get(k) != v
        ]
        if diffs:
            raise AdvfeatError(
                f"{self.folder} holds a run of another protocol ({'; '.join(diffs[:4])}); "
                f"choose another --out, or delete that folder to re-run it"
            )


@dataclass
class RunResult:
    """A run's status after :func:`run_all`."""

    arm: str
    seed: int
    folder: Path
    returncode: int
    seconds: float


def run_all(
    runs: Sequence[PlannedRun],
    *,
    jobs: int,
    threads: int,
    launcher: Launcher | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> list[RunResult]:
    """Train every unfinished run, ``jobs`` at a time with ``threads`` threads each, through
    ``launcher`` (default: a process each on this machine; runs that share it share its GPU's
    memory)."""
    launcher = launcher or ProcessLauncher()
    for run in runs:
        run.check_folder()
    for run in runs:
        run.config_file.parent.mkdir(parents=True, exist_ok=True)
        run.config_file.write_text(yaml.safe_dump(run.config.to_dict(), sort_keys=False))
    todo = [r for r in runs if not r.finished]
    sharing = min(jobs, len(todo)) if launcher.shares_machine else 1
    env = run_environment(threads, sharing)
    done = len(runs) - len(todo)
    if done:
        log(f"advfeat compare: {done} of {len(runs)} runs already finished")

    def one(run: PlannedRun) -> RunResult:
        start = time.time()
        how = "resuming" if run.interrupted else "training"
        log(f"advfeat compare: {how} {run.arm} seed {run.seed} → {run.folder}")
        run.log_file.parent.mkdir(parents=True, exist_ok=True)
        code = launcher.train(run.command(), run.log_file, env, f"{run.arm}-s{run.seed}")
        seconds = time.time() - start
        state = "done" if code == 0 else f"FAILED (exit {code}, log: {run.log_file})"
        log(f"advfeat compare: {run.arm} seed {run.seed} {state} in {seconds:.0f} s")
        return RunResult(run.arm, run.seed, run.folder, code, seconds)

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        return list(pool.map(one, todo))
    except KeyboardInterrupt:
        launcher.cancel()  # no run starts after Ctrl-C, and submitted jobs are cancelled
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Comparison:
    """What ``advfeat compare`` is asked: its arms × seeds on the protocol ``sources`` describe,
    into ``out``, and how its runs are started (``advfeat train``'s default run is one too)."""

    arms: list[Arm]
    seeds: list[int]
    sources: ConfigSources
    out: Path
    baseline: str | None = None
    jobs: int | None = None
    threads: int = 1
    launcher: str = "process"
    slurm: tuple[str, ...] = ()
    runs_from: tuple[str, ...] = ()
    report_only: bool = False


def method_arms(methods: Sequence[str]) -> list[Arm]:
    """One arm per method, labelled with its name."""
    return [Arm(m.strip(), {"method": m.strip()}) for m in methods if m.strip()]


def _runs_folder(folder: Path) -> Path:
    """The ``runs`` folder of a comparison given to ``--runs-from``."""
    if not (folder / "runs").is_dir():
        raise AdvfeatError(
            f"--runs-from {folder}: no comparison there (it has no runs/ folder); give the --out "
            f"folder of an earlier `advfeat compare`"
        )
    return folder / "runs"


def _run_folder(name: str, own: Path, sources: list[Path]) -> Path:
    """Where run ``name`` lives: this comparison's own folder, unless it has not finished there
    and a ``--runs-from`` comparison holds it finished (the first one that does)."""
    if (own / name / "metrics.json").is_file():
        return own / name
    found = [s / name for s in sources if (s / name / "metrics.json").is_file()]
    return found[0] if found else own / name


def place(comparison: Comparison) -> tuple[list[Arm], list[PlannedRun]]:
    """Every run of ``comparison``, its configuration validated and checked as the run checks it
    at its start (before anything is written), in its folder."""
    c = comparison
    if c.threads < 1 or (c.jobs is not None and c.jobs < 1):
        raise AdvfeatError(f"--jobs and --threads must be >= 1, got {c.jobs}, {c.threads}")
    sources = [_runs_folder(Path(d)) for d in c.runs_from]
    trains_here = not c.report_only and c.launcher != "slurm"  # SLURM jobs have their own devices
    names = [f"{arm.label}-s{seed}" for seed in c.seeds for arm in c.arms]
    folders = {name: _run_folder(name, c.out / "runs", sources) for name in names}
    configs = compose_comparison(c.sources, c.arms, c.seeds, check_device=trains_here)
    runs = [
        PlannedRun(
            arm=label,
            seed=seed,
            config=cfg,
            folder=folders[f"{label}-s{seed}"],
            config_file=c.out / "configs" / f"{label}-s{seed}.yaml",
            log_file=c.out / "logs" / f"{label}-s{seed}.log",
        )
        for (label, seed), cfg in configs.items()
    ]
    return c.arms, runs


def run_comparison(comparison: Comparison) -> int:
    """Train (or, ``report_only``, only tabulate) every run of ``comparison`` and write its
    tables: OUT/compare.json, OUT/compare.md, OUT/compare.png. Returns 1 when a run failed."""
    c = comparison
    arms, runs = place(c)
    labels = [a.label for a in arms]
    baseline = c.baseline or labels[0]
    if baseline not in labels:
        raise AdvfeatError(f"--baseline {baseline!r} is not an arm ({', '.join(labels)})")
    out = c.out
    failed = []
    borrowed = [r for r in runs if r.folder.parent != out / "runs"]
    if borrowed:
        print(
            f"advfeat compare: {len(borrowed)} finished runs taken from --runs-from "
            f"({', '.join(sorted({str(r.folder.parent.parent) for r in borrowed}))})",
            file=sys.stderr,
        )
    if c.report_only:
        for r in runs:
            r.check_folder()
    else:
        launcher = make_launcher(c.launcher, list(c.slurm), out / "submitit", threads=c.threads)
        jobs = c.jobs or max(1, (os.cpu_count() or 1) // c.threads)
        if c.launcher == "slurm":
            jobs = c.jobs or len(runs)  # the scheduler decides
        results = run_all(runs, jobs=jobs, threads=c.threads, launcher=launcher)
        failed = [r for r in results if r.returncode != 0]
    summary = aggregate(collect(runs), labels, baseline)
    summary["protocol"] = {
        k: v
        for k, v in runs[0].config.to_dict().items()
        if k not in ("method", "method_options", "seed", "progress")
    }
    summary["arm_overrides"] = {a.label: a.overrides for a in arms}
    summary["seeds"] = list(c.seeds)
    summary["command"] = (
        "advfeat " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    )
    summary["run_folders"] = {f"{r.arm}-s{r.seed}": str(r.folder) for r in runs}
    summary["missing"] = [f"{r.arm}-s{r.seed}" for r in runs if not r.finished]
    table = markdown(summary)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", table)
    drawn = plot(summary, out / "compare.png")
    print(table)
    print(
        f"comparison: {out / 'compare.json'}, {out / 'compare.md'}"
        + (f", {out / 'compare.png'}" if drawn else "")
    )
    if summary["missing"]:
        print(f"not finished: {', '.join(summary['missing'])}", file=sys.stderr)
    return 1 if failed else 0


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a run's ``metrics.json`` (and ``eval.json``) as ``name → value``.

    Scalars keep their key; shifted domains become ``shifted_acc/<domain>`` plus their mean
    ``shifted_acc/mean``; from ``advfeat eval --out RUN/eval.json``, the ``shift`` suite's
    domains (e.g. an "-AdvBN" test set) become ``shifted_acc/<domain>``, the ``attacks``
    suite's accuracies ``robust/<attack>`` and an ε-curve one ``robust/<attack>@<ε·255>/255`` per
    budget.
    """
    flat: dict[str, float] = {}
    for key in SCALAR_METRICS:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = float(value)
    for key in SHIFTED_METRICS:
        domains = metrics.get(key)
        if isinstance(domains, Mapping) and domains:
            values = {d: float(v) for d, v in domains.items() if isinstance(v, int | float)}
            flat |= {f"{key}/{d}": v for d, v in sorted(values.items())}
            if values:
                flat[f"{key}/mean"] = sum(values.values()) / len(values)
    suites = metrics.get("suites")  # advfeat eval's JSON, saved as the run's eval.json
    shift = suites.get("shift") if isinstance(suites, Mapping) else None
    domains = shift.get("domains") if isinstance(shift, Mapping) else None
    # the task's headline per domain ("top1"; "accuracy" in eval.json written before the suite
    # named its metric); a classifier's accuracy is shifted_acc/<domain>, as in metrics.json
    metric = shift.get("metric", "accuracy") if isinstance(shift, Mapping) else None
    if isinstance(domains, Mapping) and metric in ("top1", "accuracy"):
        for name, item in domains.items():  # e.g. the "-AdvBN" test set: --suite shift --domain
            value = item.get(metric) if isinstance(item, Mapping) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"shifted_acc/{name}"] = float(value)
    attacks = suites.get("attacks") if isinstance(suites, Mapping) else None
    if isinstance(attacks, Mapping):
        for name, item in attacks.items():
            value = item.get("accuracy") if isinstance(item, Mapping) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"robust/{name}"] = float(value)
            elif isinstance(value, list) and isinstance(item.get("eps_255"), list):
                # an ε-curve: one metric per budget, e.g. robust/curve@4/255
                for eps, acc in zip(item["eps_255"], value, strict=True):
                    flat[f"robust/{name}@{eps:g}/255"] = float(acc)
    return flat


def collect(runs: Sequence[PlannedRun]) -> dict[str, dict[int, dict[str, float]]]:
    """``arm → seed → metrics`` of the finished runs."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        if not run.finished:
            continue
        metrics = json.loads((run.folder / "metrics.json").read_text())
        evaluation = run.folder / "eval.json"
        if evaluation.is_file():
            metrics = {**metrics, **json.loads(evaluation.read_text())}
        out.setdefault(run.arm, {})[run.seed] = flatten_metrics(metrics)
    return out


def aggregate(
    results: Mapping[str, Mapping[int, Mapping[str, float]]], arms: Sequence[str], baseline: str
) -> dict[str, Any]:
    """Per arm and metric: values by seed, mean, std; and the paired difference to ``baseline``.

    Differences use the seeds that both arms finished; the interval is the two-sided 95 %
    Student-t interval of the mean per-seed difference (``None`` below two pairs).
    """
    metrics: list[str] = []
    for arm in arms:
        for seed_metrics in results.get(arm, {}).values():
            metrics += [m for m in seed_metrics if m not in metrics]
    metrics.sort(key=lambda m: m == "train_time_s")  # time last
    base = results.get(baseline, {})
    table: dict[str, Any] = {}
    for arm in arms:
        runs = results.get(arm, {})
        entry: dict[str, Any] = {"seeds": sorted(runs), "metrics": {}}
        for metric in metrics:
            by_seed = {s: m[metric] for s, m in sorted(runs.items()) if metric in m}
            if not by_seed:
                continue
            summary = summarize(list(by_seed.values()))
            item: dict[str, Any] = {
                "values": {str(s): v for s, v in by_seed.items()},
                "n": summary.n,
                "mean": summary.mean,
                "std": summary.std,
            }
            paired = [s for s in by_seed if metric in base.get(s, {})]
            if arm != baseline and paired:
                diff = paired_difference(
                    [by_seed[s] for s in paired], [base[s][metric] for s in paired]
                )
                item["diff_vs_baseline"] = {
                    "n": diff.n,
                    "mean": diff.mean,
                    "std": diff.std,
                    "ci95": None if diff.low is None else [diff.low, diff.high],
                    "seeds": paired,
                }
            entry["metrics"][metric] = item
        table[arm] = entry
    return {"baseline": baseline, "arms": list(arms), "metrics": metrics, "results": table}


def _is_rate(metric: str) -> bool:
    return metric != "train_time_s"


def _fmt(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if _is_rate(metric):
        value = 100 * value + 0.0  # no "-0.00"
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return f"{value:+.0f}" if signed else f"{value:.0f}"


def markdown(summary: Mapping[str, Any], metrics: Sequence[str] | None = None) -> str:
    """Two Markdown tables: mean ± std per arm, and the paired difference to the baseline.

    Rates are in percent (points for differences); ``train_time_s`` in seconds.
    """
    names = list(metrics or summary["metrics"])
    baseline = summary["baseline"]
    head = ["arm", "seeds", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for arm in summary["arms"]:
        entry = summary["results"].get(arm, {"seeds": [], "metrics": {}})
        cells = [arm, str(len(entry["seeds"]))]
        for m in names:
            item = entry["metrics"].get(m)
            if item is None:
                cells.append("–")
            elif item["std"] is None:
                cells.append(_fmt(item["mean"], m))
            else:
                cells.append(f"{_fmt(item['mean'], m)} ± {_fmt(item['std'], m)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Paired difference to `{baseline}` (same seeds), mean [95 % CI]:", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for arm in summary["arms"]:
        if arm == baseline:
            continue
        entry = summary["results"].get(arm, {"seeds": [], "metrics": {}})
        cells = [arm, ""]
        for m in names:
            diff = entry["metrics"].get(m, {}).get("diff_vs_baseline")
            if diff is None:
                cells.append("–")
                continue
            cells[1] = str(diff["n"])
            ci = diff["ci95"]
            text = _fmt(diff["mean"], m, signed=True)
            if ci is not None:
                text += f" [{_fmt(ci[0], m, signed=True)}, {_fmt(ci[1], m, signed=True)}]"
                if ci[0] > 0 or ci[1] < 0:
                    text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rates in %, differences in points, time in seconds; **bold**: the 95 % interval "
        "excludes 0.",
        "",
        *[f"- {line}" for line in verdicts(summary)],
    ]
    return "\n".join(lines) + "\n"


_HEADLINES = ("clean_acc", "clean_ap50", "clean_miou", "shifted_acc/mean", "shifted_ap50/mean")


def verdicts(summary: Mapping[str, Any]) -> list[str]:
    """One plain sentence per non-baseline arm and headline metric (clean, shifted mean), then
    one that sums them up: which arms beat the baseline, or that none does."""
    baseline = summary["baseline"]
    lines = []
    better: list[str] = []
    judged: set[str] = set()
    for arm in summary["arms"]:
        if arm == baseline:
            continue
        found = summary["results"].get(arm, {}).get("metrics", {})
        for metric in _HEADLINES:
            diff = found.get(metric, {}).get("diff_vs_baseline")
            if diff is None:
                continue
            points = f"{100 * diff['mean'] + 0.0:+.2f} points"
            if diff["ci95"] is None:
                lines.append(
                    f"{arm} vs {baseline}, {metric}: {points} from {diff['n']} seed(s); "
                    f"no spread, no verdict"
                )
                continue
            low, high = diff["ci95"]
            judged.add(metric)
            if low > 0:
                better.append(f"{arm} ({metric})")
                word = f"better than {baseline}"
            elif high < 0:
                word = f"worse than {baseline}"
            else:
                word = "no difference shown at this noise level"
            lines.append(
                f"{arm} vs {baseline}, {metric}: {points} "
                f"[{100 * low:+.2f}, {100 * high:+.2f}] over {diff['n']} seeds: {word}"
            )
    if better:
        lines.append(f"In short: better than {baseline}: {', '.join(better)}.")
    elif judged:
        lines.append(
            f"In short: no arm beats {baseline} on {' or '.join(sorted(judged))} "
            "at this noise level."
        )
    return lines


def plot(summary: Mapping[str, Any], path: Path, metrics: Sequence[str] | None = None) -> bool:
    """One panel per metric: each seed's value and the mean ± std per arm (needs matplotlib).

    Returns whether the figure was written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [m for m in (metrics or summary["metrics"]) if m != "train_time_s"][:8]
    if not names:
        return False
    arms = summary["arms"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, names, strict=False):
        for i, arm in enumerate(arms):
            item = summary["results"].get(arm, {}).get("metrics", {}).get(metric)
            if item is None:
                continue
            values = [100 * v for v in item["values"].values()]
            ax.scatter([i] * len(values), values, s=14, color="0.55", zorder=2)
            std = 0.0 if item["std"] is None else 100 * item["std"]
            ax.errorbar(
                i + 0.18, 100 * item["mean"], yerr=std, fmt="o", color=f"C{i}", capsize=4, zorder=3
            )
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.set_ylabel("%", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("grey: one seed; colour: mean ± std", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
