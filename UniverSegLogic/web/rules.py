"""Rules of the browser app that need neither Slicer nor trame (tested in plain Python).

File names that come from the page, the access token and which requests may reach the server,
which hosts may be bound, the window/level presets and the wording of the status line all live
here, so the app and its tests share one definition of each (what an upload may contain is
:mod:`UniverSegLogic.web.uploads`).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

from ..errors import InputError, UsageError

# ---------------------------------------------------------------------------------------------
# file names from the page


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


def served_hosts(host: str, port: int) -> Optional[FrozenSet[str]]:
    """The ``Host`` header values of requests meant for a server bound to ``host``:``port``.

    For a loopback bind: the loopback names with the port, so a page that reaches the port
    under another name (DNS rebinding: ``evil.example`` resolving to 127.0.0.1) is refused.
    None (any name) for another bind (``--allow-remote``), whose names (addresses, DNS names,
    a proxy's) cannot be known; there the token and the Origin check protect the page."""
    if not is_loopback(host):
        return None
    bound = host.strip().lower()
    names = {"localhost", "127.0.0.1", "[::1]", f"[{bound.strip('[]')}]" if ":" in bound else bound}
    hosts = {f"{n}:{port}" for n in names}
    if port == 80:  # browsers leave the default port out
        hosts |= names
    return frozenset(hosts)


def request_refusal(headers, hosts: Optional[FrozenSet[str]]) -> Optional[str]:
    """Why a request (its ``headers``, a case-insensitive mapping) cannot come from the app's
    own page, or None if it can.

    The ``Host`` must be one of ``hosts`` (:func:`served_hosts`; None: any); an ``Origin``,
    which browsers send with every websocket and cross-origin request, must be this server's
    own (``http(s)://`` + Host); a ``Sec-Fetch-Site`` other than ``same-origin`` or ``none``
    (typed URL, bookmark) is refused, except for a top-level navigation (which still needs the
    token in its URL). A page on another port of the same machine is same-site but never
    same-origin, so all three refuse it."""
    host = (headers.get("Host") or "").strip().lower()
    if not host:
        return "the request names no Host"
    if hosts is not None and host not in hosts:
        return f"Host {host[:80]!r} is not this server"
    origin = headers.get("Origin")
    if origin is not None and origin.strip().lower() not in (f"http://{host}", f"https://{host}"):
        return f"Origin {origin[:80]!r} is not this page"
    site = headers.get("Sec-Fetch-Site")
    navigation = (
        headers.get("Sec-Fetch-Mode") == "navigate" and headers.get("Sec-Fetch-Dest") == "document"
    )
    if site is not None and site not in ("same-origin", "none") and not navigation:
        return f"a {site[:20]} request from another page"
    return None


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


#: The preset a CT opens with: soft tissue (Slicer's "CT abdomen": W 350, L 40).
CT_DEFAULT_PRESET = "CT abdomen"


def default_window_preset(values, modality: str = "") -> str:
    """The window a volume opens with: :data:`CT_DEFAULT_PRESET` for a CT, ``"Auto"`` (Slicer's
    automatic window, right for MR) otherwise.

    A CT is what ``modality`` says (e.g. a DICOM ``Modality`` of ``CT``); without one, an image
    whose intensities look like Hounsfield units: air near -1000 (the minimum between -3100,
    below which no scanner pads, and -500) and dense tissue above +100. Slicer's automatic
    window on a CT spans air to bone and washes soft tissue out."""
    modality = (modality or "").strip().upper()
    if modality:
        return CT_DEFAULT_PRESET if modality == "CT" else "Auto"
    import numpy as np

    flat = np.asarray(values).reshape(-1)
    if flat.size == 0 or not np.issubdtype(flat.dtype, np.number):
        return "Auto"
    sample = flat[:: max(1, flat.size // 1_000_000)]  # a million voxels tell the range
    lo, hi = float(np.min(sample)), float(np.max(sample))
    return CT_DEFAULT_PRESET if -3100 <= lo <= -500 and hi >= 100 else "Auto"


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
