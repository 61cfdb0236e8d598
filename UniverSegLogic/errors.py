"""The project's error types: one base class, one subclass per kind of user-facing failure.

Every failure that is the user's to fix (a file, a grid, a segment, weights, a device, an output
path, a cancelled run) raises a subclass of :class:`UniverSegError`. Callers show ``str(error)``
as one line: the CLI prints it and exits with code 2, the Slicer module shows it in a message box,
the browser app in its status line. Anything else that escapes is an internal error (a bug).

This module imports nothing heavy, so every part of the package (and the Slicer module before
PyTorch is installed) can import it.
"""

from __future__ import annotations


class UniverSegError(Exception):
    """Base class of every user-facing UniverSeg error; ``str()`` is a one-line message."""


class UsageError(UniverSegError, ValueError):
    """An argument or option that cannot be used (bad value, unknown name, wrong type)."""


class InputError(UniverSegError, ValueError):
    """An input file that cannot be used (missing, unreadable, truncated, wrong dimension)."""


class OutputError(UniverSegError, OSError):
    """An output that cannot be written (folder missing, read-only, disk full, same as an input)."""


class GeometryError(UniverSegError, ValueError):
    """A volume, grid or axis that the pipeline cannot use."""


class SupportError(UniverSegError, ValueError):
    """A segment that cannot be propagated (no labeled slice, bad slice list, empty support)."""


class WeightsError(UniverSegError, RuntimeError):
    """Weights that cannot be found, fetched or used."""


class DeviceError(UniverSegError, RuntimeError):
    """A compute device that was asked for but is not available (e.g. CUDA without a GPU)."""


class MRMLError(UniverSegError, ValueError):
    """Slicer nodes or segments the bridge cannot use (nothing was changed)."""


class Cancelled(UniverSegError):
    """The caller asked to stop; nothing has been written."""


def one_line(error: BaseException) -> str:
    """``str(error)`` reduced to its first non-empty line (never empty)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
