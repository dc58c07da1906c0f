"""``advfeat eval``: evaluate a checkpoint written by ``advfeat train`` and write JSON, a
Markdown report and PNG plots. Detection and segmentation runs are evaluated with their task
(AP / mIoU; suites clean, attacks, shift; A-FAN's PGD-10 unless --eps / --pgd-steps)."""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from advfeat.errors import AdvfeatError

__all__ = ["CPU_MAX_IMAGES", "add_parser", "options_from_args", "parse_budget", "run"]

CPU_MAX_IMAGES = 500
"""Test images evaluated by default on a CPU: the attacks take minutes there, not an hour
(±2.2 points of sampling error at 50 % accuracy; --all-images for the whole test set)."""


def parse_budget(text: str) -> float:
    """``"8/255"`` or ``"0.0314"`` → a float (checked to lie in [0, 1] by the config)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise AdvfeatError(
            f"a budget is a number or a fraction such as 8/255, got {text!r}"
        ) from None


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub: Any) -> None:
    from advfeat.eval.suites import suite_names

    p = sub.add_parser(
        "eval",
        help="evaluate a trained checkpoint (accuracy or AP / mIoU, attacks, shift, ...)",
        description="Evaluate a checkpoint written by `advfeat train`. Writes FILE.json (results, "
        "exact configuration, versions), FILE.md (report) and FILE_plots/*.png. Suites: "
        + ", ".join(suite_names())
        + " (default: clean, attacks; 'all' runs every suite). Detection and segmentation runs "
        "report AP / mIoU with the suites clean, attacks (PGD-10, A-FAN: ε = 2/255, step 0.3/255 "
        "for detection; ε = 8/255, step 1/255 for segmentation) and shift.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run folder")
    p.add_argument("--out", help="results JSON (default: eval.json next to the checkpoint)")
    p.add_argument(
        "--suite",
        dest="suites",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="suite(s) to run, repeatable or comma-separated",
    )
    p.add_argument("--dataset", help="evaluate on this dataset (same classes) instead of the run's")
    p.add_argument("--data-dir", help="where that dataset lives")
    p.add_argument(
        "--dataset-option",
        dest="dataset_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dataset option, e.g. n_test=500",
    )
    p.add_argument("--model", help="architecture to load the weights into (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--batch-size",
        type=int,
        help="evaluation batch size (default 256; detection and segmentation 8)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        help=f"evaluate a seeded subset of N test images (default on CPU: {CPU_MAX_IMAGES})",
    )
    p.add_argument(
        "--all-images", action="store_true", help="evaluate every test image, also on CPU"
    )
    p.add_argument("--seed", type=int, help="seed of subsets, random starts, noise (default 0)")
    p.add_argument(
        "--eps", help="L∞ budget, e.g. 8/255 (default; detection 2/255, segmentation 8/255)"
    )
    p.add_argument("--eps-curve", help="budgets of the ε-curve, e.g. 0,1/255,2/255,4/255,8/255")
    p.add_argument(
        "--pgd-steps", type=int, help="PGD iterations (default 20; detection/segmentation 10)"
    )
    p.add_argument("--cw-steps", type=int, help="C&W-L2 optimisation steps (default 100)")
    p.add_argument(
        "--attacks",
        help="attacks of the attacks suite (pgd,fgsm,cw,curve,transfer,adaptive,autoattack)",
    )
    p.add_argument("--autoattack", action="store_true", help="add AutoAttack (optional extra)")
    p.add_argument("--surrogate", help="checkpoint of a surrogate model for the transfer attack")
    p.add_argument(
        "--corruption-subset", help="corruption types, comma-separated (default: all 15)"
    )
    p.add_argument("--severities", help="corruption severities 1-5, comma-separated (default: all)")
    p.add_argument("--corruption-max-images", type=int, help="images per corruption and severity")
    p.add_argument("--baseline", help="eval JSON or checkpoint normalising the mCE")
    p.add_argument(
        "--domain",
        dest="domains",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="extra shifted domain: an image folder ROOT/<class name>/<image>",
    )
    p.add_argument("--hessian-batches", type=int, help="batches of the Hessian's loss (default 2)")
    p.add_argument("--hutchinson-samples", type=int, help="Hutchinson samples (default 20)")
    p.add_argument(
        "--landscape-reference",
        metavar="PATH",
        help="landscape suite: another model's landscape side by side (eval JSON or checkpoint)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any evaluation option, e.g. --set max_images=100; a suite's own option as "
        "SUITE.KEY=VALUE, e.g. --set features.site=layer2",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted evaluation of --out (same checkpoint and settings only)",
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite --out and discard its partial results"
    )
    p.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    p.add_argument("--no-report", action="store_true", help="do not write the Markdown report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~advfeat.eval.EvalConfig` options given on the command line."""
    from advfeat.train.config import parse_override

    opts: dict[str, Any] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        opts[key] = value
    suites = [s for text in args.suites for s in _list(text)]
    if suites:
        opts["suites"] = suites  # 'all' is resolved by the model's task
    simple = {
        "batch_size": args.batch_size,
        "max_images": args.max_images,
        "seed": args.seed,
        "pgd_steps": args.pgd_steps,
        "cw_steps": args.cw_steps,
        "corruption_max_images": args.corruption_max_images,
        "hessian_batches": args.hessian_batches,
        "hutchinson_samples": args.hutchinson_samples,
        "landscape_reference": getattr(args, "landscape_reference", None),
    }
    opts.update({k: v for k, v in simple.items() if v is not None})
    if args.eps is not None:
        opts["eps"] = parse_budget(args.eps)
    if args.eps_curve is not None:
        opts["eps_curve"] = [parse_budget(t) for t in _list(args.eps_curve)]
    if args.attacks is not None:
        opts["attacks"] = _list(args.attacks)
    if args.autoattack:
        from advfeat.eval.suites.attacks import AttackOptions

        base = opts.get("attacks", list(AttackOptions().names))
        opts["attacks"] = [*base, "autoattack"]
    if args.corruption_subset is not None:
        opts["corruptions"] = _list(args.corruption_subset)
    if args.severities is not None:
        try:
            opts["severities"] = [int(t) for t in _list(args.severities)]
        except ValueError:
            raise AdvfeatError(
                f"--severities takes integers 1 to 5, got {args.severities!r}"
            ) from None
    return opts


