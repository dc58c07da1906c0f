"""L-ALFA's learned strengths η per site over training (ALFA Fig. 4), read from a run's history.

The trainer logs ``eta_<site>`` once per epoch (the value after the epoch's last projection
onto {1ᵀη = 1}); :func:`eta_trajectories` collects them in the order the sites appear in the
history (the model's order, input → output), and :func:`plot_eta` draws them. ALFA reports that
L-ALFA learns to put the strength on the last block; ``dominant_site`` names the site with the
largest final η, and ``final_share`` its share of Σ|η|.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["eta_trajectories", "plot_eta"]


def eta_trajectories(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"sites", "epoch", "eta": {site: [η per epoch]}, "final", "dominant_site",
    "final_share"}`` from a run's history, or ``{}`` when it logs no η (not an L-ALFA run).

    Only epochs that log every site are kept, so each list has one value per entry of
    ``epoch``.
    """
    sites: list[str] = []
    for row in history:
        for key in row:
            if key.startswith("eta_") and key[4:] not in sites:
                sites.append(key[4:])
    if not sites:
        return {}

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    rows = [r for r in history if all(number(r.get(f"eta_{s}")) for s in sites)]
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    eta = {s: [float(r[f"eta_{s}"]) for r in rows] for s in sites}
    final = {s: v[-1] for s, v in eta.items() if v}
    out: dict[str, Any] = {"sites": sites, "epoch": epochs, "eta": eta, "final": final}
    if final:
        dominant = max(final, key=lambda s: final[s])
        total = sum(abs(v) for v in final.values())
        out["dominant_site"] = dominant
        out["final_share"] = abs(final[dominant]) / total if total > 0 else None
    return out


def plot_eta(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """ALFA Fig. 4: η of each site against the epoch; the dominant site's line is drawn bold
    and labelled with its final value."""
    from advfeat.eval.plots import COLOURS, _figure, _save

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
