"""Reading images and segmentations from files, and writing ``.seg.nrrd`` results.

Images: anything SimpleITK reads (NRRD, NIfTI, MHA, ...). Segmentations: Slicer ``.seg.nrrd``
(segment names, colors and tags are kept, through slicerio) or integer label maps (one segment per
label value). All arrays are returned KJI with an IJK-to-RAS matrix (files are LPS; converted here).
Writes are atomic: a result file appears complete or not at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError  # noqa: F401
from .atomic import write_with
from .geometry import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

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
        """The segment called ``name`` (or with that ID)."""
        for s in self.segments:
            if s.name == name or s.id == name:
                return s
        raise InputError(f"no segment named {name!r} (segments: {', '.join(self.names())})")


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"expected a file, got a folder: {path}")


def ijk_to_ras_from_sitk(image) -> np.ndarray:
    """IJK-to-RAS matrix of a 3D SimpleITK image."""
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.array(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ m


def read_image(path: str) -> Volume:
    """Read a 3D scalar image (RGB images become grayscale) as a :class:`Volume`."""
    import SimpleITK as sitk

    _check_exists(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from None
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


def read_segmentation(path: str, reference: Volume) -> Segmentation:
    """Read a ``.seg.nrrd`` or an integer label map onto the grid of ``reference``."""
    _check_exists(path)
    if str(path).lower().endswith(".seg.nrrd"):
        import slicerio

        try:
            seg = slicerio.read_segmentation(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
            raise InputError(f"cannot read segmentation {path}: {exc}") from None
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

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(
            f"cannot read label map {path}: {str(exc).strip().splitlines()[-1]}"
        ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3D scalar label map")
    labels = sitk.GetArrayFromImage(image)
    if labels.dtype.kind == "f":
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise InputError(f"{path}: a label map must hold integer label values")
        labels = labels.astype(np.int64)
    values = [int(v) for v in np.unique(labels) if v != 0]
    masks = _embed(reference, ijk_to_ras_from_sitk(image), [labels == v for v in values], path)
    segments = [
        Segment(f"label_{v}", m, PALETTE[i % len(PALETTE)], f"label_{v}", {"labelValue": v})
        for i, (v, m) in enumerate(zip(values, masks))
    ]
    return Segmentation(reference, segments)


def write_segmentation(path: str, segmentation: Segmentation) -> None:
    """Write ``segmentation`` as a Slicer ``.seg.nrrd`` on its reference grid (atomic)."""
    import slicerio

    ref = segmentation.reference
    ijk_to_lps = LPS_TO_RAS @ ref.ijk_to_ras
    seg = slicerio.create_segmentation(ref.array.shape[::-1], ijk_to_lps)
    used = set()
    for s in segmentation.segments:
        fields = dict(s.fields)
        fields.pop("labelValue", None)
        sid = s.id or s.name
        while sid in used:
            sid += "_"
        used.add(sid)
        fields.update({"id": sid, "name": s.name, "color": [float(c) for c in s.color]})
        slicerio.add_segment(seg, np.asarray(s.mask, dtype=bool).transpose(2, 1, 0), fields)
    write_with(path, lambda tmp: slicerio.write_segmentation(tmp, seg))
