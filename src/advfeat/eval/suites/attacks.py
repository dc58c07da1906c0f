"""``attacks``: white-box, black-box (transfer), AutoAttack and AFA's adaptive attack.

* ``pgd`` — PGD-20, L∞ ε = 8/255, step 2/255, random start (Madry et al. 2018; AFA Tab. 3).
* ``fgsm`` — FGSM at ε (Goodfellow et al. 2015).
* ``cw`` — Carlini–Wagner L2, a minimum-norm attack: reported are the share of points it fails to
  fool within its optimisation budget (fixed ``cw_c`` by default; ``cw_search_steps > 1`` runs the
  paper's binary search over c), the median L2 of its successful perturbations, and accuracy at
  the L2 budgets ``cw_l2_budgets`` (not fooled with ‖δ‖₂ ≤ r).
* ``curve`` — PGD at ε ∈ {0, 1, 2, 4, 8}/255 with step ε/4 (AFA Tab. 1), reported as the
  per-sample worst case over ε' ≤ ε (non-increasing; see :mod:`advfeat.eval.robust`), with the
  raw per-ε values alongside. For AFA models the mean fusion weight at each ε is recorded (Fig. 6).
* ``transfer`` — the curve's PGD run on a surrogate model, judged on the evaluated model
  (AFA Tab. 3 right); needs a surrogate.
* ``autoattack`` — AutoAttack's standard version through an optional package (the authors' code
  when installed), its backend, version and parameters recorded, with sanity checks (see
  :mod:`advfeat.eval.autoattack`); ``autoattack-fast`` — a cheaper variant under its own name.
* ``adaptive`` — AFA §5.2's adaptive attack on W_0 (see :mod:`advfeat.eval.adaptive`); AFA
  models only.

Robust accuracy everywhere = correct on the clean image AND on the attacked one (≤ clean).

Detection, segmentation and every other task that is not a classifier
(:func:`advfeat.tasks.is_classifier_task`; A-FAN §5-6, Tables 5-6): ``pgd`` only — image-space
PGD on the task's training loss (:class:`advfeat.tasks.DensePGD`), PGD-10 with ε = 2/255,
α = 0.3/255 (detection) or ε = 8/255, α = 1/255 (segmentation and the others) unless ``eps`` /
``pgd_alpha`` / ``pgd_steps`` say otherwise; the robust AP / mIoU is the task's metric on the attacked images
(the paper's definition: it is not capped by the clean value), reported with the clean value on
the same images and the drop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from advfeat.attacks.base import attack_guard
from advfeat.attacks.pixel import CWL2, FGSM, PGD
from advfeat.errors import AdvfeatError
from advfeat.eval.adaptive import adaptive_loss, find_fusion, fusion_weight_tap, per_sample_w0
from advfeat.eval.autoattack import (
    MISSING_HINT,
    autoattack_backend,
    make_autoattack,
    model_checks,
    perturbation_check,
)
from advfeat.eval.config import (
    ADAPTIVE_WEIGHTS,
    ATTACK_NAMES,
    DENSE_ATTACK_NAMES,
    EPS,
    POSITIVE,
    EvalConfig,
    check_eps,
    names_of,
)
from advfeat.eval.context import EvalContext
from advfeat.eval.plots import plot_eps_curve, plot_fusion_weight
from advfeat.eval.report import (
    dense_scalars,
    md_table,
    metric_label,
    pct,
    pgd_budget,
    skip_lines,
)
from advfeat.eval.robust import (
    Outcome,
    accuracy_within_l2,
    attack_outcome,
    summarize,
    worst_case_curve,
)
from advfeat.eval.suites.metrics import task_metrics
from advfeat.eval.suites.registry import options_of, register_suite, skipped
from advfeat.options import Choice, Each, Integer, option
from advfeat.tasks import DensePGD, Task, is_classifier_task
from advfeat.tasks.robust import DETECTION_PGD, SEGMENTATION_PGD

__all__ = ["AttackOptions", "run"]


@dataclass
class AttackOptions:
    """Settings of the ``attacks`` suite (AFA Tab. 1 and 3; Madry et al.). Budgets are on
    images in [0, 1]: ``eps=8/255`` is the usual 8 pixel levels."""

    names: tuple[str, ...] = ("pgd", "fgsm", "cw", "curve")
    """The attacks run (``transfer`` needs a surrogate, ``adaptive`` an AFA model;
    ``autoattack-fast`` is a cheaper variant, never the standard AutoAttack)."""
    eps: float = option(8 / 255, EPS)
    pgd_steps: int = option(20, Integer(low=1))
    pgd_alpha: float = option(2 / 255, EPS)
    eps_curve: tuple[float, ...] = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
    curve_alpha_ratio: float = option(0.25, POSITIVE)
    """Step size of the ε-curve's PGD as a fraction of ε (0.25: 2/255 at ε = 8/255)."""
    cw_steps: int = option(100, Integer(low=1))
    cw_c: float = option(1.0, POSITIVE)
    cw_lr: float = option(0.01, POSITIVE)
    cw_search_steps: int = option(1, Integer(low=1))
    """Rounds of Carlini & Wagner's binary search over c (1: the fixed ``cw_c``, no search)."""
    cw_l2_budgets: tuple[float, ...] = option((0.25, 0.5, 1.0), Each(POSITIVE, min_len=1))
    """L2 budgets at which the C&W suite reports accuracy (samples not fooled within the budget)."""
    autoattack_version: str = option("standard", Choice("standard", "plus", "rand"))
    adaptive_weights: tuple[tuple[float, float], ...] = ADAPTIVE_WEIGHTS
    adaptive_bce_target: float = 0.0

    @classmethod
    def defaults(cls, task: str) -> dict[str, Any]:
        """Tasks other than classifiers follow A-FAN's robustness protocol (§5-6): PGD-10 with
        ε = 2/255, α = 0.3/255 (detection) or ε = 8/255, α = 1/255 (segmentation and the
        others), no random start; only the ``pgd`` attack."""
        if is_classifier_task(task):
            return {}
        pgd = DETECTION_PGD if task == "detection" else SEGMENTATION_PGD
        return {
            "eps": pgd["eps"],
            "pgd_alpha": pgd["alpha"],
            "pgd_steps": pgd["steps"],
            "names": DENSE_ATTACK_NAMES,
        }

    def validate(self, task: str) -> None:
        self.names = names_of(self.names, "attack", ATTACK_NAMES)
        wrong = [n for n in self.names if n not in DENSE_ATTACK_NAMES]
        if wrong and not is_classifier_task(task):
            raise AdvfeatError(
                f"attack {', '.join(map(repr, wrong))} does not apply to {task} models "
                f"(they report AP / mIoU, not class accuracy); {task} attacks: "
                f"{', '.join(DENSE_ATTACK_NAMES)}"
            )
        curve = tuple(check_eps(e, "ε-curve value") for e in self.eps_curve)
        if not curve:
            raise AdvfeatError("eps_curve needs at least one value, e.g. 0,1,2,4,8 (/255)")
        self.eps_curve = tuple(sorted(set(curve)))
        self.cw_l2_budgets = tuple(sorted(set(self.cw_l2_budgets)))
        self.adaptive_weights = tuple(
            (POSITIVE("", "CE weight", a), POSITIVE("", "BCE weight", b))
            for a, b in self.adaptive_weights
        )
        if float(self.adaptive_bce_target) not in (0.0, 1.0):
            raise AdvfeatError(
                f"adaptive_bce_target is the W_0 label of the BCE term, 0 or 1, got "
                f"{self.adaptive_bce_target!r}"
            )


