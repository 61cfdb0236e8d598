"""What the page may upload: one self-contained image file, bounded before anything reads it.

A file sent by the page is untrusted. Before it is written to the session's folder, and before
SimpleITK, slicerio or Slicer see it, :func:`check_upload` reads its header in plain Python
(:mod:`UniverSegLogic.core.headers`) and refuses, in one line naming the file:

* a file that points at other files: a NRRD with ``data file`` (detached data, lists, patterns),
  a MetaImage whose ``ElementDataFile`` is not ``LOCAL``, a NIfTI header of a ``.hdr``/``.img``
  pair (detached headers ``.nhdr``/``.mhd``/``.hdr`` are not accepted by name either);
* a file that would expand beyond :class:`UploadLimits` (voxels, bytes), computed from the
  header alone, so a decompression bomb is refused without inflating it;
* a file whose data is shorter than its header says (raw data by length; compressed data is
  inflated in 1 MiB steps up to what the header declares, never further).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from ..core.headers import HeaderFacts, metaimage_header, nifti_header, nrrd_header
from ..errors import InputError, UsageError
from .rules import upload_name

MIB = 2**20
#: Default upload limit in MiB (``--max-upload-mb``): the file as sent.
DEFAULT_MAX_UPLOAD_MB = 512
#: Default limit on the decoded voxel data in MiB (``--max-image-mb``): a 512x512x1024 CT
#: stored as 16 bits is 512 MiB, as 32-bit floats 1024 MiB.
DEFAULT_MAX_IMAGE_MB = 1024
#: Default limit on the voxel count (``--max-voxels``): 512x512x2048.
DEFAULT_MAX_VOXELS = 512 * 512 * 2048
#: Single-file image formats the page accepts (Slicer reads them without a side file).
IMAGE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
#: Segmentation format the page accepts.
SEGMENTATION_SUFFIXES = (".seg.nrrd",)
UPLOAD_KINDS = ("image", "segmentation")
_STEP = MIB  # inflate at most this much at a time
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS  # zlib detects either wrapper


@dataclass(frozen=True)
class UploadLimits:
    """How large an upload may be: as sent (``upload_bytes``) and once decoded (``image_bytes``
    of voxel data, ``voxels``)."""

    upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MIB
    image_bytes: int = DEFAULT_MAX_IMAGE_MB * MIB
    voxels: int = DEFAULT_MAX_VOXELS

    @classmethod
    def from_options(
        cls,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
        max_voxels: int = DEFAULT_MAX_VOXELS,
    ) -> UploadLimits:
        """Limits from the command line's ``--max-upload-mb``, ``--max-image-mb`` and
        ``--max-voxels``; each must be positive (:class:`UsageError`)."""
        for option, value in (
            ("--max-upload-mb", max_upload_mb),
            ("--max-image-mb", max_image_mb),
            ("--max-voxels", max_voxels),
        ):
            if not value > 0:
                raise UsageError(f"{option} must be positive")
        return cls(int(max_upload_mb * MIB), int(max_image_mb * MIB), int(max_voxels))


def _suffix(name: str, choices: Sequence[str]) -> Optional[str]:
    low = name.lower()
    for s in sorted(choices, key=len, reverse=True):
        if low.endswith(s) and len(low) > len(s):
            return s
    return None


def _mib(n: int) -> str:
    if n >= 10 * 2**30:
        return f"{n / 2**30:.0f} GiB"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / MIB:.1f} MiB" if n < 10 * MIB else f"{n / MIB:.0f} MiB"


def _inflate_prefix(data: memoryview, n: int) -> bytes:
    """The first ``n`` decompressed bytes of a gzip/zlib stream (fewer if it is shorter)."""
    d = zlib.decompressobj(_GZIP_OR_ZLIB)
    out, pos = b"", 0
    while len(out) < n and not d.eof:
        chunk = d.unconsumed_tail
        if not chunk:
            chunk = bytes(data[pos : pos + _STEP])
            pos += _STEP
            if not chunk:
                break
        try:
            out += d.decompress(chunk, n - len(out))
        except zlib.error:
            break
    return out


def inflated_size(data: memoryview, need: int) -> int:
    """How many bytes the gzip/zlib stream ``data`` decompresses to, counted up to ``need``:
    never more than ``need`` bytes are inflated (1 MiB at a time, nothing kept), so a stream
    that expands to far more costs no more than one that is exactly right. Concatenated gzip
    members count together. Raises :class:`InputError` if the stream is damaged."""
    got, pos, pending = 0, 0, b""
    d = zlib.decompressobj(_GZIP_OR_ZLIB)
    while got < need:
        if d.unconsumed_tail:
            chunk = d.unconsumed_tail
        elif pending:
            chunk, pending = pending, b""
        elif pos < len(data):
            chunk = bytes(data[pos : pos + _STEP])
            pos += _STEP
        else:
            break
        try:
            got += len(d.decompress(chunk, min(_STEP, need - got)))
        except zlib.error as exc:
            raise InputError(f"the compressed data is damaged ({exc})") from None
        if d.eof:  # another gzip member may follow
            pending = d.unused_data
            d = zlib.decompressobj(_GZIP_OR_ZLIB)
    return got


def _facts(suffix: str, content: memoryview) -> HeaderFacts:
    """Parse the header of an upload named ``*suffix`` (InputError without the file name)."""
    if suffix in (".nrrd", ".seg.nrrd"):
        return nrrd_header(content)
    if suffix == ".mha":
        return metaimage_header(content)
    if suffix == ".nii.gz" and content[:2] != b"\x1f\x8b":
        raise InputError("it is not gzip-compressed")
    head = _inflate_prefix(content, 540) if suffix == ".nii.gz" else bytes(content[:540])
    facts = nifti_header(head)
    if facts is None:
        raise InputError("it does not start with a NIfTI header")
    return facts


def _data_bytes(suffix: str, facts: HeaderFacts, content: memoryview) -> Optional[int]:
    """Decoded bytes present for the voxels (counted up to what the header says), or None when
    the encoding (text) cannot be counted without parsing it (its size is bounded anyway)."""
    if suffix == ".nii.gz":  # the whole file is one stream: header, extensions, voxels
        return max(inflated_size(content, facts.data_offset + facts.nbytes) - facts.data_offset, 0)
    data = content[facts.data_offset :]
    if facts.encoding == "raw":
        return len(data)
    if facts.encoding in ("gzip", "zlib"):
        return inflated_size(data, facts.nbytes)
    return None


def check_upload(name, content, kind: str, limits: UploadLimits, size=None) -> str:
    """Check one uploaded file before anything is written or loaded; returns its safe name.

    ``kind`` is ``"image"`` (``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha``) or ``"segmentation"``
    (``.seg.nrrd`` written by Slicer or slicerio). The type is checked by name *and* by the
    header; the file must hold its own voxel data, within ``limits`` once decoded, and all of
    it. ``size`` is what the browser claimed (checked too, so an oversized file is refused
    before its content is looked at; ``content`` None checks only the name and that size).
    Raises :class:`InputError` with a one-line message naming the file.
    """
    if kind not in UPLOAD_KINDS:
        raise UsageError(f"unknown upload kind {kind!r}")
    name = upload_name(name)
    for n in (size, None if content is None else len(content)):
        if n is not None and int(n) > limits.upload_bytes:
            raise InputError(
                f"{name} is {_mib(int(n))}: uploads are limited to {_mib(limits.upload_bytes)} "
                "(--max-upload-mb)"
            )
    if content is None:
        return name
    if not content:
        raise InputError(f"{name} is empty")
    choices = IMAGE_SUFFIXES if kind == "image" else SEGMENTATION_SUFFIXES
    suffix = _suffix(name, choices)
    if suffix is None:
        raise InputError(f"{name} is not a supported {kind} file (use {', '.join(choices)})")
    view = memoryview(content).cast("B")
    try:
        facts = _facts(suffix, view)
    except InputError as exc:
        raise InputError(f"{name} is not a usable {suffix} file: {exc}") from None
    if facts.external:
        raise InputError(
            f"{name} refers to a separate data file ({facts.external[:80]}): "
            "upload one self-contained file"
        )
    if facts.voxels > limits.voxels or facts.nbytes > limits.image_bytes:
        shape = "x".join(map(str, facts.shape))
        raise InputError(
            f"{name} would expand to {_mib(facts.nbytes)} ({shape} voxels): images are limited "
            f"to {_mib(limits.image_bytes)} and {limits.voxels:,} voxels "
            "(--max-image-mb, --max-voxels)"
        )
    try:
        present = _data_bytes(suffix, facts, view)
    except InputError as exc:
        raise InputError(f"{name} is not a usable {suffix} file: {exc}") from None
    if present is not None and present < facts.nbytes:
        raise InputError(
            f"{name} is not a complete {suffix} file ({present:,} of {facts.nbytes:,} bytes "
            "of voxel data)"
        )
    if kind == "segmentation" and "Segment0_" not in facts.text:
        raise InputError(
            f"{name} is a NRRD image without segment fields: not a Slicer segmentation"
        )
    return name
