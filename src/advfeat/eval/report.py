"""A Markdown report of evaluation results (written next to the JSON as ``<stem>.md``).

Classification results show accuracies; detection and segmentation results (``config.task``)
show AP / AP50 / AP75 or mIoU / pixel accuracy, clean, under PGD and on shifted domains, and a
task of one's own its metrics by their names (a classifier task's are accuracies,
:func:`advfeat.tasks.is_classifier_task`). Each
suite draws its own section: the runner hands the registered suites to :func:`markdown_report`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from advfeat.tasks.registry import is_classifier_task

__all__ = [
    "DENSE_METRICS",
    "METRIC_LABELS",
    "ReportFn",
    "SuiteSection",
    "dense_scalars",
    "markdown_report",
    "md_table",
    "metric_keys",
    "metric_label",
    "pct",
    "pgd_budget",
    "shift_mean",
    "skip_lines",
    "summary_rows",
]

DENSE_METRICS = {
    "ap": "AP",
    "ap50": "AP50",
    "ap75": "AP75",
    "miou": "mIoU",
    "pixel_acc": "pixel acc.",
}
"""The scalar metrics of detection and segmentation, in report order, with their labels."""
METRIC_LABELS = {"top1": "accuracy", "top5": "top-5 accuracy", **DENSE_METRICS}
"""The label of every task's metric (under its evaluation name), in report order."""

ReportFn = Callable[[dict[str, Any], str], list[str]]
"""``(suite result, task) -> Markdown lines`` of the suite's report section."""