def _eps_key(eps: float) -> str:
    return f"eps={eps * 255:.4g}/255"


def _outcome(ctx: EvalContext, key: str, compute: Callable[[], Outcome]) -> Outcome:
    return Outcome.from_json(ctx.unit(key, lambda: compute().to_json()))


def _identity(x: Tensor, y: Tensor) -> Tensor:
    return x


def _pgd(ctx: EvalContext, key: str, eps: float, alpha: float, **kw: Any) -> PGD:
    return PGD(
        ctx.model,
        eps=eps,
        alpha=alpha,
        steps=options_of(ctx.config, "attacks").pgd_steps,
        seed=ctx.seed_for(key),
        **kw,
    )


def _curve(ctx: EvalContext, dataset: Dataset, fusion: Any) -> dict[str, Any]:
    cfg = ctx.config
    opts: AttackOptions = options_of(cfg, "attacks")
    outcomes: list[Outcome] = []
    weights: list[float] = []
    spreads: list[float] = []
    for eps in opts.eps_curve:
        key = f"attacks/curve/{_eps_key(eps)}"

        def compute(eps: float = eps, key: str = key) -> dict[str, Any]:
            attack = (
                _identity
                if eps == 0
                else _pgd(ctx, key, eps, max(eps * opts.curve_alpha_ratio, 1e-12))
            )
            w0: list[float] = []

            def observe(x_adv: Tensor, y: Tensor) -> None:
                if fusion is not None:
                    with fusion_weight_tap(fusion) as store, torch.no_grad():
                        ctx.model(x_adv)
                    w0.extend(per_sample_w0(store["w0"]).tolist())

            outcome = attack_outcome(
                ctx, attack, dataset, f"PGD ε={eps * 255:.3g}/255", observe=observe
            )
            return {"outcome": outcome.to_json(), "w0": w0}

        saved = ctx.unit(key, compute)
        outcomes.append(Outcome.from_json(saved["outcome"]))
        if saved["w0"]:
            w0 = torch.tensor(saved["w0"], dtype=torch.float64)
            weights.append(float(w0.mean()))
            spreads.append(float(w0.std(correction=0)))
    result = worst_case_curve(list(opts.eps_curve), outcomes)
    result["eps_255"] = [round(e * 255, 4) for e in opts.eps_curve]
    result["alpha_ratio"] = opts.curve_alpha_ratio
    result["steps"] = opts.pgd_steps
    if weights:
        result["fusion_weight_w0"] = weights
        result["fusion_weight_w1"] = [1 - w for w in weights]
        # spread over the attacked images: ~0 when the generator outputs one weight for every
        # input instead of adapting to it (AFA Fig. 6)
        result["fusion_weight_w1_image_std"] = spreads
    return result


