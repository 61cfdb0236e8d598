"""Reading images and segmentations from files, and writing ``.seg.nrrd`` results.

Images: anything SimpleITK reads (NRRD, NIfTI, MHA, ...). Segmentations: Slicer ``.seg.nrrd``
(segment names, colors and tags are kept, through slicerio) or integer label maps (one segment per
label value). All arrays are returned KJI with an IJK-to-RAS matrix (files are LPS; converted here).
Writes are atomic: a result file appears complete or not at all, and :func:`check_output_path`
validates an output path (folder, permissions, name length, not one of the inputs) before any
computation starts.

Inputs are checked, not trusted: a truncated or size-inconsistent image (a ``.nii.gz`` cut short
reads as zeros in ITK) and a "label map" with more values than any segmentation has (an image
given by mistake) are refused with one line. Segment names (and every other ``.seg.nrrd`` field)
round-trip exactly in UTF-8, as Slicer writes them; pynrrd alone reads headers as ASCII and drops
every other character (reading escapes them around it). ``.seg.nrrd`` files are written directly
(:func:`write_segmentation`): the header slicerio would write, and the voxels as one gzip stream
made slice block by slice block.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, OutputError, UsageError, one_line
from .atomic import output_error, temporary_name, write_with
from .geometry import Volume
from .headers import nifti_expected_bytes

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: A label map with more distinct values than this is refused unless the segments are named
#: (an image given as labels by mistake: a CT has thousands of values).
MAX_LABEL_VALUES = 255

#: Colors given to segments that come without one (label maps).
PALETTE: Sequence[Tuple[float, float, float]] = (
    (0.86, 0.24, 0.24),
    (0.24, 0.70, 0.35),
    (0.25, 0.45, 0.85),
    (0.93, 0.75, 0.20),
    (0.65, 0.35, 0.80),
    (0.20, 0.75, 0.78),
    (0.95, 0.55, 0.25),
    (0.55, 0.55, 0.55),
)


@dataclass
class Segment:
    """One segment: a boolean KJI mask on the reference grid plus its display fields."""

    name: str
    mask: np.ndarray
    color: Tuple[float, float, float] = (0.86, 0.24, 0.24)
    id: Optional[str] = None
    fields: Dict[str, object] = field(default_factory=dict)  # terminology, tags, ...


@dataclass
class Segmentation:
    """Segments on the grid of a reference volume."""

    reference: Volume
    segments: List[Segment]

    def names(self) -> List[str]:
        return [s.name for s in self.segments]

    def get(self, name: str) -> Segment:
        """The segment with ID ``name``, else the one segment called ``name``; a name that two
        segments share is refused (segments are told apart by ID, never by name)."""
        for s in self.segments:
            if s.id is not None and s.id == name:
                return s
        named = [s for s in self.segments if s.name == name]
        if len(named) == 1:
            return named[0]
        if named:
            ids = ", ".join(str(s.id) for s in named)
            raise UsageError(
                f"{len(named)} segments are named {name!r}: choose one by its ID ({ids})"
            )
        raise InputError(f"no segment named {name!r} (segments: {', '.join(self.names())})")


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"expected a file, got a folder: {path}")


def _name_max(folder: str) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # pragma: no cover - e.g. Windows
        return 255


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def _probe_folder(folder: str, path: str) -> None:
    """Create and remove a temporary file in ``folder`` (read-only, permissions, full inodes)."""
    probe = temporary_name(os.path.join(folder, "probe"))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise output_error(exc, path) from None


def check_output_path(
    path: str, inputs: Iterable[Optional[str]] = (), option: str = "--out", folder: bool = False
) -> str:
    """Check, before any computation, that ``path`` can be written: its folder exists and is
    writable, the name fits the file system, it is not a folder (or, with ``folder=True``, not a
    file) and it is none of ``inputs`` (symbolic and hard links included). Raises
    :class:`OutputError` or :class:`UsageError` (one line); returns ``path``."""
    if not path or not str(path).strip():
        raise UsageError(f"{option}: no path given")
    path = os.fspath(path)
    for given in inputs:
        if given and os.path.exists(given) and os.path.exists(path) and _same_file(path, given):
            raise UsageError(
                f"{option} {path} is the input {given}: choose another output "
                "(the input would be overwritten)"
            )
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputError(f"cannot write into {path}: it exists and is not a folder")
        parent = os.path.abspath(path)
        while not os.path.isdir(parent):  # the nearest existing folder must take new entries
            up = os.path.dirname(parent)
            if up == parent or (os.path.exists(parent) and not os.path.isdir(parent)):
                raise OutputError(f"cannot create the folder {path}: a parent is not a folder")
            parent = up
        _probe_folder(parent, path)
        return path
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: is a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if len(os.path.basename(path).encode("utf-8", "surrogateescape")) > _name_max(parent):
        raise output_error(OSError(errno.ENAMETOOLONG, "file name too long"), path)
    _probe_folder(parent, path)
    return path


# ------------------------------------------------------------------------------ image files


def _itk_reason(exc: BaseException) -> str:
    """The informative line of an ITK exception (its ERROR line, else the last line)."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    for line in lines:
        if "ERROR" in line and "): " in line:
            return line.split("): ", 1)[1]
    return lines[-1] if lines else type(exc).__name__


