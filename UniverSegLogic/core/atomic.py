"""Atomic file output, defined once: a result appears complete or not at all.

:func:`atomic_output` yields a temporary path in the destination folder (same file system, so the
final rename is atomic), whose name keeps the destination's extension (writers such as SimpleITK
choose the format from it) and stays short whatever the destination's name. On success the file
replaces the destination and keeps the permission bits of the file it replaces (a 0600 result
stays 0600); a new file gets the usual ``0666 & ~umask``. On any failure -- an exception, Ctrl+C,
or SIGTERM while writing in the main thread -- the temporary file is removed and the destination is
left as it was. OS errors (read-only folder, disk full, file-size limit, name too long) become
:class:`~UniverSegLogic.errors.OutputError` with one line naming the path.

Temporary names are ``.partial-<random>-<tail of the destination's name>``; inside
:func:`owner_tag` (e.g. one cohort run, on every worker that runs its tasks) they are
``.partial-<tag>-<random>-<tail>``, so that the owner can remove what a killed writer of its own
left behind (:func:`remove_temporaries`) and never touches another program's temporary file.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import glob
import os
import re
import secrets
import signal
import stat
import threading
from typing import Callable, Iterator, List, Optional

from ..errors import OutputError

#: Characters of the destination's name kept at the end of the temporary name.
_TAIL_CHARS = 40
#: What every temporary file's name starts with.
TEMPORARY_PREFIX = ".partial-"
#: An owner tag: hex digits only (it is part of file names and of a glob pattern).
_TAG = re.compile(r"^[0-9a-f]{8,32}$")
_OWNER: contextvars.ContextVar[str] = contextvars.ContextVar("universeg_partial_owner", default="")


def new_owner_tag() -> str:
    """A fresh random tag for :func:`owner_tag` (16 hex digits)."""
    return secrets.token_hex(8)


@contextlib.contextmanager
def owner_tag(tag: str) -> Iterator[None]:
    """Within this block (this thread or task only), temporary files carry ``tag`` in their
    names, so that :func:`remove_temporaries` can find them."""
    if not _TAG.match(tag or ""):
        raise ValueError(f"an owner tag is 8 to 32 lowercase hex digits, got {tag!r}")
    token = _OWNER.set(tag)
    try:
        yield
    finally:
        _OWNER.reset(token)


def remove_temporaries(folder: str, tag: str) -> List[str]:
    """Remove the temporary files that writers holding ``tag`` left in ``folder`` (e.g. a
    killed worker); other programs' temporary files stay. Returns the paths removed."""
    if not _TAG.match(tag or ""):
        raise ValueError(f"an owner tag is 8 to 32 lowercase hex digits, got {tag!r}")
    removed = []
    pattern = os.path.join(glob.escape(folder), f"{TEMPORARY_PREFIX}{tag}-*")
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    return removed


def _extension(name: str) -> str:
    """``'a.seg.nrrd'`` -> ``'.seg.nrrd'``, ``'b.nii.gz'`` -> ``'.nii.gz'``, ``'c.png'`` -> ``'.png'``."""
    lower = name.lower()
    for double in (".seg.nrrd", ".nii.gz", ".tar.gz"):
        if lower.endswith(double):
            return name[-len(double) :]
    return os.path.splitext(name)[1]


def temporary_name(final_path: str) -> str:
    """A fresh temporary path beside ``final_path`` (hidden, short, same extension)."""
    folder, name = os.path.split(os.path.abspath(final_path))
    ext = _extension(name)
    stem = name[: len(name) - len(ext)] if ext else name
    tail = stem[-max(0, _TAIL_CHARS - len(ext)) :] if len(ext) < _TAIL_CHARS else ""
    owner = _OWNER.get()
    prefix = f"{TEMPORARY_PREFIX}{owner}-" if owner else TEMPORARY_PREFIX
    return os.path.join(folder, f"{prefix}{secrets.token_hex(4)}-{tail}{ext[-_TAIL_CHARS:]}")


def output_error(exc: OSError, path: str) -> OutputError:
    """One-line :class:`OutputError` for an OS error while writing ``path``."""
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EFBIG: "file too large (file-size limit)",
        errno.ENAMETOOLONG: "file name too long",
        errno.EISDIR: "is a folder",
        errno.ENOENT: "folder does not exist",
        errno.ENOTDIR: "a parent is not a folder",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    return OutputError(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def _remove_on_sigterm(path_ref: list) -> Iterator[None]:
    """While active (main thread only, and only where SIGTERM has its default action), SIGTERM
    raises SystemExit so that the temporary file is removed before the process ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, AttributeError):  # pragma: no cover - no signals here
        yield
        return
    if previous not in (signal.SIG_DFL, None):
        yield  # the host (e.g. Slicer) handles SIGTERM itself: leave it alone
        return

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _mode_for(final_path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(final_path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(final_path: str) -> Iterator[str]:
    """Context manager: write to the yielded temporary path; it becomes ``final_path`` when the
    block ends without an error (see the module docstring)."""
    final_path = os.fspath(final_path)
    if os.path.isdir(final_path):
        raise OutputError(f"cannot write {final_path}: is a folder")
    folder = os.path.dirname(os.path.abspath(final_path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {final_path}: folder {folder} does not exist")
    tmp = temporary_name(final_path)
    ref = [tmp]
    try:
        with _remove_on_sigterm(ref):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                yield tmp
                os.chmod(tmp, _mode_for(final_path))
                os.replace(tmp, final_path)
            except OSError as exc:
                raise output_error(exc, final_path) from None
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.remove(tmp)


def write_bytes(final_path: str, data: bytes) -> None:
    """Write ``data`` to ``final_path`` atomically."""
    with atomic_output(final_path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text(final_path: str, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``final_path`` atomically."""
    write_bytes(final_path, text.encode(encoding))


def write_with(final_path: str, writer: Callable[[str], Optional[object]]) -> None:
    """Call ``writer(temporary_path)`` and publish its file at ``final_path`` atomically."""
    with atomic_output(final_path) as tmp:
        writer(tmp)