def _transfer(ctx: EvalContext, dataset: Dataset) -> dict[str, Any]:
    cfg = ctx.config
    opts: AttackOptions = options_of(cfg, "attacks")
    surrogate = ctx.surrogate
    if surrogate is None:
        return skipped("no surrogate model given (--surrogate PATH)")
    outcomes = []
    for eps in opts.eps_curve:
        key = f"attacks/transfer/{_eps_key(eps)}"

        def compute(eps: float = eps, key: str = key) -> Outcome:
            attack = (
                _identity
                if eps == 0
                else PGD(
                    surrogate,
                    eps=eps,
                    alpha=max(eps * opts.curve_alpha_ratio, 1e-12),
                    steps=opts.pgd_steps,
                    seed=ctx.seed_for(key),
                )
            )
            return attack_outcome(ctx, attack, dataset, f"transfer ε={eps * 255:.3g}/255")

        outcomes.append(_outcome(ctx, key, compute))
    result = worst_case_curve(list(opts.eps_curve), outcomes)
    result["eps_255"] = [round(e * 255, 4) for e in opts.eps_curve]
    result["surrogate"] = cfg.extra.get("surrogate", "given model")
    return result


def _cw_label(c: float, steps: int, search_steps: int) -> str:
    """What the C&W figure is: the share of points its minimum-norm search did not fool within
    its optimisation budget — not an accuracy at a stated L2 radius, and not unbounded."""
    search = (
        f"binary search over c from {c:g}, {search_steps} rounds"
        if search_steps > 1
        else (f"fixed c = {c:g}, no search over c")
    )
    return f"C&W-L2 not fooled ({search}, {steps} steps; no L2 budget)"


