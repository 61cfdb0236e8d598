"""Where UniverSeg weights come from, and checking them before use.

Sources:

* ``official`` -- the released v1 checkpoint, downloaded on first use into a per-user cache
  (atomic write; verified structure; sha256 checked when pinned). Its license (OpenRAIL++-M,
  research use only) is shown once before the first download.
* ``starter`` -- this project's own weights shipped under ``Resources/`` (Apache-2.0).
* a local file path -- for offline sites (e.g. a copy of the official file).

Every file's zip directory is checked first (:func:`check_archive`: how many entries, how large
each would become once inflated, against what a v1 state dict can be), so a small file that would
inflate to gigabytes is refused before anything is decompressed; then it is loaded with
``torch.load(..., weights_only=True, map_location="cpu")`` and checked against the v1 layout (key
names, shapes, parameter count) before it reaches a model.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from ..errors import OutputError, WeightsError, one_line
from .atomic import atomic_output, output_error
from .model import UniverSeg

OFFICIAL_URL = (
    "https://github.com/JJGO/UniverSeg/releases/download/weights/universeg_v1_nf64_ss64_STA.pt"
)
OFFICIAL_FILENAME = "universeg_v1_nf64_ss64_STA.pt"
#: sha256 of the official file; None until someone with access pins it (no hash is published).
OFFICIAL_SHA256: Optional[str] = None
OFFICIAL_LICENSE_NOTICE = (
    "The official UniverSeg weights are licensed under OpenRAIL++-M and may be used for research "
    "purposes only (https://github.com/JJGO/UniverSeg). By downloading them you accept that license."
)
EXPECTED_PARAMETERS = 1_182_785
EXPECTED_TENSORS = 44
#: The most a v1 state dict's tensor data can be: every parameter stored as float64 (fp16 and
#: fp32 files are smaller). A zip entry (or all of them together) that would inflate to more
#: cannot be UniverSeg v1 weights.
MAX_TENSOR_BYTES = EXPECTED_PARAMETERS * 8
#: The archive's other entries together (the pickle, about 5 KB for v1, version, byte order, ...).
MAX_METADATA_BYTES = 256 * 1024
#: Entries of a PyTorch archive of a v1 state dict: one storage per tensor, a few metadata files.
MAX_ARCHIVE_ENTRIES = EXPECTED_TENSORS + 16
#: Largest weights file read or downloaded (the inflated bound, plus the zip's own overhead).
MAX_FILE_BYTES = MAX_TENSOR_BYTES + MAX_METADATA_BYTES + 1024 * 1024
_STORAGE_ENTRY = re.compile(r"^[^/]+/data/\d+$")

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # UniverSegLogic/
RESOURCE_DIRS = (
    _PACKAGE_DIR / "resources",  # pip-installed package data (wheel)
    _PACKAGE_DIR.parent / "Resources",  # source checkout, Slicer extension
)


@dataclass
class LoadedWeights:
    """A verified state dict and where it came from."""

    state_dict: Dict[str, torch.Tensor]
    source: str  # "official", "starter" or "file"
    path: str
    description: str


def expected_layout() -> Dict[str, tuple]:
    """Key -> shape of the v1 state dict, from this project's model definition."""
    return {k: tuple(v.shape) for k, v in UniverSeg().state_dict().items()}


