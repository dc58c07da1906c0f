"""``advfeat export``: the deployed model of a run (aux BNs stripped, normalization in the
weights, the architecture's own keys; AFA stage II as its fused model with the weight generator),
a model card and RobustBench's ``model_info`` JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    from advfeat.export import FORMATS

    p = sub.add_parser(
        "export",
        help="export a trained run as plain weights with a model card",
        description="Write the model that `advfeat eval` evaluates (the evaluated BN branch only, "
        "input normalization stored as normalize.mean / normalize.std, the architecture's own "
        "keys) with export.json and MODEL_CARD.md. It takes images in [0, 1] and returns logits. "
        "An AFA stage-II run is no stock architecture: it is exported as the backbone with its "
        "dual BN layers and the weight generator (load it with advfeat.export.build_exported). "
        "The first line printed says what was exported.",
    )
    p.add_argument(
        "run", metavar="RUN", nargs="?", help="run folder or its checkpoint.pt / best.pt"
    )
    p.add_argument(
        "--checkpoint", metavar="RUN", help="the same as RUN, spelled as `advfeat eval` takes it"
    )
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        default=[],
        metavar="FORMAT",
        help=f"{', '.join(FORMATS)} (repeatable or comma-separated; default state_dict)",
    )
    p.add_argument("--out", help="folder to write (default: RUN/export)")
    p.add_argument(
        "--robustbench", action="store_true", help="also write RobustBench's model_info.json"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from advfeat.errors import AdvfeatError
    from advfeat.export import export_run

    if (args.run is None) == (args.checkpoint is None):
        raise AdvfeatError(
            "give the run to export once: advfeat export RUN (a run folder or its checkpoint.pt), "
            "or --checkpoint RUN"
        )
    formats = tuple(f.strip() for text in args.formats for f in text.split(",") if f.strip())
    source = Path(args.run or args.checkpoint)
    folder = source if source.is_dir() else source.parent
    out = Path(args.out) if args.out else folder / "export"
    result = export_run(source, out, formats or ("state_dict",), robustbench=args.robustbench)
    print(f"contents: {result.info['contents']['summary']}")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0
