"""Installing PyTorch from the Slicer module, without Qt and without importing torch.

The Slicer side of the first run (in the spirit of SlicerTotalSegmentator): the module checks the
installed PyTorch against :data:`TORCH_REQUIREMENT` from the package metadata (so an old torch can
be replaced before it is imported) and, after asking, runs light-the-torch through
:func:`run_install`, which reports pip's progress and can be stopped until pip starts replacing
files. Plain Python, tested headless (``Testing/slicer/test_slicer_logic.py``); the runtime package
``UniverSegLogic`` never installs anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from UniverSegLogic.errors import DeviceError, UsageError

#: The PyTorch versions the logic works with (first with every API it uses). One home: the Slicer
#: module's install check and the package metadata agree with it (Testing/slicer/test_slicer_logic.py).
TORCH_REQUIREMENT = ">=2.1"


# --------------------------------------------------------------------------------------------
# versions


def parse_version(text: str) -> Tuple[int, ...]:
    """Leading release numbers of a version string: ``"2.13.0+cu121"`` -> ``(2, 13, 0)``."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if not m:
        raise UsageError(f"cannot read the version {text!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _pad(a: Tuple[int, ...], n: int) -> Tuple[int, ...]:
    return a + (0,) * (n - len(a))


def version_satisfies(version: str, requirement: str = TORCH_REQUIREMENT) -> bool:
    """Whether ``version`` meets ``requirement`` (comma-separated ``>=``, ``>``, ``<=``, ``<``,
    ``==``, ``!=`` clauses on release numbers; pre-release tags are ignored)."""
    have = parse_version(version)
    for clause in (c.strip() for c in requirement.split(",")):
        if not clause:
            continue
        m = re.fullmatch(r"(>=|<=|==|!=|>|<)\s*(\S+)", clause)
        if not m:
            raise UsageError(f"cannot read the version requirement {requirement!r}")
        op, want = m.group(1), parse_version(m.group(2))
        n = max(len(have), len(want))
        a, b = _pad(have, n), _pad(want, n)
        ok = {
            ">=": a >= b,
            "<=": a <= b,
            ">": a > b,
            "<": a < b,
            "==": a == b,
            "!=": a != b,
        }[op]
        if not ok:
            return False
    return True


def installed_version(distribution: str = "torch") -> Optional[str]:
    """Installed version of a distribution from its metadata (the package is not imported), or
    None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class TorchCheck:
    """Whether the installed PyTorch can be used, and what to tell the user otherwise."""

    version: Optional[str]  # installed version, None when not installed
    ok: bool
    requirement: str = TORCH_REQUIREMENT

    @property
    def message(self) -> str:
        if self.ok:
            return f"PyTorch {self.version}"
        if self.version is None:
            return "PyTorch is not installed"
        return f"PyTorch {self.version} is installed but UniverSeg needs PyTorch {self.requirement}"


def check_torch(
    version: Optional[str] = None, requirement: str = TORCH_REQUIREMENT, *, lookup: bool = True
) -> TorchCheck:
    """Check the installed (or the given) PyTorch version against ``requirement``."""
    if version is None and lookup:
        version = installed_version("torch")
    if version is None:
        return TorchCheck(None, False, requirement)
    try:
        ok = version_satisfies(version, requirement)
    except UsageError:
        ok = False
    return TorchCheck(version, ok, requirement)


# --------------------------------------------------------------------------------------------
# first-run install output


@dataclass
class InstallStatus:
    """What one line of pip output says about an install in progress."""

    message: str  # short text for a status line ("" = nothing new to show)
    stoppable: bool  # False once pip replaces files: stopping then could break the install


_PIP_PATTERNS = (
    (re.compile(r"^\s*Collecting\s+(\S+)"), "Resolving {0}", True),
    (re.compile(r"^\s*Downloading\s+(\S+?)(?:\s+\((.+)\))?\s*$"), "Downloading {0}", True),
    (re.compile(r"^\s*Using cached\s+(\S+)"), "Using cached {0}", True),
    (re.compile(r"^\s*Installing collected packages:\s*(.+)$"), "Installing {0}", False),
    (re.compile(r"^\s*Attempting uninstall:\s*(\S+)"), "Replacing {0}", False),
    (re.compile(r"^\s*Successfully installed\s+(.+)$"), "Installed {0}", False),
)


def pip_progress(line: str, stoppable: bool = True) -> InstallStatus:
    """Progress message for one line of ``pip``/``light-the-torch`` output.

    ``stoppable`` is the state before this line; once pip starts installing it stays False.
    """
    for pattern, template, can_stop in _PIP_PATTERNS:
        m = pattern.match(line)
        if m:
            name = m.group(1).rsplit("/", 1)[-1]
            if len(name) > 60:
                name = name[:57] + "..."
            message = template.format(name)
            if template.startswith("Downloading") and m.lastindex and m.group(2):
                message += f" ({m.group(2)})"
            return InstallStatus(message, stoppable and can_stop)
    return InstallStatus("", stoppable)


def run_install(
    command: List[str],
    progress: Optional[Callable[[str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    poll: Optional[Callable[[], None]] = None,
    poll_seconds: float = 0.05,
    env: Optional[Dict[str, str]] = None,
) -> List[str]:
    """Run an install command (pip / light-the-torch), reporting progress and honouring cancel.

    The output is read in a helper thread, so the caller's ``poll`` (Slicer: process GUI events)
    runs every ``poll_seconds`` even while pip prints nothing (a large download). ``progress``
    gets a short message per recognised line (:func:`pip_progress`). When ``cancel()`` turns
    True while stopping is still safe (before pip starts replacing files) the process is ended
    and :class:`Cancelled` raised; later, the request is ignored and the install completes.
    A non-zero exit raises :class:`DeviceError` with the last output lines. Returns the output.
    """
    import queue
    import subprocess
    import sys
    import threading
    import time

    from UniverSegLogic.errors import Cancelled

    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
    try:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            creationflags=flags,
        )
    except OSError as exc:
        raise DeviceError(f"cannot start the installer {command[0]!r}: {exc}") from None
    lines: queue.Queue[Optional[str]] = queue.Queue()

    def reader() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\r\n"))
        lines.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    output: List[str] = []
    stoppable, finished = True, False
    while not finished:
        try:
            while True:
                line = lines.get_nowait()
                if line is None:
                    finished = True
                    break
                output.append(line)
                status = pip_progress(line, stoppable)
                stoppable = status.stoppable
                if status.message and progress is not None:
                    progress(status.message)
        except queue.Empty:
            pass
        if not finished:
            if cancel is not None and stoppable and cancel():
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise Cancelled("installation stopped before anything was changed")
            if poll is not None:
                poll()
            time.sleep(poll_seconds)
    code = proc.wait()
    thread.join(timeout=1)
    if code != 0:
        tail = " | ".join(line for line in output[-3:] if line.strip())
        raise DeviceError(f"the installation failed (exit code {code}): {tail or 'no output'}")
    return output
