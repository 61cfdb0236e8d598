"""What an image file's header says, read in plain Python before any reader sees the file.

NRRD, MetaImage and NIfTI headers name the shape, the voxel type, the encoding and *where the
voxel data is*: in the same file, or in another file (NRRD ``data file``, MetaImage
``ElementDataFile``, the ``.img`` of a NIfTI/Analyze ``.hdr`` pair). :class:`HeaderFacts` holds
what a caller needs to decide about a file without reading its data: whether it is
self-contained (:attr:`HeaderFacts.external`), how many voxels and bytes it expands to, where the
data starts. Nothing here decompresses anything or opens another file.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import InputError

#: Longest header searched for its end (a Slicer .seg.nrrd with many segments stays far below).
MAX_HEADER_BYTES = 4 * 2**20

_NRRD_TYPES: Dict[str, int] = {}
for _names, _size in (
    ("char signed_char int8 int8_t uchar unsigned_char uint8 uint8_t", 1),
    ("short short_int signed_short signed_short_int int16 int16_t", 2),
    ("ushort unsigned_short unsigned_short_int uint16 uint16_t", 2),
    ("int signed_int int32 int32_t uint unsigned_int uint32 uint32_t float", 4),
    ("longlong long_long long_long_int signed_long_long signed_long_long_int int64 int64_t", 8),
    ("ulonglong unsigned_long_long unsigned_long_long_int uint64 uint64_t double", 8),
):
    for _name in _names.split():
        _NRRD_TYPES[_name.replace("_", " ")] = _size

#: NRRD encodings that NrrdIO (ITK, Slicer) reads, by their canonical name.
_NRRD_ENCODINGS = {
    "raw": "raw",
    "txt": "text",
    "text": "text",
    "ascii": "text",
    "hex": "hex",
    "gz": "gzip",
    "gzip": "gzip",
}

_META_TYPES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


@dataclass(frozen=True)
class HeaderFacts:
    """What a header says about its voxel data."""

    format: str  #: ``NRRD``, ``MetaImage`` or ``NIfTI``
    shape: Tuple[int, ...]  #: sizes as the header lists them
    bytes_per_voxel: int  #: all components of one voxel
    encoding: str  #: ``raw``, ``gzip``, ``zlib``, ``text`` or ``hex``
    #: where the voxel data starts: in the file, or (a ``.nii.gz``) in the decompressed stream
    data_offset: int
    #: what the header says about a separate data file; None when the data is in this file
    external: Optional[str] = None
    text: str = ""  #: the header itself (NRRD, MetaImage), for field checks

    @property
    def voxels(self) -> int:
        """Number of voxels (the product of the sizes)."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of voxel data once decoded (what a reader allocates)."""
        return self.voxels * self.bytes_per_voxel


def _header_end(head: bytes) -> int:
    """Offset just past NRRD's blank line (the header's end) in ``head``, or -1."""
    ends = [at + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if (at := head.find(sep)) >= 0]
    return min(ends, default=-1)


def _positive_ints(text: str, what: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split())
    except ValueError:
        raise InputError(f"its {what} are not whole numbers ({text.strip()[:40]!r})") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"its {what} are not positive ({text.strip()[:40]!r})")
    return values


def nrrd_header(data: bytes) -> HeaderFacts:
    """Facts of a NRRD file (``data``: the whole file or at least its header). Raises
    :class:`InputError` for a header that is not NRRD or lacks what a reader needs."""
    head = bytes(data[:MAX_HEADER_BYTES])
    if head[:7] != b"NRRD000":
        raise InputError("it does not start with a NRRD header")
    end = _header_end(head)
    if end < 0:
        raise InputError("its NRRD header has no end (no blank line in the first 4 MiB)")
    text = head[:end].decode("latin-1")
    fields: Dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        key = re.sub(r"\s+", "", line.split(":", 1)[0]).lower()
        if key == "datafile":  # detached data, a list or a pattern of files: never followed
            return HeaderFacts("NRRD", (), 1, "raw", end, f"data file: {line.split(':', 1)[-1]}")
        if ":=" in line:  # key/value pairs (Segment0_Name:=...) are not fields
            continue
        if ": " not in line:
            raise InputError(f"its NRRD header has a malformed line ({line[:40]!r})")
        name, value = line.split(": ", 1)
        fields[re.sub(r"\s+", " ", name.strip()).lower()] = value.strip()
    for need in ("type", "dimension", "sizes", "encoding"):
        if need not in fields:
            raise InputError(f"its NRRD header has no '{need}' field")
    size = _NRRD_TYPES.get(re.sub(r"\s+", " ", fields["type"]).lower())
    if size is None:
        raise InputError(f"its NRRD voxel type {fields['type']!r} is not supported")
    encoding = _NRRD_ENCODINGS.get(fields["encoding"].lower())
    if encoding is None:
        raise InputError(f"its NRRD encoding {fields['encoding']!r} is not supported")
    shape = _positive_ints(fields["sizes"], "NRRD sizes")
    if str(len(shape)) != fields["dimension"].strip():
        raise InputError("its NRRD 'sizes' do not match its 'dimension'")
    for skip in ("line skip", "byte skip"):
        if fields.get(skip, "0").strip() != "0":
            raise InputError(f"its NRRD header uses '{skip}'")
    return HeaderFacts("NRRD", shape, size, encoding, end, None, text)


