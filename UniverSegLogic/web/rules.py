"""Rules of the browser app that need neither Slicer nor trame (tested in plain Python).

Uploads (size limit, file type by name *and* content), file names that come from the page,
the access token, which hosts may be bound, the window/level presets and the wording of the
status line all live here, so the app and its tests share one definition of each.
"""

from __future__ import annotations

import gzip
import hmac
import io
import ipaddress
import re
import secrets
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError, UsageError

#: Default upload limit in MiB (``--max-upload-mb``).
DEFAULT_MAX_UPLOAD_MB = 512
#: Single-file image formats the page accepts (Slicer reads them without a side file).
IMAGE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
#: Segmentation format the page accepts.
SEGMENTATION_SUFFIXES = (".seg.nrrd",)
UPLOAD_KINDS = ("image", "segmentation")
_HEADER_PEEK = 64 * 1024  # bytes of a NRRD header searched for the segment fields
_METAIMAGE_KEYS = (b"ObjectType", b"NDims", b"Comment", b"ObjectSubType")

# ---------------------------------------------------------------------------------------------
# file names from the page


def _suffix(name: str, choices: Sequence[str]) -> Optional[str]:
    low = name.lower()
    for s in sorted(choices, key=len, reverse=True):
        if low.endswith(s) and len(low) > len(s):
            return s
    return None


def upload_name(name) -> str:
    """The file name a page sent, checked to be a plain file name (never a path).

    Raises :class:`InputError` for empty names, folders, ``..``, control characters or names
    over 255 bytes; a page-supplied name never becomes a path outside the upload folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError("the upload has no file name")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise InputError(f"{name!r} is not a plain file name")
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name.encode("utf-8")) > 255:
        raise InputError(f"{name!r} is not a usable file name")
    return name


def safe_path(folder, name: str) -> Path:
    """``folder / name`` for a page-supplied ``name``, refusing anything that leaves ``folder``
    (after resolving symbolic links)."""
    root = Path(folder).resolve()
    path = (root / upload_name(name)).resolve()
    if path.parent != root:
        raise InputError(f"{name!r} would leave the upload folder")
    return path


def download_name(segmentation_name: str) -> str:
    """File name offered to the browser for a segmentation: ``<name>.seg.nrrd``, with anything
    but letters, digits, ``-``, ``_``, ``.`` and spaces replaced by ``_``."""
    stem = segmentation_name or "segmentation"
    for s in (".seg.nrrd", ".nrrd"):
        if stem.lower().endswith(s):
            stem = stem[: -len(s)]
    stem = re.sub(r"[^\w\-. ]", "_", stem, flags=re.ASCII).strip(" .") or "segmentation"
    return stem[:200] + ".seg.nrrd"


# ---------------------------------------------------------------------------------------------
# uploads


def _looks_like(suffix: str, content: bytes) -> bool:
    if suffix in (".nrrd", ".seg.nrrd"):
        return content[:4] == b"NRRD"
    if suffix == ".nii":
        return _nifti_size(content) is not None and len(content) >= _nifti_size(content)
    if suffix == ".nii.gz":
        if content[:2] != b"\x1f\x8b" or len(content) < 18:
            return False
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(content)) as f:
                need = _nifti_size(f.read(348))
        except (OSError, EOFError):
            return False
        # the gzip trailer holds the uncompressed size (mod 2**32): a cut file is refused
        return need is not None and int.from_bytes(content[-4:], "little") == need % 2**32
    if suffix == ".mha":  # MetaImage: a text header of "Key = Value" lines
        return content.lstrip()[:12].startswith(_METAIMAGE_KEYS)
    return False


def _nifti_size(head: bytes) -> Optional[int]:
    """Bytes a NIfTI-1 file needs (header offset + voxel data), or None if ``head`` is not one.
    ITK's NIfTI reader loads a cut file without complaint, so the size is checked here."""
    if len(head) < 348 or head[344:347] not in (b"n+1", b"ni1"):
        return None
    for order in ("little", "big"):
        if int.from_bytes(head[:4], order) == 348:
            break
    else:
        return None
    dims = [int.from_bytes(head[40 + 2 * i : 42 + 2 * i], order, signed=True) for i in range(8)]
    bitpix = int.from_bytes(head[72:74], order, signed=True)
    offset = struct.unpack((">" if order == "big" else "<") + "f", head[108:112])[0]
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : dims[0] + 1]):
        return None
    voxels = 1
    for d in dims[1 : dims[0] + 1]:
        voxels *= d
    return int(max(offset, 348)) + voxels * bitpix // 8


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


