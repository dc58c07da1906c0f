"""The ``advfeat`` command line: ``train``, ``eval``, ``bench``, ``methods``.

User mistakes print one line (``advfeat: error: ...``) and exit with status 2; a diverged run
exits with status 3 and keeps its last good checkpoint; a run stopped by SIGTERM / SIGUSR1
(preemption) writes a checkpoint mid-epoch and exits with status 75 (resume it with --resume); a
write that finds the disk full prints one line (the file, the space left) and exits with status
74, the file it was to replace unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from advfeat.errors import AdvfeatError, DiskFull

__all__ = ["DISK_FULL_EXIT", "build_parser", "main"]

DISK_FULL_EXIT = 74
"""Exit status when a file could not be written for want of space (``EX_IOERR``)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every user error
        self.exit(2, f"advfeat: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="advfeat",
        description="Adversarial feature augmentation and multi-branch BN for vision models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module or .py file first (its registered models, datasets, methods); "
        "may appear anywhere on the line",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    from advfeat.commands import register_commands

    register_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from advfeat.plugins import import_user_modules, split_import_flags

    try:  # --import MODULE (anywhere): the user's registered models, datasets, methods
        modules, rest = split_import_flags(sys.argv[1:] if argv is None else argv)
        import_user_modules(modules)
    except AdvfeatError as err:
        print(f"advfeat: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()  # after the imports: the help lists the user's datasets too
    args = parser.parse_args(rest)
    if args.version:
        from advfeat.version import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except AdvfeatError as err:
        print(f"advfeat: error: {err}", file=sys.stderr)
        return 2
    except DiskFull as err:
        print(f"advfeat: error: {err}", file=sys.stderr)
        return DISK_FULL_EXIT
    except KeyboardInterrupt:
        print(
            "advfeat: interrupted; the last finished epoch's checkpoint is kept (use --resume)",
            file=sys.stderr,
        )
        return 130
    except Exception as err:
        from advfeat.train.preemption import PREEMPTED_EXIT, Preempted
        from advfeat.train.trainer import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"advfeat: {err}", file=sys.stderr)
            return 3
        if isinstance(err, Preempted):
            print(f"advfeat: {err}", file=sys.stderr)
            return PREEMPTED_EXIT
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