def _summary(results: dict[str, Any]) -> str:
    from advfeat.eval.report import summary_rows

    table = summary_rows(results)
    if not table:
        return ""
    width = max(len(r[0]) for r in table)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in table)


def _check_outputs(out: Path, *, resume: bool, force: bool) -> None:
    """Never overwrite results or discard partial ones unless asked (``--force``)."""
    from advfeat.eval.runner import partial_path
    from advfeat.train.rundir import check_writable

    if resume and force:
        raise AdvfeatError("--resume continues the evaluation and --force discards it: pass one")
    check_writable(out.parent)
    if out.is_dir():
        raise AdvfeatError(f"--out {str(out)!r} is a folder; --out names the results .json file")
    partial = partial_path(out)
    if force:
        partial.unlink(missing_ok=True)
        return
    if partial.is_file() and not resume:
        raise AdvfeatError(
            f"{str(partial)!r} holds the partial results of an interrupted evaluation: continue "
            "it with --resume, or pass --force to discard them"
        )
    if out.exists() and not (resume and partial.is_file()):
        raise AdvfeatError(
            f"{str(out)!r} already exists; pass --force to overwrite it or choose another --out"
        )


def run(args: argparse.Namespace) -> int:
    from advfeat.eval.config import DEFAULT_SUITES
    from advfeat.eval.folders import parse_domain
    from advfeat.eval.runner import evaluate_checkpoint
    from advfeat.train.config import parse_override
    from advfeat.train.runtime import resolve_device

    options = options_from_args(args)
    suites = options.pop("suites", list(DEFAULT_SUITES))
    device = resolve_device(args.device)
    domains = dict(parse_domain(t) for t in args.domains)
    dataset_options = dict(parse_override(t) for t in args.dataset_options) or None
    if args.all_images and "max_images" in options:
        raise AdvfeatError("--all-images and --max-images contradict each other: pass one")
    if device.type == "cpu" and not args.all_images and "max_images" not in options:
        options["max_images"] = CPU_MAX_IMAGES  # stated by the evaluation's announcement
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_name("eval.json")
    if out.suffix != ".json":
        raise AdvfeatError(f"--out must name a .json file, got {str(out)!r}")
    _check_outputs(out, resume=args.resume, force=args.force)
    results = evaluate_checkpoint(
        checkpoint,
        suites,
        device=device,
        model_name=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        dataset_options=dataset_options,
        out=out,
        resume=args.resume,
        progress=not args.quiet,
        surrogate=args.surrogate,
        baseline=args.baseline,
        domains=domains,
        report=not args.no_report,
        plots=not args.no_plots,
        **options,
    )
    summary = _summary(results)
    if summary:
        print(summary)
    print(f"results: {out}")
    if not args.no_report:
        print(f"report:  {out.with_suffix('.md')}")
    for path in results.get("plots", {}).values():
        print(f"plot:    {out.parent / path}")
    if results.get("reused_units"):
        print(f"(resumed: {results['reused_units']} finished unit(s) reused)", file=sys.stderr)
    return 0
