"""Command line: ``universeg-slicer`` (also ``python -m UniverSegLogic``).

Each sub-command lives in its own module of this package exposing ``register(subparsers)``,
which adds a parser whose ``func`` default is called with the parsed arguments and returns an exit
code. Command modules import nothing heavy at module level (torch, SimpleITK and the research
code are imported inside ``run``), so ``universeg-slicer --help`` stays fast.

Exit codes: 0 success; 2 a user-facing error (:class:`~UniverSegLogic.errors.UniverSegError` and
OS errors on the user's files), printed as one line; 1 an internal error, printed as one line
saying so (the traceback only with ``--debug``); 3 a cohort run where some targets failed;
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from ..errors import UniverSegError, UsageError, one_line

#: Modules that register sub-commands, in help order.
COMMAND_MODULES = (
    "propagate",
    "demo",
    "evaluate",
    "calibrate",
    "data",
    "train",
    "benchmark",
    "web",
)

__all__ = ["main", "build_parser", "UsageError"]


def command_help(name: str) -> str:
    """One-line help of a sub-command: its module docstring after ``universeg-slicer NAME:``."""
    doc = (importlib.import_module(f"{__name__}.{name}").__doc__ or "").strip().splitlines()
    first = doc[0] if doc else name
    return first.split(":", 1)[1].strip().rstrip(".") if ":" in first else first


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``universeg-slicer`` argument parser. Only ``command`` (if given) is fully registered;
    the others are listed with their one-line help, so building the parser never imports a
    command's dependencies (``--help`` stays fast and imports neither torch nor research code)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="universeg-slicer",
        description="Propagate a few labeled slices through a volume with UniverSeg.",
    )
    parser.add_argument("--version", action="version", version=f"universeg-slicer {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="print the full traceback of internal errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        if name == command:
            importlib.import_module(f"{__name__}.{name}").register(sub)
        else:
            sub.add_parser(name, help=command_help(name), add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMAND_MODULES else None)
    args = parser.parse_args(argv)
    prog = f"universeg-slicer {args.command}"
    try:
        return int(args.func(args) or 0)
    except UniverSegError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the user's files: permissions, disk full, name too long, ...
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or one_line(exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else is our bug: say so in one line
        if debug:
            raise
        print(
            f"{prog}: internal error ({type(exc).__name__}: {one_line(exc)}); "
            "rerun with --debug for the traceback and please report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