def metaimage_header(data: bytes) -> HeaderFacts:
    """Facts of a MetaImage (``.mha``): ``Key = Value`` lines up to ``ElementDataFile``, which
    says where the data is (``LOCAL``: right after that line). Raises :class:`InputError`."""
    head = bytes(data[:MAX_HEADER_BYTES])
    fields: Dict[str, str] = {}
    pos = 0
    while True:
        nl = head.find(b"\n", pos)
        if nl < 0:
            raise InputError("its MetaImage header has no ElementDataFile line")
        line = head[pos:nl].decode("latin-1").strip()
        pos = nl + 1
        if not line:
            continue
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)\s*[=:]\s*(.*)$", line)
        if m is None:
            raise InputError(f"its MetaImage header has a malformed line ({line[:40]!r})")
        key, value = m.group(1).lower(), m.group(2).strip()
        fields[key] = value
        if key == "elementdatafile":
            break
    text = head[:pos].decode("latin-1")
    where = fields["elementdatafile"]
    if where.upper() != "LOCAL":
        return HeaderFacts("MetaImage", (), 1, "raw", pos, f"ElementDataFile = {where}", text)
    for need in ("ndims", "dimsize", "elementtype"):
        if need not in fields:
            raise InputError(f"its MetaImage header has no {need} line")
    shape = _positive_ints(fields["dimsize"], "MetaImage DimSize")
    if str(len(shape)) != fields["ndims"].strip():
        raise InputError("its MetaImage DimSize does not match NDims")
    size = _META_TYPES.get(fields["elementtype"].upper().replace("_ARRAY", ""))
    if size is None:
        raise InputError(f"its MetaImage ElementType {fields['elementtype']!r} is not supported")
    channels = _positive_ints(fields.get("elementnumberofchannels", "1"), "channels")[0]
    if fields.get("headersize", "0").strip() != "0":
        raise InputError("its MetaImage header uses HeaderSize")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    binary = fields.get("binarydata", "true").lower() == "true"
    encoding = "zlib" if compressed else ("raw" if binary else "text")
    return HeaderFacts("MetaImage", shape, size * channels, encoding, pos, None, text)


def _nifti_fields(head: bytes):
    """(version, endian, dims, bitpix, offset, magic) of a NIfTI-1/2 or Analyze header, or
    None when ``head`` is not one."""
    if len(head) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:  # NIfTI-1 / Analyze 7.5
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            return 1, dims, bitpix, offset, bytes(head[344:348])
        if size == 540 and len(head) >= 540:  # NIfTI-2
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            return 2, dims, bitpix, offset, bytes(head[4:8])
    return None


def nifti_header(head: bytes) -> Optional[HeaderFacts]:
    """Facts of a NIfTI-1/2 (or Analyze 7.5) header (``head``: its first 540 bytes, decompressed
    for a ``.nii.gz``), or None if it is not one. A single file has the magic ``n+1`` / ``n+2``;
    anything else (``ni1``, ``ni2``, Analyze) keeps its voxels in a separate ``.img``."""
    parsed = _nifti_fields(head)
    if parsed is None:
        return None
    version, dims, bitpix, offset, magic = parsed
    n = int(dims[0])
    if not 1 <= n <= 7 or bitpix <= 0 or bitpix % 8 or any(int(d) < 1 for d in dims[1 : n + 1]):
        return None
    single = magic[:3] == (b"n+1" if version == 1 else b"n+2")
    external = None if single else f"a .hdr/.img pair (magic {magic[:3]!r})"
    shape = tuple(int(d) for d in dims[1 : n + 1])
    return HeaderFacts("NIfTI", shape, int(bitpix) // 8, "raw", max(offset, 0), external)


def nifti_expected_bytes(header: bytes) -> Optional[Tuple[int, int]]:
    """(bytes a NIfTI-1/2 or Analyze file must hold, voxel offset), or None if ``header`` is not
    such a header."""
    parsed = _nifti_fields(header)
    if parsed is None:
        return None
    _, dims, bitpix, offset, _ = parsed
    n = int(dims[0])
    if not 1 <= n <= 7 or bitpix <= 0 or any(int(d) < 1 for d in dims[1 : n + 1]):
        return None
    voxels = 1
    for d in dims[1 : n + 1]:
        voxels *= int(d)
    return max(offset, 0) + voxels * int(bitpix) // 8, max(offset, 0)
