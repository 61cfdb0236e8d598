"""``universeg-slicer web`` on the command line: light imports, refused arguments."""

import subprocess
import sys

import pytest

from UniverSegLogic.cli import main

HEAVY = ("torch", "trame", "trame_slicer", "slicer", "vtkmodules")


def test_web_command_registers_without_heavy_imports():
    # (the whole parser also registers `train`, whose options come from the research code)
    code = (
        "import argparse, sys\n"
        "from UniverSegLogic.cli import COMMAND_MODULES, web\n"
        "assert 'web' in COMMAND_MODULES\n"
        "parser = argparse.ArgumentParser()\n"
        "web.register(parser.add_subparsers())\n"
        "parser.parse_args(['web', '--image', 'x.nrrd', '--port', '0'])\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--host", "0.0.0.0"], "add --allow-remote"),
        (["--host", "192.168.1.20", "--port", "8080"], "add --allow-remote"),
        (["--labels", "x.seg.nrrd"], "--labels needs --image"),
        (["--port", "70000"], "not a port number"),
        (["--max-upload-mb", "0"], "must be positive"),
        (["--sample", "--image", "x.nrrd"], "--sample replaces"),
    ],
)
def test_refused_arguments_are_one_line_and_exit_2(capsys, argv, message):
    assert main(["web", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("universeg-slicer web: error: ") and message in err
    assert "\n" not in err
