"""A Markdown report of evaluation results (written next to the JSON as ``<stem>.md``).

Classification results show accuracies; detection and segmentation results (``config.task``)
show AP / AP50 / AP75 or mIoU / pixel accuracy, clean, under PGD and on shifted domains.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["markdown_report", "summary_rows"]

DENSE_METRICS = {
    "ap": "AP",
    "ap50": "AP50",
    "ap75": "AP75",
    "miou": "mIoU",
    "pixel_acc": "pixel acc.",
}
"""The scalar metrics of detection and segmentation, in report order, with their labels."""

ROBUST_ACCURACY_NOTE = (
    "Robust accuracy counts a test image as robust only if the model is correct on it both "
    "clean and attacked, so it never exceeds clean accuracy; the ε-curve takes, per image, "
    "the worst case over all smaller budgets, so it never increases with ε."
)
DENSE_ROBUST_NOTE = (
    "Robust {metrics} are the metrics on the PGD-attacked test images (A-FAN Tables 5-6); unlike "
    "robust accuracy they are not capped by the clean value, so the drop is reported as well."
)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f} %"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def _skip(res: dict[str, Any]) -> list[str] | None:
    return [f"*Skipped: {res['skipped']}.*", ""] if "skipped" in res else None


def _task(results: dict[str, Any]) -> str:
    return str(results.get("config", {}).get("task", "classification"))


def _scalars(res: dict[str, Any]) -> list[str]:
    return [k for k in DENSE_METRICS if k in res]


def _budget(res: dict[str, Any]) -> str:
    return f"ε = {255 * res['eps']:.3g}/255, step {255 * res['alpha']:.3g}/255"


def _dense_summary(suites: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    clean = suites.get("clean", {})
    rows += [[f"clean {DENSE_METRICS[k]}", _pct(clean[k])] for k in _scalars(clean)]
    pgd = suites.get("attacks", {}).get("pgd", {})
    label = f"PGD-{pgd.get('steps', '')} ({_budget(pgd)})" if "eps" in pgd else ""
    rows += [[f"{label} {DENSE_METRICS[k]}", _pct(pgd[k])] for k in _scalars(pgd)]
    shift = suites.get("shift", {})
    metric = shift.get("metric")
    if metric is not None:
        rows.append([f"mean shifted-domain {DENSE_METRICS[metric]}", _pct(shift[f"mean_{metric}"])])
    return rows


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """``[metric, value]`` rows of the report's summary table (and of ``advfeat eval``'s output)."""
    suites = results.get("suites", {})
    return _dense_summary(suites) if _task(results) != "classification" else _summary(suites)


def _summary(suites: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    clean = suites.get("clean", {})
    if "top1" in clean:
        rows.append(["clean top-1", _pct(clean["top1"])])
    if "top5" in clean:
        rows.append(["clean top-5", _pct(clean["top5"])])
    att = suites.get("attacks", {})
    eps = att.get("eps")
    budget = f" (ε = {255 * eps:.3g}/255)" if eps is not None else ""
    for key, label in (
        ("pgd", f"PGD-{att.get('pgd', {}).get('steps', '')}{budget}"),
        ("fgsm", f"FGSM{budget}"),
        ("cw", "C&W-L2 not fooled (no L2 budget)"),
        ("autoattack", f"AutoAttack{budget}"),
        ("autoattack_fast", f"AutoAttack-fast{budget}"),
        ("adaptive", f"AFA adaptive PGD{budget}"),
    ):
        res = att.get(key, {})
        if "accuracy" in res:
            own = res.get("label")  # the result's own description (C&W set-up, AutoAttack's)
            shown = label if own is None else own + (budget if key.startswith("autoattack") else "")
            rows.append([shown, _pct(res["accuracy"])])
    cw = att.get("cw", {})
    for r, acc in zip(cw.get("l2_budgets", []), cw.get("accuracy_within_l2", []), strict=False):
        rows.append([f"C&W-L2 accuracy at ‖δ‖₂ ≤ {r:g}", _pct(acc)])
    transfer = att.get("transfer", {})
    if "accuracy" in transfer:
        rows.append(
            [
                f"black-box transfer (ε = {transfer['eps_255'][-1]:g}/255)",
                _pct(transfer["accuracy"][-1]),
            ]
        )
    cor = suites.get("corruptions", {})
    if "mean_corruption_accuracy" in cor:
        rows.append(["mean corruption accuracy", _pct(cor["mean_corruption_accuracy"])])
        if cor.get("mce") is not None:
            rows.append(["mCE (vs baseline)", _pct(cor["mce"])])
    shift = suites.get("shift", {})
    if "mean_accuracy" in shift:
        rows.append(["mean shifted-domain accuracy", _pct(shift["mean_accuracy"])])
    land = suites.get("landscape", {}).get("1d", {})
    if land.get("mean_loss_increase") is not None:
        rows.append(["loss-landscape mean increase (1-D)", f"{land['mean_loss_increase']:.4g}"])
    hess = suites.get("hessian", {})
    if "spectral_norm" in hess:
        rows.append(["Hessian spectral norm", f"{hess['spectral_norm']:.4g}"])
        rows.append(["Hessian trace", f"{hess['trace']:.4g} ± {hess['stderr']:.2g}"])
    return rows


def _attacks(att: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    rows = []
    for key, label in (
        ("pgd", "PGD"),
        ("fgsm", "FGSM"),
        ("cw", "C&W-L2"),
        ("autoattack", "AutoAttack"),
        ("autoattack_fast", "AutoAttack-fast"),
    ):
        res = att.get(key, {})
        if "accuracy" in res:
            l2 = res.get("median_l2_fooled")
            rows.append(
                [
                    res.get("label", label),
                    _pct(res["accuracy"]),
                    _pct(res["clean_accuracy"]),
                    _pct(res["attacked_accuracy"]),
                    "–" if l2 is None else f"{l2:.3f}",
                ]
            )
        elif "skipped" in res:
            rows.append([label, f"skipped: {res['skipped']}", "", "", ""])
    if rows:
        lines += _table(
            ["attack", "robust acc.", "clean acc.", "acc. on attacked only", "median L2 (fooled)"],
            rows,
        )
    aa = att.get("autoattack", {})
    if "checks" in aa:
        lines += ["AutoAttack sanity checks:", ""]
        lines += [
            f"- {'✅' if c['passed'] else '⚠️'} {name}: {c['detail']}"
            for name, c in aa["checks"].items()
        ]
        lines.append("")
    curve = att.get("curve", {})
    if "accuracy" in curve:
        transfer = att.get("transfer", {})
        head = ["ε (/255)", "PGD (worst case ≤ ε)", "PGD at ε"]
        if "accuracy" in transfer:
            head.append("transfer")
        if "fusion_weight_w1" in curve:
            head.append("AFA W₁")
        rows = []
        for i, e in enumerate(curve["eps_255"]):
            row = [f"{e:g}", _pct(curve["accuracy"][i]), _pct(curve["pointwise_accuracy"][i])]
            if "accuracy" in transfer:
                row.append(_pct(transfer["accuracy"][i]))
            if "fusion_weight_w1" in curve:
                row.append(f"{curve['fusion_weight_w1'][i]:.3f}")
            rows.append(row)
        lines += ["**Accuracy vs ε** (PGD, step ε/4):", "", *_table(head, rows)]
    ada = att.get("adaptive", {})
    if "per_weighting" in ada:
        lines += [
            f"**AFA adaptive attack** (§5.2, BCE label {ada['bce_target']:g}): worst case over all "
            f"weightings {_pct(ada['accuracy'])}; best single weighting "
            f"{_pct(ada['best_single_weighting'])}; non-adaptive (W₀ detached) "
            f"{_pct(ada['non_adaptive_w0_detached']['accuracy'])}.",
            "",
        ]
        lines += _table(
            ["CE:BCE", "robust acc."], [[k, _pct(v)] for k, v in ada["per_weighting"].items()]
        )
    elif "skipped" in ada:
        lines += [f"AFA adaptive attack skipped: {ada['skipped']}.", ""]
    if "skipped" in transfer if (transfer := att.get("transfer", {})) else False:
        lines += [f"Transfer attack skipped: {transfer['skipped']}.", ""]
    return lines


def _corruptions(cor: dict[str, Any]) -> list[str]:
    sev = [str(s) for s in cor["severities"]]
    head = ["corruption", *[f"s{s}" for s in sev], "mean"]
    has_ce = "ce" in cor
    if has_ce:
        head.append("CE")
    rows = []
    for name, row in cor["accuracy"].items():
        cells = [
            name.replace("_", " "),
            *[_pct(row[s]) for s in sev],
            _pct(cor["mean_accuracy"][name]),
        ]
        if has_ce:
            cells.append(_pct(cor["ce"][name]))
        rows.append(cells)
    where = (
        f"corrupted at {cor['corrupted_at'][0]}×{cor['corrupted_at'][1]} px"
        if "corrupted_at" in cor
        else "per corruption and severity"
    )
    lines = [
        f"Corruption set: {cor.get('corruption_set', 'generated on the fly')}.",
        "",
        f"{cor['n']} test images, {where}; clean accuracy on them {_pct(cor['clean_accuracy'])}.",
        "",
    ]
    lines += _table(head, rows)
    if cor.get("mce") is not None:
        extra = f", relative mCE {_pct(cor['relative_mce'])}" if "relative_mce" in cor else ""
        lines += [
            f"mCE {_pct(cor['mce'])}{extra} (baseline: `{cor.get('baseline', 'given')}`).",
            "",
        ]
    else:
        lines += [
            f"Mean corruption error {_pct(cor['mean_corruption_error'])} ({cor.get('mce_note', '')}).",
            "",
        ]
    return lines


def _bn(bn: dict[str, Any]) -> list[str]:
    rows = []
    for name, res in bn["branches"].items():
        clean = res.get("clean", {}).get("top1")
        pgd = res.get("attacks", {}).get("pgd", {}).get("accuracy")
        shift = res.get("shift", {}).get("mean_accuracy")
        rows.append([name, _pct(clean), _pct(pgd), _pct(shift)])
    return _table(["BN branch", "clean top-1", "PGD", "mean shifted"], rows)


def _dense_clean(c: dict[str, Any]) -> list[str]:
    values = ", ".join(f"{DENSE_METRICS[k]} {_pct(c[k])}" for k in _scalars(c))
    lines = [f"{values} on {c['n']} images.", ""]
    if "iou_per_class" in c:
        ious = ", ".join("–" if v is None else f"{v:.3f}" for v in c["iou_per_class"])
        lines += [f"IoU per class (class 0 first): {ious}.", ""]
    return lines


def _dense_attacks(att: dict[str, Any]) -> list[str]:
    pgd = att.get("pgd", {})
    if "eps" not in pgd:
        return _skip(pgd) or []
    rows = [
        [
            DENSE_METRICS[k],
            _pct(pgd["clean"].get(k)),
            _pct(pgd[k]),
            _pct(pgd["drop"].get(k)),
        ]
        for k in _scalars(pgd)
    ]
    start = "random start" if pgd.get("random_start") else "no random start"
    return [
        f"PGD-{pgd['steps']} on the images ({_budget(pgd)}, L∞, {start}), ascending the "
        f"{pgd['loss']}; {pgd['n']} images.",
        "",
        *_table(["metric", "clean", "PGD", "drop"], rows),
    ]


def _dense_shift(sh: dict[str, Any]) -> list[str]:
    domains = sh["domains"]
    keys = _scalars(next(iter(domains.values())))
    rows = [[d, *[_pct(r.get(k)) for k in keys], str(r["n"])] for d, r in domains.items()]
    return _table(["domain", *[DENSE_METRICS[k] for k in keys], "images"], rows)


def _dense_sections(suites: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "clean" in suites:
        lines += ["## Clean", "", *(_skip(suites["clean"]) or _dense_clean(suites["clean"]))]
    if "attacks" in suites:
        att = suites["attacks"]
        lines += ["## Attacks", "", *(_skip(att) or _dense_attacks(att))]
    if "shift" in suites:
        sh = suites["shift"]
        lines += ["## Shifted domains", "", *(_skip(sh) or _dense_shift(sh))]
    return lines


def markdown_report(results: dict[str, Any]) -> str:
    """The report: summary, one section per suite, plots, configuration and versions."""
    run = results.get("run", {})
    suites = results.get("suites", {})
    title = " / ".join(str(run[k]) for k in ("method", "model", "dataset") if k in run)
    lines = [f"# Evaluation report{': ' + title if title else ''}", ""]
    facts = []
    if "checkpoint" in run:
        facts.append(f"checkpoint `{run['checkpoint']}`")
    if "epochs_trained" in run:
        facts.append(f"{run['epochs_trained']} epoch(s) trained")
    facts.append(f"{results['data']['test_size']} test images")
    if results["config"].get("max_images"):
        facts.append(f"evaluated on a seeded subset of {results['config']['max_images']}")
    facts.append(f"seed {results['config']['seed']}")
    facts.append(f"device {results['environment']['device']}")
    facts.append(f"{results['timing_s']['total']:.1f} s")
    lines += ["; ".join(facts) + ".", ""]
    summary = summary_rows(results)
    if summary:
        lines += ["## Summary", "", *_table(["metric", "value"], summary)]
    task = _task(results)
    if task != "classification":
        names = "AP / AP50 / AP75" if task == "detection" else "mIoU / pixel accuracy"
        lines += [DENSE_ROBUST_NOTE.format(metrics=names), "", *_dense_sections(suites)]
        return "\n".join([*lines, *_tail(results)])
    lines += [ROBUST_ACCURACY_NOTE, ""]
    if "clean" in suites:
        c = suites["clean"]
        lines += ["## Clean", ""]
        top5 = f", top-5 {_pct(c['top5'])}" if "top5" in c else ""
        lines += [f"Top-1 {_pct(c['top1'])}{top5} on {c['n']} images.", ""]
    if "attacks" in suites:
        lines += ["## Attacks", ""] + (_skip(suites["attacks"]) or _attacks(suites["attacks"]))
    if "corruptions" in suites:
        cor = suites["corruptions"]
        lines += ["## Corruptions", ""] + (_skip(cor) or _corruptions(cor))
    if "shift" in suites:
        sh = suites["shift"]
        lines += ["## Shifted domains", ""]
        lines += _skip(sh) or _table(
            ["domain", "accuracy", "images"],
            [[d, _pct(r["accuracy"]), str(r["n"])] for d, r in sh["domains"].items()],
        )
    if "bn" in suites:
        lines += ["## BN branches", ""] + (_skip(suites["bn"]) or _bn(suites["bn"]))
    if "divergence" in suites:
        dv = suites["divergence"]
        lines += ["## Feature divergence (AdvBN Eq. 4-5)", ""]
        if _skip(dv):
            lines += _skip(dv) or []
        else:
            pairs = list(dv["pairs"])
            rows = [
                [layer, *[f"{dv['pairs'][p]['per_layer'][layer]:.4g}" for p in pairs]]
                for layer in dv["layers"]
            ]
            lines += _table(["layer", *[p.replace("|", " vs ") for p in pairs]], rows)
    if "hessian" in suites:
        h = suites["hessian"]
        lines += ["## Hessian of the training loss (A-FAN Tab. 1)", ""]
        lines += [
            f"Top eigenvalue {h['eigenvalue']:.5g} ({h['iterations']} power iterations, "
            f"{'converged' if h['converged'] else 'not converged'}); trace {h['trace']:.5g} ± "
            f"{h['stderr']:.2g} (Hutchinson, {h['samples']} samples); {h['n']} {h['data']} images, "
            f"{h['parameters']} weights.",
            "",
        ]
    if "features" in suites and "site" in suites["features"]:
        f = suites["features"]
        lines += ["## Feature maps (A-FAN Fig. S6)", ""]
        lines += [
            f"Site `{f['site']}`, feature attack α = {f['alpha']:g} × {f['steps']} step(s), shown ×{f['magnify']:g}.",
            "",
        ]
    if "landscape" in suites:
        lines += ["## Loss landscape (A-FAN Fig. 3)", "", *_landscape(suites["landscape"])]
    if "advbn" in suites:
        lines += ["## AdvBN decoder and -AdvBN test set (AdvBN §3, App. B)", ""]
        lines += _skip(suites["advbn"]) or _advbn(suites["advbn"])
    eta = results.get("training", {}).get("eta")
    if eta:
        lines += ["## L-ALFA strengths η over training (ALFA Fig. 4)", "", *_eta(eta)]
    return "\n".join([*lines, *_tail(results)])


def _advbn(a: dict[str, Any]) -> list[str]:
    d, att, acc, ch = a["decoder"], a["attack"], a["accuracy"], a["mean_abs_change"]
    lines = [
        f"Decoder for site `{a['site']}` ({d['channels']}×{d['feature_size']}² → "
        f"{d['image_size']}² px), trained {d['epochs']} epochs on {d['train_images']} training "
        f"images (final MSE {d['train_mse'][-1]:.4f}); held-out MSE {d['held_out']['mse']:.4f} "
        f"(PSNR {d['held_out']['psnr_db']:.1f} dB). AdvBN: ε = {att['eps']:g}, step "
        f"{att['alpha']:g} × {att['steps']}, batches of {att['batch_size']}.",
        "",
    ]
    lines += _table(
        ["test set", "accuracy (this model)", "mean |Δ pixel| vs original"],
        [
            ["original", _pct(acc["original"]), "0"],
            ["reconstructed", _pct(acc["reconstructed"]), f"{ch['reconstructed_vs_original']:.4f}"],
            ["-AdvBN", _pct(acc["advbn"]), f"{ch['advbn_vs_original']:.4f}"],
        ],
    )
    if a.get("folders"):
        f = a["folders"]
        lines += [
            f"Image folders: `{f['advbn']}`, `{f['reconstructed']}` (score any model with "
            f"`--suite shift --domain advbn={f['advbn']}`).",
            "",
        ]
    return lines


def _eta(eta: dict[str, Any]) -> list[str]:
    epochs = eta["epoch"]
    shown = sorted({0, len(epochs) // 2, len(epochs) - 1}) if epochs else []
    head = ["site", *[f"epoch {epochs[i]}" for i in shown]]
    rows = [[s, *[f"{eta['eta'][s][i]:.3f}" for i in shown]] for s in eta["sites"]]
    lines = _table(head, rows)
    if eta.get("dominant_site") is not None and eta.get("final_share") is not None:
        lines += [
            f"Largest final strength: `{eta['dominant_site']}` "
            f"({100 * eta['final_share']:.0f} % of Σ|η|).",
            "",
        ]
    return lines


def _landscape(land: dict[str, Any]) -> list[str]:
    if _skip(land):
        return _skip(land) or []
    models = [("this model", land)]
    ref = land.get("reference")
    if isinstance(ref, dict) and "1d" in ref:
        run = ref.get("run", {})
        models.append(
            (" / ".join(str(run[k]) for k in ("method", "model") if k in run) or "reference", ref)
        )
    lines = [
        f"Mean cross-entropy on {land['n']} {land['data']} images along filter-normalised random "
        f"directions (Li et al. 2018), α ∈ [−{land['range']:g}, {land['range']:g}]; "
        f"{'biases and BN parameters kept fixed' if land['ignore_biasbn'] else 'biases and BN parameters scaled by 1 + α'}; "
        "BN in eval mode with the trained running statistics.",
        "",
    ]
    rows = []
    for name, m in models:
        c = m["1d"]
        rows.append(
            [
                name,
                f"{c['loss_at_zero']:.4g}",
                _pct(c.get("accuracy_at_zero")),
                f"{c['mean_loss_increase']:.4g}",
                f"{c['max_loss_increase']:.4g}",
                f"{c['width_loss_below_plus_1']:.3g}",
            ]
        )
    head = [
        "model",
        "loss at α=0",
        "acc. at α=0",
        "mean increase",
        "max increase",
        "width (+1 nat)",
    ]
    return lines + _table(head, rows)


def _tail(results: dict[str, Any]) -> list[str]:
    """Plots, configuration and environment."""
    lines: list[str] = []
    plots = results.get("plots", {})
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name.replace('_', ' ')}]({path})" for name, path in plots.items()] + [""]
    lines += ["## Configuration and environment", "", "```json"]
    lines += [
        json.dumps({"config": results["config"], "environment": results["environment"]}, indent=2)
    ]
    lines += ["```", ""]
    return lines