def _autoattack(
    ctx: EvalContext, dataset: Dataset, pgd: dict[str, Any] | None, *, fast: bool = False
) -> dict[str, Any]:
    cfg = ctx.config
    opts: AttackOptions = options_of(cfg, "attacks")
    backend = autoattack_backend()
    if backend is None:
        return skipped(f"no AutoAttack package installed ({MISSING_HINT})")
    key = "attacks/autoattack-fast" if fast else "attacks/autoattack"
    adversary = make_autoattack(
        ctx.model,
        eps=opts.eps,
        version="fast" if fast else opts.autoattack_version,
        seed=ctx.seed_for(key),
        num_classes=ctx.data.num_classes,
        device=ctx.device,
    )
    lo_hi = [1.0, 0.0]

    def attack(x: Tensor, y: Tensor) -> Tensor:
        with attack_guard(ctx.model):
            x_adv = adversary(x, y).detach().to(x.device)
        lo_hi[0] = min(lo_hi[0], float(x_adv.min()))
        lo_hi[1] = max(lo_hi[1], float(x_adv.max()))
        return x_adv

    def compute() -> dict[str, Any]:
        outcome = attack_outcome(ctx, attack, dataset, "AutoAttack")
        first_x, _ = next(ctx.batches(dataset))
        checks = model_checks(ctx.model, first_x)
        summary = summarize(outcome)
        checks["in_budget"] = perturbation_check(summary["max_linf"], opts.eps, *lo_hi)
        if pgd is not None and "accuracy" in pgd:
            weaker = summary["accuracy"] > pgd["accuracy"] + 1e-9
            checks["not_weaker_than_pgd"] = {
                "passed": not weaker,
                "detail": f"AutoAttack {summary['accuracy']:.4f} vs PGD {pgd['accuracy']:.4f}",
            }
        for name, check in checks.items():
            if not check["passed"]:
                warnings.warn(f"AutoAttack check {name} failed: {check['detail']}", stacklevel=2)
        return {
            **summary,
            "backend": adversary.backend,
            "backend_version": adversary.backend_version,
            "version": adversary.version,
            "parameters": adversary.parameters,
            "label": f"AutoAttack-{adversary.version} [{adversary.describe()}]",
            "checks": checks,
        }

    return ctx.unit(key, compute)


def _adaptive(ctx: EvalContext, dataset: Dataset, fusion: Any) -> dict[str, Any]:
    cfg = ctx.config
    opts: AttackOptions = options_of(cfg, "attacks")
    if fusion is None:
        return skipped("not an AFA model (no AdaptiveFeatureAlignment module)")

    def run_pgd(key: str, *, detach: bool, weights: tuple[float, float] | None) -> Outcome:
        def compute() -> Outcome:
            with fusion_weight_tap(fusion, detach=detach) as store:
                loss = (
                    None
                    if weights is None
                    else adaptive_loss(store, weights[0], weights[1], opts.adaptive_bce_target)
                )
                attack = _pgd(ctx, key, opts.eps, opts.pgd_alpha, loss_fn=loss)
                return attack_outcome(ctx, attack, dataset, key.rsplit("/", 1)[-1])

        return _outcome(ctx, key, compute)

    detached = run_pgd("attacks/adaptive/w0_detached", detach=True, weights=None)
    per_weight: dict[str, Any] = {}
    alive = list(detached.clean)
    for ce_w, bce_w in opts.adaptive_weights:
        label = f"{ce_w:g}:{bce_w:g}"
        outcome = run_pgd(f"attacks/adaptive/ce_bce={label}", detach=False, weights=(ce_w, bce_w))
        per_weight[label] = summarize(outcome)["accuracy"]
        alive = [a and b for a, b in zip(alive, outcome.adv, strict=True)]
    worst = sum(alive) / len(alive) if alive else 0.0
    return {
        "accuracy": worst,
        "best_single_weighting": min(per_weight.values()) if per_weight else worst,
        "per_weighting": per_weight,
        "non_adaptive_w0_detached": summarize(detached),
        "bce_target": opts.adaptive_bce_target,
        "eps": opts.eps,
        "steps": opts.pgd_steps,
    }


