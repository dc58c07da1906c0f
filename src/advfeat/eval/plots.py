"""PNG plots of evaluation results and of training runs (optional extra ``advfeat[plot]``).

Every function draws from the results JSON (or a run folder's history) alone and returns the
path it wrote, or ``None`` when the data it needs is absent. Figures are drawn with matplotlib's
object API on an Agg canvas: no global backend or style is changed.

* :func:`plot_eps_curve` — accuracy vs ε (white-box worst case, per-ε values, transfer, branches);
* :func:`plot_corruptions` — accuracy per corruption type and severity (heat map);
* :func:`plot_divergence` — AdvBN feature divergence per layer (one line per dataset pair);
* :func:`plot_training` — loss, accuracy and learning rate over epochs of a run folder;
* :func:`plot_eta` — L-ALFA's strengths η per site over epochs (ALFA Fig. 4; history keys
  ``eta_<site>``, read by :func:`advfeat.eval.trajectories.eta_trajectories`);
* :func:`plot_fusion_weight` — AFA's fusion weight W_1 against ε (AFA Fig. 6);
* :func:`plot_feature_maps` — clean / perturbed / re-normalized feature maps (A-FAN Fig. S6).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from advfeat.errors import AdvfeatError
from advfeat.eval.trajectories import eta_trajectories

__all__ = [
    "PlotFn",
    "SuitePlots",
    "load_history",
    "plot_all",
    "plot_corruptions",
    "plot_divergence",
    "plot_eps_curve",
    "plot_eta",
    "plot_feature_maps",
    "plot_fusion_weight",
    "plot_training",
]

PlotFn = Callable[[dict[str, Any], Path], "Path | None"]
"""``(all results, png path) -> the path written, or None (nothing to draw)``."""


class SuitePlots(Protocol):
    """What :func:`plot_all` needs of a suite (:class:`advfeat.eval.suites.Suite` has it)."""

    @property
    def plots(self) -> Mapping[str, PlotFn]: ...


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AdvfeatError(
            "plots need the optional package matplotlib: pip install 'advfeat[plot]' "
            "(or pass --no-plots)"
        ) from None
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _percent_axis(ax: Any) -> None:
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)


def _title(results: dict[str, Any]) -> str:
    run = results.get("run", {})
    parts = [str(run[k]) for k in ("method", "model", "dataset") if k in run]
    return " / ".join(parts) if parts else str(run.get("model", "model"))


# ----------------------------------------------------------------------------- from results
def plot_eps_curve(results: dict[str, Any], path: Path) -> Path | None:
    """Robust accuracy (%) against ε (in /255), per-sample worst case over ε' ≤ ε."""
    attacks = results.get("suites", {}).get("attacks", {})
    curve = attacks.get("curve")
    if not curve or "accuracy" not in curve:
        return None
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    eps = curve["eps_255"]
    ax.plot(
        eps,
        [100 * a for a in curve["accuracy"]],
        "o-",
        color=COLOURS[0],
        lw=2,
        label="white-box PGD (worst case over ε' ≤ ε)",
    )
    if curve["pointwise_accuracy"] != curve["accuracy"]:
        ax.plot(
            eps,
            [100 * a for a in curve["pointwise_accuracy"]],
            "o--",
            color=COLOURS[0],
            alpha=0.5,
            label="white-box PGD at ε only",
        )
    transfer = attacks.get("transfer", {})
    if "accuracy" in transfer:
        ax.plot(
            transfer["eps_255"],
            [100 * a for a in transfer["accuracy"]],
            "s-",
            color=COLOURS[1],
            label="black-box transfer",
        )
    branches = results.get("suites", {}).get("bn", {}).get("branches", {})
    for i, (name, res) in enumerate(branches.items()):
        c = res.get("attacks", {}).get("curve")
        if c and "accuracy" in c:
            ax.plot(
                c["eps_255"],
                [100 * a for a in c["accuracy"]],
                "^:",
                color=COLOURS[(i + 2) % len(COLOURS)],
                label=f"BN branch {name!r}",
            )
    ax.set_xlabel("ε (×1/255, L∞)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(eps)
    _percent_axis(ax)
    ax.set_title(f"Accuracy vs attack strength — {_title(results)}")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_corruptions(results: dict[str, Any], path: Path) -> Path | None:
    """Heat map of accuracy (%) per corruption type (rows) and severity (columns) + mean."""
    cor = results.get("suites", {}).get("corruptions", {})
    table = cor.get("accuracy")
    if not table:
        return None
    names = list(table)
    severities = [str(s) for s in cor.get("severities", sorted(next(iter(table.values()))))]
    values = [
        [100 * table[n][s] for s in severities] + [100 * cor["mean_accuracy"][n]] for n in names
    ]
    fig = _figure(max(5.5, 2.6 + 0.75 * (len(severities) + 1)), 1.6 + 0.36 * len(names))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(severities) + 1), [*severities, "mean"])
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.set_xlabel("severity")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                f"{v:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if v > 60 else "white",
            )
    ax.axvline(len(severities) - 0.5, color="white", lw=2)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    clean = cor.get("clean_accuracy")
    sub = f"clean {100 * clean:.1f} %" if clean is not None else ""
    if cor.get("mce") is not None:
        sub += f", mCE {100 * cor['mce']:.1f} %"
    ax.set_title(f"Accuracy under corruptions (%)\n{_title(results)}; {sub}", fontsize=10)
    return _save(fig, path)


