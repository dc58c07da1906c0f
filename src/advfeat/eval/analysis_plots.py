"""Plots of the papers' analysis tools, drawn from a results dictionary alone.

* :func:`plot_landscape` — A-FAN Fig. 3: the 1-D loss curve and 2-D loss contours around the
  trained weights (with a reference model side by side when the results hold one);
* :func:`plot_branches` — AdvProp Fig. 4-5 / AdvBN: clean and robust accuracy of every BN branch
  of a multi-branch model, with AFA's fusion weights W₀ / W₁ over ε when the model has them;
* :func:`plot_advbn` — AdvBN Fig. 2-3: originals, decoder reconstructions and decoded AdvBN
  features at growing ε.

Like :mod:`advfeat.eval.plots`, each returns the path it wrote, or ``None`` when the data it
needs is absent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from advfeat.eval.plots import COLOURS, _figure, _percent_axis, _save, _title
from advfeat.eval.report import shift_mean

__all__ = ["branch_accuracies", "plot_advbn", "plot_branches", "plot_landscape"]


def _label(run: dict[str, Any], fallback: str) -> str:
    parts = [str(run[k]) for k in ("method", "model") if k in run]
    return " / ".join(parts) if parts else fallback


def _levels(values: list[float]) -> list[float]:
    """Contour levels spaced evenly in log(loss) from the lowest loss to a cap of 20× it (or
    the highest loss, if lower): the basin's shape shows even where the edges explode."""
    lo = max(min(values), 1e-6)
    hi = min(max(values), 20 * lo + 5)
    if hi <= lo * 1.0001:
        hi = lo * 1.01 + 1e-6
    n = 14
    return [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / n) for i in range(n + 1)]


def plot_landscape(results: dict[str, Any], path: Path) -> Path | None:
    """1-D loss (and accuracy) along d₁ and 2-D loss contours over (d₁, d₂), per model."""
    land = results.get("suites", {}).get("landscape", {})
    if "1d" not in land:
        return None
    models = [(_label(results.get("run", {}), "this model"), land)]
    ref = land.get("reference")
    if isinstance(ref, dict) and "1d" in ref:
        name = _label(ref.get("run", {}), "reference")
        models.append((f"{name} (reference)" if name == models[0][0] else name, ref))
    surfaces = [(name, m["2d"]) for name, m in models if "2d" in m]
    panels = 1 + len(surfaces)
    fig = _figure(4.6 * panels + 0.8, 4.0)
    fig.get_layout_engine().set(wspace=0.12)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    acc_ax = ax.twinx()
    for i, (name, m) in enumerate(models):
        c = m["1d"]
        colour = COLOURS[i % len(COLOURS)]
        ax.plot(c["alpha"], c["loss"], "-", color=colour, lw=2, label=f"{name}: loss")
        acc_ax.plot(
            c["alpha"],
            [100 * a for a in c["accuracy"]],
            "--",
            color=colour,
            lw=1,
            alpha=0.7,
            label=f"{name}: accuracy",
        )
    ax.set_yscale("log")
    ax.set_xlabel("α (filter-normalised direction d₁)")
    ax.set_ylabel("loss (cross-entropy, log scale)")
    acc_ax.set_ylabel("accuracy (%, dashed)")
    _percent_axis(acc_ax)
    acc_ax.grid(False)
    ax.grid(True, alpha=0.3, which="both")
    ax.axvline(0, color="grey", lw=0.8)
    handles, labels = ax.get_legend_handles_labels()
    more = acc_ax.get_legend_handles_labels()
    ax.legend(handles + more[0], labels + more[1], loc="upper center", fontsize=7)
    ax.set_title(f"1-D ({land.get('data', 'train')} loss, {land.get('n', '?')} images)", fontsize=9)
    if surfaces:
        values = [v for _, s in surfaces for row in s["loss"] for v in row]
        levels = _levels(values)
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=levels[0], vmax=levels[-1])
        image = None
        for k, (name, s) in enumerate(surfaces):
            ax2 = axes[1 + k]
            capped = [[min(v, levels[-1]) for v in row] for row in s["loss"]]
            image = ax2.contourf(
                s["alpha"], s["beta"], capped, levels=levels, cmap="viridis", norm=norm
            )
            ax2.contour(
                s["alpha"], s["beta"], capped, levels=levels, colors="white", linewidths=0.4
            )
            ax2.plot([0], [0], "r*", ms=9)
            ax2.set_aspect("equal")
            ax2.set_xlabel("α (d₁)")
            ax2.set_ylabel("β (d₂)")
            ax2.set_title(f"2-D: {name}", fontsize=9)
        fig.colorbar(
            image,
            ax=list(axes[1:]),
            label="loss (log scale, capped)",
            shrink=0.85,
            ticks=levels[::2],
            format="%.3g",
        )
    fig.suptitle(f"Loss landscape around the trained weights — {_title(results)}", fontsize=10)
    return _save(fig, path)


