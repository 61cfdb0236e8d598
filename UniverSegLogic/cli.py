"""Command line: ``universeg-slicer`` (also ``python -m UniverSegLogic``).

Each sub-command lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func`` default is called with the parsed arguments and returns an exit code. Errors that
are the user's to fix (:data:`USER_ERRORS`) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: Modules that register sub-commands, in help order.
COMMAND_MODULES = ("propagate", "demo", "evaluate", "calibrate", "data", "train", "benchmark")


class UsageError(ValueError):
    """A command-line argument that cannot be used."""


def user_errors() -> tuple:
    """Exception types reported as one line + exit code 2 (imported lazily)."""
    from .engine import Cancelled
    from .geometry import GeometryError
    from .io import InputError
    from .model import EmptySupportError
    from .support import SupportError
    from .weights import WeightsError

    return (UsageError, InputError, GeometryError, SupportError, WeightsError,
            EmptySupportError, Cancelled, FileNotFoundError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="universeg-slicer",
        description="Propagate a few labeled slices through a volume with UniverSeg.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"UniverSegLogic.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"UniverSegLogic.{name}_cmd":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"universeg-slicer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"universeg-slicer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