def plot_divergence(results: dict[str, Any], path: Path) -> Path | None:
    """AdvBN Eq. 4 divergence per layer, one line per dataset pair."""
    div = results.get("suites", {}).get("divergence", {})
    pairs = div.get("pairs")
    if not pairs:
        return None
    layers = div["layers"]
    fig = _figure(max(6.0, 0.55 * len(layers) + 2), 4.2)
    ax = fig.add_subplot()
    for i, (pair, res) in enumerate(pairs.items()):
        a, b = pair.split("|", 1)
        ax.plot(
            range(len(layers)),
            [res["per_layer"][n] for n in layers],
            "o-",
            color=COLOURS[i % len(COLOURS)],
            label=f"{a} vs {b}",
        )
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("symmetric KL divergence (Eq. 4)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title(f"Feature divergence per layer — {_title(results)}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fusion_weight(results: dict[str, Any], path: Path) -> Path | None:
    """AFA Fig. 6: mean fusion weight W_1 = 1 − W_0 on attacked inputs against ε."""
    curve = results.get("suites", {}).get("attacks", {}).get("curve", {})
    w1 = curve.get("fusion_weight_w1")
    if not w1:
        return None
    fig = _figure(5.6, 4.0)
    ax = fig.add_subplot()
    ax.plot(curve["eps_255"], w1, "o-", color=COLOURS[3], lw=2)
    ax.set_xlabel("ε (×1/255, PGD)")
    ax.set_ylabel("mean fusion weight W₁ (adversarial BN)")
    ax.set_xticks(curve["eps_255"])
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"AFA fusion weight vs ε — {_title(results)}")
    return _save(fig, path)


