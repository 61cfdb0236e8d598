"""Command line of the developer tools: ``python -m UniverSegResearch COMMAND``.

Same conventions as ``universeg-slicer`` (:mod:`UniverSegLogic.cli`): one module per command with
``register(subparsers)``, heavy imports inside ``run``, exit 2 with one line for user errors.
"""

from __future__ import annotations

from typing import List, Optional

from UniverSegLogic import cli as runtime_cli

PROG = "python -m UniverSegResearch"
#: Modules that register sub-commands, in help order.
COMMAND_MODULES = ("data", "train", "calibrate", "evaluate", "fusion")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the developer command line; returns the exit code."""
    return runtime_cli.main(
        argv,
        prog=PROG,
        package=__name__,
        commands=COMMAND_MODULES,
        description="UniverSeg for Slicer developer tools: data, training, calibration, evaluation.",
    )