def _dense(ctx: EvalContext, task: Task) -> dict[str, Any]:
    """Robust AP / mIoU under image-space PGD on the task loss (A-FAN Tables 5-6)."""
    cfg = ctx.config
    opts: AttackOptions = options_of(cfg, "attacks")
    if "pgd" not in opts.names:
        return skipped(f"no attack chosen ({task.name} models are attacked with pgd)")
    dataset = ctx.test_set()
    attack = DensePGD(
        task, eps=opts.eps, alpha=opts.pgd_alpha, steps=opts.pgd_steps, seed=ctx.seed_for("pgd")
    )
    clean = ctx.unit("attacks/clean", lambda: task_metrics(ctx, dataset, "attacks/clean"))
    robust = ctx.unit("attacks/pgd", lambda: task_metrics(ctx, dataset, "attacks/pgd", attack))
    scalars = [k for k, v in robust.items() if isinstance(v, float) and k not in ("n", "seed")]
    drop = {k: clean[k] - robust[k] for k in scalars if clean.get(k) is not None}
    pgd = {
        **robust,
        "clean": {k: clean[k] for k in scalars},
        "drop": drop,
        "eps": opts.eps,
        "alpha": opts.pgd_alpha,
        "steps": opts.pgd_steps,
        "random_start": False,
        "loss": f"{task.name} training loss against the ground truth",
    }
    return {"eps": opts.eps, "pgd": pgd}


def ready(config: EvalConfig) -> list[str]:
    """AutoAttack (standard or ``autoattack-fast``) needs an AutoAttack package (an optional
    extra)."""
    if {"autoattack", "autoattack-fast"} & set(
        options_of(config, "attacks").names
    ) and autoattack_backend() is None:
        return [f"AutoAttack was asked for, but {MISSING_HINT}"]
    return []


def report(att: dict[str, Any], task: str) -> list[str]:
    """Robust accuracy per attack, the ε-curve, AutoAttack checks, AFA's adaptive attack;
    for the other tasks (detection, segmentation), the metrics clean and under PGD."""
    return _attacks(att) if is_classifier_task(task) else _dense_attacks(att)


