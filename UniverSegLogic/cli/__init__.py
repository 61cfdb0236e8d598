"""Command line: ``universeg-slicer`` (also ``python -m UniverSegLogic``).

Each sub-command lives in its own module of this package exposing ``register(subparsers)``,
which adds a parser whose ``func`` default is called with the parsed arguments and returns an exit
code. Command modules import nothing heavy at module level (torch, SimpleITK and the research
code are imported inside ``run``), so ``universeg-slicer --help`` stays fast.

Exit codes: 0 success; 2 a user-facing error (:class:`~UniverSegLogic.errors.UniverSegError` and
OS errors on the user's files), printed as one line; 1 an internal error, printed as one line
saying so (the traceback only with ``--debug``); 3 a cohort run where some targets failed;
130 interrupted.

Messages are ours only: ITK, VTK and PyTorch write warnings straight to the process's standard
error (file descriptor 2), which would put them next to the one-line error. While a command runs,
descriptor 2 is captured and dropped and Python warnings are ignored (:func:`quiet_native_output`);
``--debug`` shows everything. This is done by the command line only, never by importing the
library (inside Slicer, Slicer decides what its console shows).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator, List, Optional, Sequence

from ..errors import UniverSegError, UsageError, one_line

#: Modules that register sub-commands, in help order.
COMMAND_MODULES = (
    "propagate",
    "demo",
    "cohort",
    "benchmark",
    "web",
)

__all__ = ["main", "build_parser", "UsageError"]


def plain(text: str) -> str:
    """``text`` without reST inline markup (double back-quotes, ``:func:`x```), as a help
    text shows it."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def command_help(name: str, package: str = __name__) -> str:
    """One-line help of a sub-command: its module docstring after ``universeg-slicer NAME:``."""
    doc = (importlib.import_module(f"{package}.{name}").__doc__ or "").strip().splitlines()
    first = plain(doc[0] if doc else name)
    return first.split(":", 1)[1].strip().rstrip(".") if ":" in first else first


def build_parser(
    command: Optional[str] = None,
    *,
    prog: str = "universeg-slicer",
    package: str = __name__,
    commands: Sequence[str] = COMMAND_MODULES,
    description: str = "Propagate a few labeled slices through a volume with UniverSeg.",
) -> argparse.ArgumentParser:
    """The argument parser of ``prog`` whose sub-commands are the modules ``commands`` of
    ``package``. Only ``command`` (if given) is fully registered; the others are listed with their
    one-line help, so building the parser never imports a command's dependencies (``--help``
    stays fast and imports no torch)."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="print the full traceback of internal errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in commands:
        if name == command:
            importlib.import_module(f"{package}.{name}").register(sub)
        else:
            sub.add_parser(name, help=command_help(name, package), add_help=False)
    return parser


@contextlib.contextmanager
def quiet_native_output(enabled: bool = True) -> Iterator[None]:
    """While active: what native libraries write to file descriptor 2 goes to a temporary file
    that is dropped, ``sys.stderr`` still reaches the terminal, and Python warnings are ignored."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, AttributeError, ValueError):  # no descriptor 2 (e.g. pythonw)
            yield
            return
        try:
            writes_to_fd2 = sys.stderr.fileno() == 2
        except (OSError, AttributeError, ValueError):  # e.g. pytest's capture
            writes_to_fd2 = False
        sink = tempfile.TemporaryFile()
        previous = sys.stderr
        os.dup2(sink.fileno(), 2)
        if writes_to_fd2:
            sys.stderr = open(  # noqa: SIM115 - closed below
                os.dup(saved),
                "w",
                buffering=1,
                encoding=getattr(previous, "encoding", None) or "utf-8",
                errors="backslashreplace",
            )
        try:
            yield
        finally:
            if writes_to_fd2:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                    sys.stderr.close()
                sys.stderr = previous
            os.dup2(saved, 2)
            os.close(saved)
            sink.close()


def main(
    argv: Optional[List[str]] = None,
    *,
    prog: str = "universeg-slicer",
    package: str = __name__,
    commands: Sequence[str] = COMMAND_MODULES,
    description: str = "Propagate a few labeled slices through a volume with UniverSeg.",
) -> int:
    """Run the command line ``prog`` (sub-commands: the modules ``commands`` of ``package``);
    returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(
        command if command in commands else None,
        prog=prog,
        package=package,
        commands=commands,
        description=description,
    )
    args = parser.parse_args(argv)
    prog = f"{prog} {args.command}"
    try:
        with quiet_native_output(not debug):
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