def verify_state_dict(state: object, origin: str = "weights") -> Dict[str, torch.Tensor]:
    """Check ``state`` is a v1 state dict (keys, shapes, dtype, parameter count, finite values)."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # tolerate a common wrapper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{origin}: not a UniverSeg state dict (expected a dict of tensors)")
    layout = expected_layout()
    missing = sorted(set(layout) - set(state))
    extra = sorted(set(state) - set(layout))
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise WeightsError(f"{origin}: wrong architecture: {', '.join(detail)} keys")
    for k, shape in layout.items():
        if tuple(state[k].shape) != shape:
            raise WeightsError(
                f"{origin}: wrong architecture: {k} has shape "
                f"{tuple(state[k].shape)}, expected {shape}"
            )
        if not state[k].is_floating_point():
            raise WeightsError(f"{origin}: {k} is not a floating-point tensor")
        if not torch.isfinite(state[k]).all():
            raise WeightsError(f"{origin}: {k} holds NaN or infinite values")
    n = sum(v.numel() for v in state.values())
    if len(state) != EXPECTED_TENSORS or n != EXPECTED_PARAMETERS:
        raise WeightsError(
            f"{origin}: expected {EXPECTED_TENSORS} tensors / "
            f"{EXPECTED_PARAMETERS} parameters, got {len(state)} / {n}"
        )
    return {k: v.float().cpu() for k, v in state.items()}


def sha256_of(path: str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_archive(path: str) -> None:
    """Refuse, from the zip's central directory alone (nothing is inflated), an archive that
    cannot hold a v1 state dict: more than :data:`MAX_ARCHIVE_ENTRIES` entries, a name given
    twice, a compression other than stored/deflate, a storage entry above
    :data:`MAX_TENSOR_BYTES` or other entries above :data:`MAX_METADATA_BYTES` once inflated.
    (PyTorch's reader allocates each record by the size this directory declares and stops
    inflating there.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise WeightsError(
            f"cannot read weights file {path} (corrupt or truncated?): {one_line(exc)}"
        ) from None
    refuse = f"refused weights file {path} before inflating it"
    if len(entries) > MAX_ARCHIVE_ENTRIES:
        raise WeightsError(
            f"{refuse}: {len(entries)} zip entries, more than a UniverSeg v1 state dict has "
            f"({MAX_ARCHIVE_ENTRIES} at most)"
        )
    names = set()
    tensor_bytes = other_bytes = 0
    for entry in entries:
        if entry.filename in names:
            raise WeightsError(f"{refuse}: two zip entries are named {entry.filename!r}")
        names.add(entry.filename)
        if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise WeightsError(
                f"{refuse}: zip entry {entry.filename!r} uses compression method "
                f"{entry.compress_type} (PyTorch writes stored entries)"
            )
        if _STORAGE_ENTRY.match(entry.filename):
            tensor_bytes += entry.file_size
        else:
            other_bytes += entry.file_size
        if tensor_bytes > MAX_TENSOR_BYTES or other_bytes > MAX_METADATA_BYTES:
            total = sum(e.file_size for e in entries)
            raise WeightsError(
                f"{refuse}: its entries would inflate to {total} bytes, more than a UniverSeg "
                f"v1 state dict can be ({MAX_TENSOR_BYTES + MAX_METADATA_BYTES} bytes with "
                "every parameter as float64)"
            )


_CONTENT_DIGESTS: Dict[Tuple[str, int, int, int], str] = {}


def content_sha256(path: str) -> str:
    """:func:`sha256_of`, remembered per file (real path, inode, size and modification time),
    so that asking again for an unchanged file costs a ``stat``."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _CONTENT_DIGESTS:
        _CONTENT_DIGESTS[key] = sha256_of(path)
    return _CONTENT_DIGESTS[key]


def is_starter_content(path: str) -> bool:
    """Whether the file at ``path`` is byte for byte the shipped starter weights (False when
    either cannot be read)."""
    try:
        starter = starter_path()
        if os.path.getsize(path) != os.path.getsize(starter):
            return False
        return content_sha256(path) == content_sha256(str(starter))
    except (OSError, WeightsError):
        return False


def load_file(path: str, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Load and verify a weights file: its zip directory first (:func:`check_archive`), then
    ``torch.load(..., weights_only=True)`` (GPU-saved files load on CPU) and the v1 layout."""
    p = Path(path)
    try:
        if not p.is_file():
            raise WeightsError(f"weights file not found: {path}")
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {_reason(exc)}") from None
    if size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    if size > MAX_FILE_BYTES:
        raise WeightsError(f"weights file is too large to be UniverSeg v1 ({size} bytes): {path}")
    if sha256 and sha256_of(str(p)).lower() != sha256.lower():
        raise WeightsError(f"weights file {path} does not match its pinned sha256")
    if not zipfile.is_zipfile(str(p)):
        raise WeightsError(
            f"cannot read weights file {path} (corrupt or truncated?): not a PyTorch zip archive"
        )
    check_archive(str(p))
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and unpickler errors alike
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in msg:  # the archive is intact: its pickle is not plain
            raise WeightsError(
                f"refused to load {path}: it contains Python objects other than "
                "tensors (not a plain weights file)"
            ) from None
        raise WeightsError(
            f"cannot read weights file {path} (corrupt or truncated?): {msg}"
        ) from None
    return verify_state_dict(state, origin=str(path))


def _reason(exc: OSError) -> str:
    """The reason of an OS error in a few words (e.g. 'read-only file system')."""
    return one_line(output_error(exc, "")).split(": ", 1)[-1]


_CACHE_HINT = "set UNIVERSEG_CACHE to a writable folder or pass a weights file"


def cache_dir() -> Path:
    """Per-user cache folder for downloaded weights (``UNIVERSEG_CACHE`` overrides it)."""
    env = os.environ.get("UNIVERSEG_CACHE")
    if env:
        return Path(env)
    base = (
        os.environ.get("XDG_CACHE_HOME")
        or (os.environ.get("LOCALAPPDATA") if sys.platform == "win32" else None)
        or os.path.join(os.path.expanduser("~"), ".cache")
    )
    return Path(base) / "universeg-slicer"


def download(
    url: str,
    dest: Path,
    sha256: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically; verify the sha256 when given. Returns ``dest``."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(str(dest)) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                    total = int(resp.headers.get("Content-Length") or 0)
                    done = 0
                    while True:
                        chunk = resp.read(1 << 16)
                        if not chunk:
                            break
                        out.write(chunk)
                        done += len(chunk)
                        if done > MAX_FILE_BYTES:
                            raise WeightsError(f"download from {url} is larger than expected")
                        if progress:
                            progress(done, total)
                if total and done != total:
                    raise WeightsError(
                        f"download from {url} was cut short ({done} of {total} bytes)"
                    )
            except (urllib.error.URLError, ValueError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                raise WeightsError(
                    f"cannot download weights from {url} ({reason}); offline? "
                    "Download the file elsewhere and pass its path as the weights"
                ) from None
            if sha256 and sha256_of(tmp).lower() != sha256.lower():
                raise WeightsError(f"downloaded file from {url} does not match the pinned sha256")
            load_file(tmp)  # structure check before the file becomes visible in the cache
    except OutputError as exc:
        raise WeightsError(
            f"cannot store the downloaded weights in {dest.parent} "
            f"({one_line(exc).rsplit(': ', 1)[-1]}); {_CACHE_HINT}"
        ) from None
    except OSError as exc:
        raise WeightsError(
            f"cannot store the downloaded weights in {dest.parent} ({_reason(exc)}); {_CACHE_HINT}"
        ) from None
    return dest


def _notice_marker() -> Path:
    return cache_dir() / "official-license-notice-shown"


def show_license_notice_once(echo: Callable[[str], None] = print) -> bool:
    """Print the official weights' license notice the first time; True when shown now."""
    marker = _notice_marker()
    try:
        if marker.exists():
            return False
    except OSError:
        pass  # an unreadable cache: show the notice
    echo(OFFICIAL_LICENSE_NOTICE)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(OFFICIAL_LICENSE_NOTICE + "\n")
    except OSError:
        pass  # a read-only cache: the notice is shown again next time
    return True


def official_path(
    url: str = OFFICIAL_URL,
    sha256: Optional[str] = OFFICIAL_SHA256,
    allow_download: bool = True,
    echo: Callable[[str], None] = print,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Path of the cached official weights, downloading them on first use."""
    url = os.environ.get("UNIVERSEG_OFFICIAL_URL", url)  # mirrors / tests
    dest = cache_dir() / OFFICIAL_FILENAME
    try:
        if dest.is_file():
            return dest
    except OSError as exc:
        raise WeightsError(
            f"cannot read the weights cache {dest.parent} ({_reason(exc)}); {_CACHE_HINT}"
        ) from None
    if not allow_download:
        raise WeightsError("official weights are not in the cache and downloading is disabled")
    show_license_notice_once(echo)
    return download(url, dest, sha256=sha256, progress=progress)


def resource_file(name: str) -> Optional[Path]:
    """The shipped file ``Resources/<name>`` (starter weights, fusion), or None if absent."""
    for folder in RESOURCE_DIRS:
        if (folder / name).is_file():
            return folder / name
    return None


def starter_path() -> Path:
    """Path of this project's starter weights."""
    path = resource_file("starter_weights.pt")
    if path is None:
        raise WeightsError("starter weights not found (expected Resources/starter_weights.pt)")
    return path


def load_weights(
    source: str = "starter", echo: Callable[[str], None] = print, allow_download: bool = True
) -> LoadedWeights:
    """Resolve ``official``, ``starter`` or a file path to verified weights."""
    if source == "official":
        path = official_path(allow_download=allow_download, echo=echo)
        state = load_file(str(path), sha256=OFFICIAL_SHA256)
        return LoadedWeights(
            state,
            "official",
            str(path),
            "official UniverSeg v1 weights (OpenRAIL++-M, research use only)",
        )
    if source == "starter":
        path = starter_path()
        return LoadedWeights(
            load_file(str(path)),
            "starter",
            str(path),
            "UniverSeg-for-Slicer starter weights (Apache-2.0)",
        )
    return LoadedWeights(load_file(source), "file", str(source), f"weights from {source}")


def build_model(weights: LoadedWeights, device: str = "cpu") -> UniverSeg:
    """A v1 network in eval mode holding ``weights`` (strict load)."""
    model = UniverSeg()
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval().to(device)