@register_suite(
    "attacks",
    "PGD-20, FGSM, C&W-L2, ε-curve, transfer, AutoAttack, AFA adaptive",
    order=10,
    tasks=None,  # every task, those registered later too
    title="Attacks",
    report=report,
    plots={"accuracy_vs_eps": plot_eps_curve, "fusion_weight": plot_fusion_weight},
    per_branch=True,
    ready=ready,
    options=AttackOptions,
    aliases={
        "attacks": "names",
        **{f: f for f in AttackOptions.__dataclass_fields__ if f != "names"},
    },
)
def run(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.config
    opts: AttackOptions = options_of(cfg, "attacks")
    if not ctx.data.task.classifier:
        return _dense(ctx, ctx.data.task)
    dataset = ctx.test_set()
    fusion = find_fusion(ctx.model)
    results: dict[str, Any] = {"eps": opts.eps}
    if "pgd" in opts.names:

        def pgd() -> Outcome:
            atk = _pgd(ctx, "attacks/pgd", opts.eps, opts.pgd_alpha)
            return attack_outcome(ctx, atk, dataset, f"PGD-{opts.pgd_steps}")

        summary = summarize(_outcome(ctx, "attacks/pgd", pgd))
        results["pgd"] = {**summary, "steps": opts.pgd_steps, "alpha": opts.pgd_alpha}
    if "fgsm" in opts.names:

        def fgsm() -> Outcome:
            return attack_outcome(ctx, FGSM(ctx.model, eps=opts.eps), dataset, "FGSM")

        results["fgsm"] = summarize(_outcome(ctx, "attacks/fgsm", fgsm))
    if "cw" in opts.names:

        def cw() -> Outcome:
            atk = CWL2(
                ctx.model,
                c=opts.cw_c,
                steps=opts.cw_steps,
                lr=opts.cw_lr,
                search_steps=opts.cw_search_steps,
            )
            return attack_outcome(ctx, atk, dataset, "C&W-L2")

        cw_outcome = _outcome(ctx, "attacks/cw", cw)
        budgets = list(opts.cw_l2_budgets)
        results["cw"] = {
            **summarize(cw_outcome),
            "c": opts.cw_c,
            "steps": opts.cw_steps,
            "search_steps": opts.cw_search_steps,
            "l2_budgets": budgets,
            "accuracy_within_l2": accuracy_within_l2(cw_outcome, budgets),
            "label": _cw_label(opts.cw_c, opts.cw_steps, opts.cw_search_steps),
        }
    if "curve" in opts.names:
        results["curve"] = _curve(ctx, dataset, fusion)
    if "transfer" in opts.names:
        results["transfer"] = (
            _transfer(ctx, dataset)
            if ctx.surrogate is not None
            else skipped("no surrogate model given (--surrogate PATH)")
        )
    if "autoattack" in opts.names:
        results["autoattack"] = _autoattack(ctx, dataset, results.get("pgd"))
    if "autoattack-fast" in opts.names:
        results["autoattack_fast"] = _autoattack(ctx, dataset, results.get("pgd"), fast=True)
    if "adaptive" in opts.names:
        results["adaptive"] = _adaptive(ctx, dataset, fusion)
    return results


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
                    pct(res["accuracy"]),
                    pct(res["clean_accuracy"]),
                    pct(res["attacked_accuracy"]),
                    "–" if l2 is None else f"{l2:.3f}",
                ]
            )
        elif "skipped" in res:
            rows.append([label, f"skipped: {res['skipped']}", "", "", ""])
    if rows:
        lines += md_table(
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
            head.append("AFA W₁ (± std over images)")
        rows = []
        for i, e in enumerate(curve["eps_255"]):
            row = [f"{e:g}", pct(curve["accuracy"][i]), pct(curve["pointwise_accuracy"][i])]
            if "accuracy" in transfer:
                row.append(pct(transfer["accuracy"][i]))
            if "fusion_weight_w1" in curve:
                spread = curve.get("fusion_weight_w1_image_std")
                w1 = f"{curve['fusion_weight_w1'][i]:.3f}"
                row.append(f"{w1} ± {spread[i]:.3f}" if spread else w1)
            rows.append(row)
        lines += ["**Accuracy vs ε** (PGD, step ε/4):", "", *md_table(head, rows)]
    ada = att.get("adaptive", {})
    if "per_weighting" in ada:
        lines += [
            f"**AFA adaptive attack** (§5.2, BCE label {ada['bce_target']:g}): worst case over all "
            f"weightings {pct(ada['accuracy'])}; best single weighting "
            f"{pct(ada['best_single_weighting'])}; non-adaptive (W₀ detached) "
            f"{pct(ada['non_adaptive_w0_detached']['accuracy'])}.",
            "",
        ]
        lines += md_table(
            ["CE:BCE", "robust acc."], [[k, pct(v)] for k, v in ada["per_weighting"].items()]
        )
    elif "skipped" in ada:
        lines += [f"AFA adaptive attack skipped: {ada['skipped']}.", ""]
    if "skipped" in transfer if (transfer := att.get("transfer", {})) else False:
        lines += [f"Transfer attack skipped: {transfer['skipped']}.", ""]
    return lines


def _dense_attacks(att: dict[str, Any]) -> list[str]:
    pgd = att.get("pgd", {})
    if "eps" not in pgd:
        return skip_lines(pgd) or []
    rows = [
        [
            metric_label(k),
            pct(pgd["clean"].get(k)),
            pct(pgd[k]),
            pct(pgd["drop"].get(k)),
        ]
        for k in dense_scalars(pgd)
    ]
    start = "random start" if pgd.get("random_start") else "no random start"
    return [
        f"PGD-{pgd['steps']} on the images ({pgd_budget(pgd)}, L∞, {start}), ascending the "
        f"{pgd['loss']}; {pgd['n']} images.",
        "",
        *md_table(["metric", "clean", "PGD", "drop"], rows),
    ]