def branch_accuracies(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{branch: {"clean": acc, "<attack>": robust acc, "shift": mean acc}}`` from the ``bn``
    suite (only the values present)."""
    branches = results.get("suites", {}).get("bn", {}).get("branches", {})
    out: dict[str, dict[str, float]] = {}
    for name, res in branches.items():
        row: dict[str, float] = {}
        clean = res.get("clean", {})
        if "top1" in clean:
            row["clean"] = float(clean["top1"])
        att = res.get("attacks", {})
        for key, label in (("pgd", "PGD"), ("fgsm", "FGSM"), ("cw", "C&W-L2")):
            if "accuracy" in att.get(key, {}):
                row[label] = float(att[key]["accuracy"])
        _, shifted = shift_mean(res.get("shift", {}))  # eval.json of any version
        if shifted is not None:
            row["shifted (mean)"] = float(shifted)
        out[name] = row
    return out


def plot_branches(results: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars of clean / robust / shifted accuracy per BN branch (AdvProp Fig. 4-5),
    and the accuracy-vs-ε curve of each branch; AFA's W₀ / W₁ against ε when present."""
    table = branch_accuracies(results)
    curve = results.get("suites", {}).get("attacks", {}).get("curve", {})
    fusion = curve.get("fusion_weight_w0")
    if not table and not fusion:
        return None
    branches = results.get("suites", {}).get("bn", {}).get("branches", {})
    curves = {
        n: r["attacks"]["curve"]
        for n, r in branches.items()
        if "accuracy" in r.get("attacks", {}).get("curve", {})
    }
    panels = (1 if table else 0) + (1 if curves else 0) + (1 if fusion else 0)
    fig = _figure(4.6 * panels + 0.4, 4.0)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if table:
        ax = axes.pop(0)
        metrics = [m for m in ("clean", "PGD", "FGSM", "C&W-L2", "shifted (mean)")
                   if any(m in row for row in table.values())]  # fmt: skip
        width = 0.8 / max(len(table), 1)
        for i, (name, row) in enumerate(table.items()):
            xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(metrics))]
            ys = [100 * row.get(m, float("nan")) for m in metrics]
            bars = ax.bar(xs, ys, width, color=COLOURS[i % len(COLOURS)], label=f"BN {name!r}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylabel("accuracy (%)")
        _percent_axis(ax)
        ax.legend(fontsize=8, loc="upper right")
        ax.set_title("accuracy per BN branch", fontsize=9)
    if curves:
        ax = axes.pop(0)
        for i, (name, c) in enumerate(curves.items()):
            ax.plot(
                c["eps_255"],
                [100 * a for a in c["accuracy"]],
                "o-",
                color=COLOURS[i % len(COLOURS)],
                label=f"BN {name!r}",
            )
        ax.set_xlabel("ε (×1/255, PGD)")
        ax.set_ylabel("robust accuracy (%)")
        _percent_axis(ax)
        ax.legend(fontsize=8)
        ax.set_title("accuracy vs ε per BN branch", fontsize=9)
    if fusion:
        ax = axes.pop(0)
        eps = curve["eps_255"]
        ax.plot(eps, fusion, "o-", color=COLOURS[0], lw=2, label="W₀ (clean BN₀)")
        ax.plot(eps, curve["fusion_weight_w1"], "s--", color=COLOURS[1], label="W₁ = 1 − W₀")
        ax.set_xlabel("ε of the input's PGD attack (×1/255)")
        ax.set_ylabel("mean fusion weight")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("AFA generator output vs attack strength", fontsize=9)
    fig.suptitle(f"Per-branch behaviour — {_title(results)}", fontsize=10)
    return _save(fig, path)


def plot_advbn(results: dict[str, Any], path: Path) -> Path | None:
    """AdvBN Fig. 2-3: test images, their reconstructions through the decoder, and the decoded
    AdvBN features at growing ε; one row per image."""
    adv = results.get("suites", {}).get("advbn", {})
    show = adv.get("show")
    if not show:
        return None
    columns = show["columns"]
    rows = len(show["images"][columns[0]])
    fig = _figure(1.45 * len(columns) + 0.3, 1.5 * rows + 0.9)
    grid = fig.add_gridspec(rows, len(columns))
    for r in range(rows):
        for c, name in enumerate(columns):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(show["images"][name][r], interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(show["labels"][r], fontsize=8)
    held = adv.get("decoder", {}).get("held_out", {})
    acc = adv.get("accuracy", {})
    sub = f"site {adv.get('site')!r}; decoder held-out MSE {held.get('mse', float('nan')):.4f}"
    if acc:
        sub += (
            f"; accuracy original {100 * acc['original']:.0f} %, reconstructed "
            f"{100 * acc['reconstructed']:.0f} %, AdvBN (ε={adv['attack']['eps']:g}) "
            f"{100 * acc['advbn']:.0f} %"
        )
    fig.suptitle(f"AdvBN shifts decoded to pixels — {_title(results)}\n{sub}", fontsize=9)
    return _save(fig, path)