def plot_feature_maps(results: dict[str, Any], path: Path) -> Path | None:
    """A-FAN Fig. S6: input, clean, perturbed and re-normalized feature maps, one row per image."""
    feat = results.get("suites", {}).get("features", {})
    if "maps" not in feat:
        return None
    columns = feat["columns"]
    images = feat["images"]
    rows = len(images)
    fig = _figure(1.7 * (len(columns) + 1), 1.75 * rows + 0.6)
    grid = fig.add_gridspec(rows, len(columns) + 1)
    for r in range(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(images[r], interpolation="nearest")
        ax.set_axis_off()
        if r == 0:
            ax.set_title("input", fontsize=9)
        maps = [feat["maps"][c][r] for c in columns]
        lo = min(min(min(row) for row in m) for m in maps)
        hi = max(max(max(row) for row in m) for m in maps)
        for c, (name, m) in enumerate(zip(columns, maps, strict=True)):
            ax = fig.add_subplot(grid[r, c + 1])
            ax.imshow(m, cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(
        f"Features at {feat['site']!r}, channel {feat.get('channel', '?')} "
        f"(perturbation ×{feat['magnify']:g}) — "
        f"{_title(results)}",
        fontsize=10,
    )
    return _save(fig, path)


# ----------------------------------------------------------------------------- run folders
def load_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch history of a run folder (``metrics.json``, else ``history.csv``)."""
    run = Path(run_dir)
    metrics = run / "metrics.json"
    if metrics.is_file():
        try:
            history = json.loads(metrics.read_text()).get("history")
        except json.JSONDecodeError:
            history = None
        if isinstance(history, list):
            return history
    csv_path = run / "history.csv"
    if csv_path.is_file():
        with csv_path.open() as fh:
            rows = list(csv.DictReader(fh))
        return [{k: _number(v) for k, v in row.items()} for row in rows]
    return []


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for row in history:
        v = row.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(float(row.get("epoch", len(xs) + 1)))
            ys.append(float(v))
    return xs, ys


def plot_training(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training loss, train / validation / test accuracy (AP50 or mIoU for detection or
    segmentation runs) and learning rate over epochs."""
    if not history:
        return None
    metric, label = "acc", "accuracy"
    for key, name in (("ap50", "AP50"), ("miou", "mIoU")):
        if any(f"test_{key}" in row for row in history):
            metric, label = key, name
    fig = _figure(10.5, 3.6)
    axes = fig.subplots(1, 3)
    for key, colour in (
        ("train_loss", COLOURS[0]),
        ("loss_clean", COLOURS[2]),
        ("loss_adv", COLOURS[1]),
    ):
        xs, ys = _series(history, key)
        if xs:
            axes[0].plot(xs, ys, "o-", color=colour, label=key.replace("_", " "), ms=3)
    axes[0].set_title("loss")
    for key, colour in (
        (f"train_{metric}", COLOURS[0]),
        (f"val_{metric}", COLOURS[3]),
        (f"test_{metric}", COLOURS[1]),
    ):
        xs, ys = _series(history, key)
        if xs:
            axes[1].plot(
                xs, [100 * y for y in ys], "o-", color=colour, label=key.replace("_", " "), ms=3
            )
    axes[1].set_title(f"{label} (%)")
    _percent_axis(axes[1])
    xs, ys = _series(history, "lr")
    if xs:
        axes[2].plot(xs, ys, "o-", color=COLOURS[4], ms=3)
    axes[2].set_title("learning rate")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"Training — {title}" if title else "Training", fontsize=11)
    return _save(fig, path)


def plot_eta(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """ALFA Fig. 4: η of each site against the epoch; the dominant site's line is drawn bold
    and labelled with its final value."""
    traj = eta_trajectories(history)
    if not traj or not traj["epoch"]:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    values = [v for series in traj["eta"].values() for v in series]
    sites = traj["sites"]
    if len(sites) <= len(COLOURS):
        colours: list[Any] = list(COLOURS[: len(sites)])
    else:  # many sites: a colour map ordered by depth (light = early, dark = late)
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        colours = [cmap(0.9 * (1 - i / (len(sites) - 1))) for i in range(len(sites))]
    for i, site in enumerate(sites):
        main = site == traj.get("dominant_site")
        ys = traj["eta"][site]
        ax.plot(
            traj["epoch"],
            ys,
            "o-",
            color="black" if main else colours[i],
            lw=2.5 if main else 1.2,
            ms=3,
            label=f"{site} (final {ys[-1]:.2f})",
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("η (sum over sites = 1)")
    # zoomed on the data (η near 1/r would be a flat line on [0, 1]), always showing 0
    lo, hi = min(0.0, min(values)), max(values)
    pad = 0.08 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + 3 * pad)
    ax.axhline(1 / len(traj["sites"]), color="grey", lw=0.8, ls=":", label="uniform 1/r")
    ax.grid(True, alpha=0.3)
    ax.legend(title="site (input → output)", fontsize=7, ncols=2 if len(sites) > 5 else 1)
    head = "L-ALFA strengths η over training"
    ax.set_title(f"{head} — {title}" if title else head, fontsize=10)
    return _save(fig, path)


def plot_all(
    results: dict[str, Any],
    folder: str | Path,
    suites: Sequence[SuitePlots],
    *,
    run_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Every plot the results (and the run folder, if given) have data for: the plots each of
    ``suites`` declares (the registered suites, :func:`advfeat.eval.suites.ordered_suites`)."""
    folder = Path(folder)
    made: dict[str, Path] = {}
    for suite in suites:
        for name, fn in suite.plots.items():
            path = fn(results, folder / f"{name}.png")
            if path is not None:
                made[name] = path
    if run_dir is not None:
        history = load_history(run_dir)
        title = _title(results)
        for name, hfn in (("training_curves", plot_training), ("eta", plot_eta)):
            path = hfn(history, folder / f"{name}.png", title)
            if path is not None:
                made[name] = path
    return made