def _gzip_payload_size(path: str, keep: int = 0) -> Tuple[int, bytes]:
    """Decompressed size of a gzip file and its first ``keep`` bytes; InputError when the
    compressed stream is damaged or ends early (ITK reads such a file with zeros for the rest).
    Bytes after a complete member that are not another member are ignored, as zlib does."""
    head = bytearray()
    total, members = 0, 0
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    started = False
    with open(path, "rb") as fh:
        pending = b""
        while True:
            chunk = pending or fh.read(1 << 20)
            pending = b""
            if not chunk:
                break
            try:
                data = d.decompress(chunk)
            except zlib.error as exc:
                if members:
                    break  # trailing bytes after a complete member
                raise InputError(f"{path}: the compressed data is damaged ({exc})") from None
            started = True
            total += len(data)
            if len(head) < keep:
                head += data[: keep - len(head)]
            if d.eof:
                members += 1
                pending = d.unused_data
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                started = False
    if started or not members:
        raise InputError(f"{path}: the file is truncated (the compressed data ends early)")
    return total, bytes(head)


def _gzip_size_fast(path: str) -> Tuple[Optional[int], bytes]:
    """(size, first bytes) of a single-member gzip NIfTI without decompressing it all: its
    trailer (uncompressed size mod 2**32) must equal what its header needs -- a file cut short
    ends in arbitrary bytes instead. (None, b"") when that cannot tell; then decompress."""
    try:
        with open(path, "rb") as fh:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            head = d.decompress(fh.read(1 << 16), 540)
            fh.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", fh.read(4))[0]
    except (OSError, zlib.error, struct.error):
        return None, b""
    expected = nifti_expected_bytes(head)
    if expected is not None and expected[0] % (1 << 32) == trailer:
        return expected[0], head
    return None, b""


def _check_complete(path: str) -> None:
    """Refuse a file whose data is shorter than its header says (ITK would fill in zeros)."""
    lower = str(path).lower()
    gz = lower.endswith(".gz")
    if gz:
        size, head = _gzip_size_fast(path)
        if size is None:
            size, head = _gzip_payload_size(path, keep=540)
    else:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(540)
    nifti = lower.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz"))
    if not nifti:
        return
    if lower.endswith((".img", ".img.gz")):  # the pair's header is beside it
        return
    expected = nifti_expected_bytes(head)
    if expected is None:
        return
    need, offset = expected
    if lower.endswith((".hdr", ".hdr.gz")):
        base = path[: -len(".hdr.gz")] if lower.endswith(".gz") else path[: -len(".hdr")]
        for img in (base + ".img", base + ".img.gz"):
            if os.path.isfile(img):
                got = _gzip_payload_size(img)[0] if img.endswith(".gz") else os.path.getsize(img)
                if got < need - offset:
                    raise InputError(
                        f"{img}: the file is truncated ({got} of {need - offset} bytes of voxel data)"
                    )
        return
    if size < need:
        raise InputError(f"{path}: the file is truncated ({size} of {need} bytes)")