class SuiteSection(Protocol):
    """What the report needs of a suite (:class:`advfeat.eval.suites.Suite` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def report(self) -> ReportFn | None: ...
    @property
    def report_skipped(self) -> bool: ...


ROBUST_ACCURACY_NOTE = (
    "Robust accuracy counts a test image as robust only if the model is correct on it both "
    "clean and attacked, so it never exceeds clean accuracy; the ε-curve takes, per image, "
    "the worst case over all smaller budgets, so it never increases with ε."
)
DENSE_NOTE_METRICS = {"detection": "AP / AP50 / AP75", "segmentation": "mIoU / pixel accuracy"}
"""How the note under the summary names the robust metrics of detection and segmentation."""
DENSE_ROBUST_NOTE = (
    "Robust {metrics} are the metrics on the PGD-attacked test images (A-FAN Tables 5-6); unlike "
    "robust accuracy they are not capped by the clean value, so the drop is reported as well."
)


def pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f} %"


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def skip_lines(res: dict[str, Any]) -> list[str] | None:
    return [f"*Skipped: {res['skipped']}.*", ""] if "skipped" in res else None


def _task(results: dict[str, Any]) -> str:
    return str(results.get("config", {}).get("task", "classification"))


def dense_scalars(res: Mapping[str, Any]) -> list[str]:
    """The metrics in a result of a task that is not a classifier, in report order: AP / mIoU
    first, then the task's own; a PGD result's are those it compares with its ``clean`` values."""
    clean = res.get("clean")
    if isinstance(clean, Mapping):  # the attacks suite's PGD result
        return [
            *(k for k in DENSE_METRICS if k in res),
            *(k for k in clean if k not in DENSE_METRICS),
        ]
    return metric_keys(res)


def metric_label(key: str) -> str:
    """How the report names metric ``key`` (a new task's metric: by its own name)."""
    return METRIC_LABELS.get(key, key)


def metric_keys(res: Mapping[str, Any]) -> list[str]:
    """The scalar metrics of a task's result (:func:`~advfeat.eval.suites.metrics.task_metrics`):
    the known ones in report order, then any other number but ``n`` and ``seed``."""
    known = [k for k in METRIC_LABELS if k in res]
    return known + [
        k
        for k, v in res.items()
        if k not in METRIC_LABELS
        and k not in ("n", "seed")
        and (v is None or (isinstance(v, int | float) and not isinstance(v, bool)))
    ]


def shift_mean(shift: Mapping[str, Any]) -> tuple[str, Any]:
    """``(metric, mean over the domains)`` of a ``shift`` result: ``mean_<metric>``, where
    ``metric`` names the task's headline (``top1``, ``ap50``, ``miou``); a result written
    before the suite named its metric holds ``mean_accuracy``. The mean is ``None`` when absent."""
    metric = str(shift.get("metric", "accuracy"))
    return metric, shift.get(f"mean_{metric}")


def _shift_rows(shift: Mapping[str, Any]) -> list[list[str]]:
    metric, mean = shift_mean(shift)
    if f"mean_{metric}" not in shift:
        return []
    return [[f"mean shifted-domain {metric_label(metric)}", pct(mean)]]


def pgd_budget(res: dict[str, Any]) -> str:
    return f"ε = {255 * res['eps']:.3g}/255, step {255 * res['alpha']:.3g}/255"


def _dense_summary(suites: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    clean = suites.get("clean", {})
    rows += [[f"clean {metric_label(k)}", pct(clean[k])] for k in dense_scalars(clean)]
    pgd = suites.get("attacks", {}).get("pgd", {})
    label = f"PGD-{pgd.get('steps', '')} ({pgd_budget(pgd)})" if "eps" in pgd else ""
    rows += [[f"{label} {metric_label(k)}", pct(pgd[k])] for k in dense_scalars(pgd)]
    rows += _shift_rows(suites.get("shift", {}))
    return rows


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """``[metric, value]`` rows of the report's summary table (and of ``advfeat eval``'s output)."""
    suites = results.get("suites", {})
    return _summary(suites) if is_classifier_task(_task(results)) else _dense_summary(suites)


def _summary(suites: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    clean = suites.get("clean", {})
    if "top1" in clean:
        rows.append(["clean top-1", pct(clean["top1"])])
    if "top5" in clean:
        rows.append(["clean top-5", pct(clean["top5"])])
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
            rows.append([shown, pct(res["accuracy"])])
    cw = att.get("cw", {})
    for r, acc in zip(cw.get("l2_budgets", []), cw.get("accuracy_within_l2", []), strict=False):
        rows.append([f"C&W-L2 accuracy at ‖δ‖₂ ≤ {r:g}", pct(acc)])
    transfer = att.get("transfer", {})
    if "accuracy" in transfer:
        rows.append(
            [
                f"black-box transfer (ε = {transfer['eps_255'][-1]:g}/255)",
                pct(transfer["accuracy"][-1]),
            ]
        )
    cor = suites.get("corruptions", {})
    if "mean_corruption_accuracy" in cor:
        rows.append(["mean corruption accuracy", pct(cor["mean_corruption_accuracy"])])
        if cor.get("mce") is not None:
            rows.append(["mCE (vs baseline)", pct(cor["mce"])])
    rows += _shift_rows(suites.get("shift", {}))
    land = suites.get("landscape", {}).get("1d", {})
    if land.get("mean_loss_increase") is not None:
        rows.append(["loss-landscape mean increase (1-D)", f"{land['mean_loss_increase']:.4g}"])
    hess = suites.get("hessian", {})
    if "spectral_norm" in hess:
        rows.append(["Hessian spectral norm", f"{hess['spectral_norm']:.4g}"])
        rows.append(["Hessian trace", f"{hess['trace']:.4g} ± {hess['stderr']:.2g}"])
    return rows


def suite_sections(results: dict[str, Any], task: str, suites: Sequence[SuiteSection]) -> list[str]:
    """One section per suite with a result in ``results``, each drawn by the suite itself, in the
    order of ``suites``."""
    lines: list[str] = []
    for suite in suites:
        res = results.get(suite.name)
        if res is None or suite.report is None:
            continue
        if "skipped" in res:
            if suite.report_skipped:
                lines += [f"## {suite.title}", "", *(skip_lines(res) or [])]
            continue
        lines += [f"## {suite.title}", "", *suite.report(res, task)]
    return lines


def markdown_report(results: dict[str, Any], suites: Sequence[SuiteSection]) -> str:
    """The report: summary, one section per suite (``suites``: the registered suites in run
    order, :func:`advfeat.eval.suites.ordered_suites`), plots, configuration and versions."""
    run = results.get("run", {})
    suites_results = results.get("suites", {})
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
        lines += ["## Summary", "", *md_table(["metric", "value"], summary)]
    task = _task(results)
    classifier = is_classifier_task(task)
    if classifier:
        lines += [ROBUST_ACCURACY_NOTE, ""]
    else:
        own = " / ".join(map(metric_label, dense_scalars(suites_results.get("clean", {}))))
        names = DENSE_NOTE_METRICS.get(task, own or "metrics")
        lines += [DENSE_ROBUST_NOTE.format(metrics=names), ""]
    lines += suite_sections(suites_results, task, suites)
    if not classifier:
        return "\n".join([*lines, *_tail(results)])
    eta = results.get("training", {}).get("eta")
    if eta:
        lines += ["## L-ALFA strengths η over training (ALFA Fig. 4)", "", *_eta(eta)]
    return "\n".join([*lines, *_tail(results)])


def _eta(eta: dict[str, Any]) -> list[str]:
    epochs = eta["epoch"]
    shown = sorted({0, len(epochs) // 2, len(epochs) - 1}) if epochs else []
    head = ["site", *[f"epoch {epochs[i]}" for i in shown]]
    rows = [[s, *[f"{eta['eta'][s][i]:.3f}" for i in shown]] for s in eta["sites"]]
    lines = md_table(head, rows)
    if eta.get("dominant_site") is not None and eta.get("final_share") is not None:
        lines += [
            f"Largest final strength: `{eta['dominant_site']}` "
            f"({100 * eta['final_share']:.0f} % of Σ|η|).",
            "",
        ]
    return lines


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