def check_upload(name, content, kind: str, max_bytes: int, size=None) -> str:
    """Check one uploaded file before anything is written or loaded; returns its safe name.

    ``kind`` is ``"image"`` (``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha``) or ``"segmentation"``
    (``.seg.nrrd`` written by Slicer or slicerio). The type is checked by name *and* by the
    first bytes of the content (a renamed file is refused). ``size`` is what the browser claimed
    (checked too, so an oversized file is refused before its content is looked at).
    Raises :class:`InputError` with a one-line message naming the file.
    """
    if kind not in UPLOAD_KINDS:
        raise UsageError(f"unknown upload kind {kind!r}")
    name = upload_name(name)
    for n in (size, None if content is None else len(content)):
        if n is not None and int(n) > max_bytes:
            raise InputError(
                f"{name} is {_mib(int(n))}: uploads are limited to {_mib(max_bytes)} "
                "(--max-upload-mb)"
            )
    if not content:
        raise InputError(f"{name} is empty")
    choices = IMAGE_SUFFIXES if kind == "image" else SEGMENTATION_SUFFIXES
    suffix = _suffix(name, choices)
    if suffix is None:
        raise InputError(f"{name} is not a supported {kind} file (use {', '.join(choices)})")
    if not _looks_like(suffix, bytes(content[:_HEADER_PEEK])):
        raise InputError(f"{name} is not a complete {suffix} file")
    if kind == "segmentation":
        header = bytes(content[:_HEADER_PEEK]).split(b"\n\n", 1)[0]
        if b"Segment0_" not in header:
            raise InputError(
                f"{name} is a NRRD image without segment fields: not a Slicer segmentation"
            )
    return name


# ---------------------------------------------------------------------------------------------
# access


def new_token() -> str:
    """A fresh access token for the page URL (192 random bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def token_matches(expected: str, given) -> bool:
    """Constant-time comparison of the token a request carries with the server's."""
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> Optional[str]:
    """Refuse a non-loopback ``host`` unless ``allow_remote``; returns the warning to print
    when another host is bound, else None."""
    if not host:
        raise UsageError("--host is empty")
    if is_loopback(host):
        return None
    if not allow_remote:
        raise UsageError(
            f"--host {host} would expose the page (and the images) to other machines: "
            "add --allow-remote to do so on purpose"
        )
    return (
        f"WARNING: serving on {host}, reachable from other machines. Anyone with the URL "
        "(it holds the access token) can see and edit the images; the connection is not "
        "encrypted (use an SSH tunnel or a TLS proxy across untrusted networks)."
    )


# ---------------------------------------------------------------------------------------------
# window / level

#: name -> ("fixed", window, level) in HU, or ("percentile", low %, high %) of the image.
WINDOW_PRESETS: Dict[str, Tuple[str, float, float]] = {
    "CT lung": ("fixed", 1400.0, -500.0),
    "CT abdomen": ("fixed", 350.0, 40.0),
    "CT bone": ("fixed", 1000.0, 400.0),
    "CT brain": ("fixed", 100.0, 50.0),
    "MR auto (1-99%)": ("percentile", 1.0, 99.0),
    "MR full range": ("percentile", 0.0, 100.0),
}


def window_level(preset: str, values=None) -> Tuple[float, float]:
    """(window, level) of a preset; percentile presets need the image ``values`` (an array)."""
    try:
        kind, a, b = WINDOW_PRESETS[preset]
    except KeyError:
        raise UsageError(
            f"unknown window preset {preset!r} (presets: {', '.join(WINDOW_PRESETS)})"
        ) from None
    if kind == "fixed":
        return a, b
    import numpy as np

    if values is None or np.size(values) == 0:
        raise UsageError(f"window preset {preset!r} needs an image")
    lo, hi = (float(v) for v in np.percentile(np.asarray(values), [a, b]))
    window = max(hi - lo, 1e-6)
    return window, (hi + lo) / 2.0


# ---------------------------------------------------------------------------------------------
# status wording (the SliceStatus of UniverSegLogic.mrml)

SLICE_KINDS = ("labeled", "corrected", "empty", "predicted")


def status_line(status) -> str:
    """One stable line per segment, e.g. ``right lung: 3 labeled, 24 predicted``.

    ``labeled`` counts every slice the next run uses as support (corrected and empty labeled
    slices included); ``corrected`` are predicted slices the user changed, ``empty`` labeled
    slices without foreground, ``predicted`` untouched predictions. A note on the stored record
    (e.g. a prediction along another axis) follows in brackets.
    """
    return f"{status.name}: {status.counts()}"


def slice_kinds(status) -> List[str]:
    """Per slice index along the status axis: ``labeled``, ``corrected``, ``empty``,
    ``predicted`` or ``""`` (neither painted nor predicted)."""
    kinds = [""] * int(status.n_slices)
    for t in status.predicted:
        kinds[t] = "predicted"
    for t in status.labeled:
        kinds[t] = "labeled"
    for t in status.empty_labeled:
        kinds[t] = "empty"
    for t in status.edited:
        kinds[t] = "corrected"
    return kinds