def ijk_to_ras_from_sitk(image) -> np.ndarray:
    """IJK-to-RAS matrix of a 3D SimpleITK image."""
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.array(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ m


def volume_to_sitk(volume: Volume):
    """A SimpleITK image of ``volume`` (same voxels and geometry; inverse of
    :func:`ijk_to_ras_from_sitk`)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    m = LPS_TO_RAS @ volume.ijk_to_ras
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (m[:3, :3] / spacing).reshape(-1)])
    image.SetOrigin([float(v) for v in m[:3, 3]])
    return image


def read_image(path: str) -> Volume:
    """Read a 3D scalar image (RGB images become grayscale) as a :class:`Volume`."""
    import SimpleITK as sitk

    _check_exists(path)
    _check_complete(str(path))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read image {path}: {_itk_reason(exc)}") from None
    if image.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        if image.GetNumberOfComponentsPerPixel() in (3, 4):
            array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            raise InputError(
                f"{path}: expected a scalar image, got "
                f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
    if min(array.shape) < 1:
        raise InputError(f"{path}: the image is empty")
    return Volume(array, ijk_to_ras_from_sitk(image))


def _embed(
    reference: Volume, ijk_to_ras: np.ndarray, masks_kji: List[np.ndarray], path: str
) -> List[np.ndarray]:
    """Place masks given on a voxel-aligned sub- or super-grid onto the reference grid."""
    if (
        masks_kji
        and masks_kji[0].shape == reference.array.shape
        and np.allclose(ijk_to_ras, reference.ijk_to_ras, atol=1e-3)
    ):
        return masks_kji
    a, b = reference.ijk_to_ras, ijk_to_ras
    if not np.allclose(a[:3, :3], b[:3, :3], atol=1e-4):
        raise InputError(
            f"{path}: grid mismatch: the segmentation's voxel axes or spacing differ "
            "from the image's (resample it onto the image first)"
        )
    offset_ijk = np.linalg.solve(a[:3, :3], b[:3, 3] - a[:3, 3])
    if not np.allclose(offset_ijk, np.round(offset_ijk), atol=1e-3):
        raise InputError(
            f"{path}: grid mismatch: the segmentation's voxels are not aligned "
            "with the image's voxels"
        )
    off = np.round(offset_ijk).astype(int)[::-1]  # K, J, I
    out = []
    for m in masks_kji:
        full = np.zeros(reference.array.shape, dtype=bool)
        src = [slice(max(0, -o), min(n, N - o)) for o, n, N in zip(off, m.shape, full.shape)]
        dst = [slice(s.start + o, s.stop + o) for s, o in zip(src, off)]
        if any(s.stop <= s.start for s in src):
            out.append(full)
            continue
        full[tuple(dst)] = m[tuple(src)]
        # anything outside the reference grid is lost: refuse rather than crop silently
        if full.sum() != m.sum():
            raise InputError(f"{path}: grid mismatch: the segmentation extends beyond the image")
        out.append(full)
    return out


# ------------------------------------------------------------------ .seg.nrrd in UTF-8

#: Longest header read when looking for non-ASCII fields (the header ends at the first blank line).
_MAX_HEADER = 16 << 20


def _header_of(path: str) -> Optional[bytes]:
    """The header of an attached-data NRRD file (up to and including its blank line), or None."""
    with open(path, "rb") as fh:
        data = b""
        while len(data) < _MAX_HEADER:
            chunk = fh.read(1 << 16)
            if not chunk:
                return None
            data += chunk
            end = data.find(b"\n\n")
            if end >= 0:
                return data[: end + 2]
    return None


def _nonce_for(text: str) -> str:
    while True:
        nonce = "u8" + secrets.token_hex(4)
        if nonce not in text:
            return nonce


def _escape(value, nonce: str):
    """Strings inside ``value`` (dicts, lists, tuples) with every non-ASCII character replaced by
    ``@<nonce>x<hex>@`` (ASCII that neither pynrrd nor slicerio alter)."""
    if isinstance(value, str):
        return "".join(c if ord(c) < 128 else f"@{nonce}x{ord(c):x}@" for c in value)
    if isinstance(value, dict):
        return {_escape(k, nonce): _escape(v, nonce) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_escape(v, nonce) for v in value)
    return value


def _unescape(value, nonce: str):
    """Inverse of :func:`_escape` (numpy arrays and other values pass through)."""
    if isinstance(value, str):
        return re.sub(f"@{nonce}x([0-9a-f]{{1,6}})@", lambda m: chr(int(m.group(1), 16)), value)
    if isinstance(value, dict):
        return type(value)((_unescape(k, nonce), _unescape(v, nonce)) for k, v in value.items())
    if isinstance(value, list):
        return [_unescape(v, nonce) for v in value]
    if isinstance(value, tuple):
        return tuple(_unescape(v, nonce) for v in value)
    return value


def _read_seg_nrrd(path: str) -> Dict:
    """``slicerio.read_segmentation`` with every header field decoded as UTF-8 (what Slicer
    writes; invalid UTF-8 is read as Latin-1) instead of pynrrd's ASCII, which drops characters."""
    import slicerio

    header = _header_of(path)
    if header is None or max(header, default=0) < 0x80 or b"\ndata file:" in header:
        return slicerio.read_segmentation(path)
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        text = header.decode("latin-1")
    nonce = _nonce_for(text)
    with tempfile.TemporaryDirectory(prefix="universeg-") as tmp:
        copy = os.path.join(tmp, "header-escaped.seg.nrrd")
        with open(path, "rb") as src, open(copy, "wb") as dst:
            src.seek(len(header))
            dst.write(_escape(text, nonce).encode("ascii"))
            shutil.copyfileobj(src, dst, 1 << 20)
        seg = slicerio.read_segmentation(copy)
    return _unescape(seg, nonce)


# ------------------------------------------------------------------------------ segmentations


def _label_value_of(name: str) -> Optional[int]:
    """``'label_5'`` or ``'5'`` -> 5 (how label-map segments are named); else None."""
    text = name.strip()
    if text.startswith("label_"):
        text = text[len("label_") :]
    return int(text) if text.lstrip("-").isdigit() else None


def read_segmentation(
    path: str, reference: Volume, segments: Optional[Sequence[str]] = None
) -> Segmentation:
    """Read a ``.seg.nrrd`` or an integer label map onto the grid of ``reference``.

    A label map yields one segment per value (``label_<value>``). One with more than
    :data:`MAX_LABEL_VALUES` values is refused (an image given as labels) unless ``segments``
    names the ones to use (``label_5`` or ``5``); then only those are read. (``segments`` does
    not select anything otherwise: the caller picks its segments from the result.)"""
    _check_exists(path)
    if str(path).lower().endswith(".seg.nrrd"):
        import slicerio

        try:
            seg = _read_seg_nrrd(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
            raise InputError(f"cannot read segmentation {path}: {one_line(exc)}") from None
        ijk_to_ras = LPS_TO_RAS @ np.asarray(seg["ijkToLPS"], dtype=np.float64)
        voxels = seg["voxels"]
        if voxels.ndim not in (3, 4):
            raise InputError(f"{path}: unexpected voxel array of shape {voxels.shape}")
        segs = seg.get("segments", [])
        masks = [
            np.ascontiguousarray(slicerio.segment_mask(seg, s).transpose(2, 1, 0)) for s in segs
        ]
        masks = _embed(reference, ijk_to_ras, masks, path)
        out = []
        for i, (s, m) in enumerate(zip(segs, masks)):
            fields = {
                k: v
                for k, v in s.items()
                if k not in ("id", "name", "color", "labelValue", "layer", "extent")
            }
            out.append(
                Segment(
                    s.get("name", s.get("id", f"Segment_{i + 1}")),
                    m,
                    tuple(float(c) for c in s.get("color", PALETTE[i % len(PALETTE)])),
                    s.get("id"),
                    fields,
                )
            )
        return Segmentation(reference, out)

    import SimpleITK as sitk

    _check_complete(str(path))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read label map {path}: {_itk_reason(exc)}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3D scalar label map")
    labels = sitk.GetArrayFromImage(image)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(np.equal(np.mod(labels, 1), 0)):
            raise InputError(f"{path}: a label map must hold integer label values")
        labels = labels.astype(np.int64)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if len(values) > MAX_LABEL_VALUES and segments:
        wanted = {_label_value_of(str(n)) for n in segments} - {None}
        values = [v for v in values if v in wanted]
        if not values:
            raise InputError(
                f"{path}: none of {', '.join(map(str, segments))} is a value of this label map"
            )
    elif len(values) > MAX_LABEL_VALUES:
        raise InputError(
            f"{path} holds {len(values)} different values, more than a label map has "
            f"({MAX_LABEL_VALUES} at most): is it an image? To use some of them, name the "
            f"segments (e.g. label_{values[0]},label_{values[1]})"
        )
    masks = _embed(reference, ijk_to_ras_from_sitk(image), [labels == v for v in values], path)
    segments = [
        Segment(f"label_{v}", m, PALETTE[i % len(PALETTE)], f"label_{v}", {"labelValue": v})
        for i, (v, m) in enumerate(zip(values, masks))
    ]
    return Segmentation(reference, segments)


def write_image(path: str, image) -> None:
    """Write a SimpleITK image atomically; ITK's write failures become one-line OutputErrors."""
    import SimpleITK as sitk

    def writer(tmp: str) -> None:
        try:
            sitk.WriteImage(image, tmp)
        except RuntimeError as exc:
            raise OutputError(f"cannot write {path}: {_itk_reason(exc)}") from None

    write_with(path, writer)


#: gzip level of the ``.seg.nrrd`` voxels: 1 (zlib's fastest). A painted or predicted mask is
#: mostly long runs, which the fastest level already packs well; higher levels cost seconds on a
#: 512x512x400 grid for a few percent of its size.
SEG_NRRD_GZIP_LEVEL = 1
#: slices per block of voxels compressed at a time (bounds the writer's working copy)
_WRITE_SLICES = 16


def _nrrd_number(x: float) -> str:
    return f"{float(x):.17g}"


def _nrrd_vector(v) -> str:
    return "(" + ",".join(_nrrd_number(x) for x in v) + ")"


def _segment_layers(masks: List[np.ndarray]) -> Tuple[List[int], List[int], int]:
    """(layer, label value) of each mask, and the number of layers: each mask goes into the
    first layer where it overlaps no mask placed before it (label values 1, 2, ... per layer),
    else into a new layer -- how Slicer (and ``slicerio.add_segment``) stores segments."""
    layers: List[List[np.ndarray]] = []
    where, values = [], []
    for m in masks:
        li = next(
            (
                i
                for i, members in enumerate(layers)
                if len(members) < 255 and not any(_overlap(m, o) for o in members)
            ),
            None,
        )
        if li is None:
            layers.append([])
            li = len(layers) - 1
        layers[li].append(m)
        where.append(li)
        values.append(len(layers[li]))
    return where, values, max(1, len(layers))


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    for k in range(0, a.shape[0], _WRITE_SLICES):
        if np.logical_and(a[k : k + _WRITE_SLICES], b[k : k + _WRITE_SLICES]).any():
            return True
    return False


def _extent_ijk(mask: np.ndarray) -> List[int]:
    """[i0, i1, j0, j1, k0, k1] of a KJI mask (``[0, -1, 0, -1, 0, -1]`` when empty)."""
    out: List[int] = []
    for axis in (2, 1, 0):  # I, J, K
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(idx):
            return [0, -1, 0, -1, 0, -1]
        out += [int(idx[0]), int(idx[-1])]
    return out


def _segment_header(index: int, segment: Dict) -> List[Tuple[str, str]]:
    """``Segment<index>_*`` fields of one segment, formatted as slicerio writes them."""
    from slicerio.segmentation import terminology_entry_to_string

    out, tags = [], []
    for key, value in segment.items():
        if key == "terminology":
            tags.append(f"TerminologyEntry:{terminology_entry_to_string(value)}")
            continue
        if key == "status":
            tags.append(f"Segmentation.Status:{value}")
            continue
        if key == "tags":
            tags.extend(f"{k}:{v}" for k, v in dict(value).items())
            continue
        name = {
            "labelValue": "LabelValue",
            "layer": "Layer",
            "name": "Name",
            "id": "ID",
            "color": "Color",
            "nameAutoGenerated": "NameAutoGenerated",
            "colorAutoGenerated": "ColorAutoGenerated",
            "extent": "Extent",
        }.get(key, key)
        if key in ("color", "extent"):
            text = " ".join(str(v) for v in value)
        elif key in ("nameAutoGenerated", "colorAutoGenerated"):
            text = "1" if value else "0"
        else:
            text = str(value)
        out.append((f"Segment{index}_{name}", text))
    out.append((f"Segment{index}_Tags", "|".join(tags) + "|"))
    return out


def write_segmentation(path: str, segmentation: Segmentation) -> None:
    """Write ``segmentation`` as a Slicer ``.seg.nrrd`` on its reference grid (atomic).

    Written directly (header and gzip stream), with the fields and layout ``slicerio`` writes
    and Slicer reads: segments that overlap none before them share a layer (one label value
    each), others go into further layers (a 4D ``list`` axis). Field values are UTF-8, as Slicer
    writes them. The masks are read slice block by slice block: no copy of the volume is made
    beyond one block (slicerio's ``add_segment`` and pynrrd's gzip level 9 took 7 s and several
    copies of a 512x512x400 volume)."""
    ref = segmentation.reference
    shape = tuple(int(n) for n in ref.array.shape)  # K, J, I
    masks = []
    for s in segmentation.segments:
        m = np.asarray(s.mask)
        if m.shape != shape:
            raise UsageError(f"segment {s.name!r}: mask shape {m.shape} is not the grid {shape}")
        masks.append(m.astype(bool, copy=False))
    where, values, n_layers = _segment_layers(masks)
    fields: List[Tuple[str, str]] = [
        ("Segmentation_ReferenceImageExtentOffset", "0 0 0"),
        ("Segmentation_MasterRepresentation", "Binary labelmap"),
    ]
    used = set()
    for index, (s, m) in enumerate(zip(segmentation.segments, masks)):
        segment = dict(s.fields)
        for key in ("labelValue", "layer", "extent"):
            segment.pop(key, None)
        sid = s.id or s.name
        while sid in used:
            sid += "_"
        used.add(sid)
        segment.update({"id": sid, "name": s.name, "color": [float(c) for c in s.color]})
        segment.update(
            {"labelValue": values[index], "layer": where[index], "extent": _extent_ijk(m)}
        )
        fields += _segment_header(index, segment)
    ijk_to_lps = LPS_TO_RAS @ ref.ijk_to_ras
    directions = " ".join(_nrrd_vector(ijk_to_lps[:3, a]) for a in range(3))
    sizes = " ".join(str(n) for n in shape[::-1])
    kinds = "domain domain domain"
    if n_layers > 1:
        sizes, kinds = f"{n_layers} {sizes}", f"list {kinds}"
        directions = f"none {directions}"
    lines = [
        "NRRD0005",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: uint8",
        f"dimension: {4 if n_layers > 1 else 3}",
        "space: left-posterior-superior",
        f"sizes: {sizes}",
        f"space directions: {directions}",
        f"kinds: {kinds}",
        "encoding: gzip",
        f"space origin: {_nrrd_vector(ijk_to_lps[:3, 3])}",
    ]
    for key, value in fields:
        if "\n" in key or "\n" in value or ":=" in key:
            raise UsageError(f"segment field {key!r} cannot be written to a .seg.nrrd")
        lines.append(f"{key}:={value}")
    header = ("\n".join(lines) + "\n\n").encode("utf-8")

    def writer(tmp: str) -> None:
        packer = zlib.compressobj(SEG_NRRD_GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        with open(tmp, "wb") as fh:
            fh.write(header)
            for k in range(0, shape[0], _WRITE_SLICES):
                block = np.zeros(
                    (min(_WRITE_SLICES, shape[0] - k),) + shape[1:] + (n_layers,), np.uint8
                )
                for m, li, value in zip(masks, where, values):
                    block[..., li][m[k : k + _WRITE_SLICES]] = value
                # KJI in C order is IJK in the file's (Fortran) order; the layer varies fastest
                fh.write(packer.compress(block.tobytes()))
            fh.write(packer.flush())

    write_with(path, writer)
