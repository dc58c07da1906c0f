"""L-ALFA's learned strengths η per site over training (ALFA Fig. 4), read from a run's history.

The trainer logs ``eta_<site>`` once per epoch (the value after the epoch's last projection
onto {1ᵀη = 1}); :func:`eta_trajectories` collects them in the order the sites appear in the
history (the model's order, input → output); :func:`advfeat.eval.plots.plot_eta` draws them.
ALFA reports that L-ALFA learns to put the strength on the last block; ``dominant_site`` names
the site with the largest final η, and ``final_share`` its share of Σ|η|.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["eta_trajectories"]


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
