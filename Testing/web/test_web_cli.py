"""``universeg-slicer web`` on the command line: light imports, refused arguments."""

import os
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-image-mb", "0"], "--max-image-mb must be positive"),
        (["--max-voxels", "-1"], "--max-voxels must be positive"),
    ],
)
def test_refused_limits_are_one_line_and_exit_2(capsys, argv, message):
    assert main(["web", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"universeg-slicer web: error: {message}"


def _start(argv, cwd, prefix=()):
    """``universeg-slicer web ...`` as its own process; (exit code, stdout, stderr). A server that
    starts instead of refusing is stopped after 60 s (the test then fails)."""
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "UniverSegLogic", "web", "--sample", *argv],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the server started instead of refusing {argv}: {exc.stdout!r}")
    return done.returncode, done.stdout, done.stderr.strip()


def test_out_is_checked_before_the_server_starts(tmp_path):
    folder = tmp_path / "results.seg.nrrd"
    folder.mkdir()
    cases = [
        (tmp_path / "missing" / "x.seg.nrrd", "does not exist"),
        (folder, "is a folder"),
        (tmp_path / "x.nrrd", "must be a .seg.nrrd file"),
    ]
    for out, message in cases:
        code, stdout, err = _start(["--out", str(out)], tmp_path)
        assert code == 2 and message in err and "\n" not in err, (out, err)
        assert err.startswith("universeg-slicer web: error: --out") or "cannot write" in err
        assert "serving" not in stdout


def test_out_on_a_read_only_file_system_is_refused_at_start(tmp_path):
    import shutil

    ro = tmp_path / "ro"
    ro.mkdir()
    unshare = shutil.which("unshare")
    # a read-only tmpfs mounted in a private mount namespace of the command only (nothing to
    # clean up; no privileges needed where user namespaces are enabled)
    probe = subprocess.run(
        [unshare or "unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro}"],
        capture_output=True,
    )
    if unshare is None or probe.returncode != 0:
        message = "cannot mount a read-only file system here (unshare -rm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    script = f'mount -t tmpfs -o ro tmpfs {ro} && exec "$@"'
    code, stdout, err = _start(
        ["--out", str(ro / "x.seg.nrrd")], tmp_path, ("unshare", "-rm", "sh", "-c", script, "sh")
    )
    assert code == 2 and "read-only file system" in err.lower() and "\n" not in err, err
    assert "serving" not in stdout
