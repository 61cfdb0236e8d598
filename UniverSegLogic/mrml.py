"""MRML bridge: propagate segments of a Slicer segmentation node with UniverSeg (no Qt).

Works with Slicer itself and with the Qt-free ``slicer-core`` package.

Reading
    The volume is read as a KJI array with its *world* IJK-to-RAS matrix (a linear parent transform
    is applied, so "axial" means axial in the views). Each segment is resampled onto the volume's
    voxel grid by Slicer (``GenerateMergedLabelmapInReferenceGeometry`` with the volume as
    reference geometry), which also accounts for parent transforms of both nodes.

Writing
    Nothing is written until every prediction has been computed. The change is expressed on the
    volume grid as a code per voxel (0 keep, 1 background, 2 foreground), resampled with nearest
    neighbour onto the segmentation's own labelmap grid and merged there with the segment's current
    labelmap, so voxels outside the changed slices -- the user's labeled slices in particular -- keep
    their stored values bit for bit, whatever the segmentation's geometry. Other segments are never
    written (Slicer moves them to another layer if a prediction overlaps them).

    ``fill`` mode changes only the slices the user did not label in the same segment. ``new`` mode
    writes ``"<name> (UniverSeg)"`` (source colour, user labels + prediction) for review; running
    again replaces that segment. One call of ``undo`` (e.g. the Segment Editor's
    ``saveStateForUndo``) precedes the write, so the whole run is one undo step. A failure while
    writing restores the segments written so far.

Annotation loop
    Segment tags remember which slices the user labeled and a fingerprint of every predicted slice
    (``UniverSeg.Labeled``, ``UniverSeg.Predicted``; saved with the scene and in ``.seg.nrrd``).
    On the next run a predicted slice whose content changed (the user corrected it) counts as
    labeled, untouched predicted slices never become support, and labeled slices stay labeled
    (a labeled slice the user erases completely is unlabeled again, unless it was marked as an
    empty labeled slice with :func:`mark_slice_labeled`).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .geometry import AXIS_NAMES, GeometryError, Volume, resolve_axis

TAG_LABELED = "UniverSeg.Labeled"
TAG_PREDICTED = "UniverSeg.Predicted"
TAG_SOURCE = "UniverSeg.Source"
OUTPUT_SUFFIX = " (UniverSeg)"
MODES = ("fill", "new")
_RECORD_VERSION = "v1"
_HASH_CHARS = 16

KEEP, BACKGROUND, FOREGROUND = 0, 1, 2


class MRMLError(ValueError):
    """Nodes or segments the bridge cannot use (nothing was changed)."""


# --------------------------------------------------------------------------------------------
# small VTK helpers


def _slicer():
    import slicer

    return slicer


def _vtk():
    import vtk

    return vtk


def _np_from_vtk_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _vtk_matrix(a: np.ndarray):
    m = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _scalars(image) -> Optional[np.ndarray]:
    """KJI(+components) view of an image's scalars, or None when it holds none."""
    from vtk.util import numpy_support

    if image is None or image.GetPointData() is None:
        return None
    arr = image.GetPointData().GetScalars()
    if arr is None or arr.GetNumberOfTuples() == 0:
        return None
    dims = image.GetDimensions()
    shape = tuple(dims[::-1])
    comps = arr.GetNumberOfComponents()
    if comps > 1:
        shape = shape + (comps,)
    return numpy_support.vtk_to_numpy(arr).reshape(shape)


def _extent_empty(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _oriented_image(array_kji: np.ndarray, extent, image_to_node: np.ndarray):
    """A uint8 vtkOrientedImageData holding ``array_kji`` over ``extent`` (I0,I1,J0,J1,K0,K1)."""
    slicer, vtk = _slicer(), _vtk()
    img = slicer.vtkOrientedImageData()
    img.SetExtent(*[int(e) for e in extent])
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    _scalars(img)[...] = array_kji.astype(np.uint8, copy=False)
    img.SetImageToWorldMatrix(_vtk_matrix(image_to_node))
    return img


def _geometry_image(extent, image_to_node: np.ndarray):
    """An unallocated vtkOrientedImageData describing a grid (reference for resampling)."""
    img = _slicer().vtkOrientedImageData()
    img.SetExtent(*[int(e) for e in extent])
    img.SetImageToWorldMatrix(_vtk_matrix(image_to_node))
    return img


# --------------------------------------------------------------------------------------------
# nodes and geometry


def _node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def _check_volume_node(volumeNode) -> None:
    if volumeNode is None:
        raise MRMLError("no input volume selected")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise MRMLError(f"{_node_name(volumeNode)} is a {volumeNode.GetClassName()}, "
                        "not a scalar volume")
    if volumeNode.GetImageData() is None or _scalars(volumeNode.GetImageData()) is None:
        raise MRMLError(f"volume {_node_name(volumeNode)} holds no image data")


def _check_segmentation_node(segmentationNode) -> None:
    slicer = _slicer()
    if segmentationNode is None:
        raise MRMLError("no segmentation selected")
    if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise MRMLError(f"{_node_name(segmentationNode)} is a {segmentationNode.GetClassName()}, "
                        "not a segmentation")
    seg = segmentationNode.GetSegmentation()
    getter = getattr(seg, "GetSourceRepresentationName", None) or seg.GetMasterRepresentationName
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if seg.GetNumberOfSegments() and getter() != binary:
        raise MRMLError(f"segmentation {_node_name(segmentationNode)} stores {getter()}: make "
                        "binary labelmap its source representation (e.g. open it in Segment "
                        "Editor) first")


def _parent_to_world(node) -> np.ndarray:
    """4x4 matrix of the node's parent transform(s); refuses non-linear transforms."""
    t = node.GetParentTransformNode()
    if t is None:
        return np.eye(4)
    if not t.IsTransformToWorldLinear():
        raise MRMLError(f"{_node_name(node)} is under the non-linear transform {_node_name(t)}: "
                        "harden the transform first (Transforms module)")
    m = _vtk().vtkMatrix4x4()
    t.GetMatrixTransformToWorld(m)
    return _np_from_vtk_matrix(m)


def _local_ijk_to_ras(volumeNode) -> np.ndarray:
    m = _vtk().vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return _np_from_vtk_matrix(m)


def volume_from_node(volumeNode) -> Volume:
    """The volume as a :class:`Volume` (KJI copy, world IJK-to-RAS); RGB becomes grayscale."""
    _check_volume_node(volumeNode)
    array = np.array(_scalars(volumeNode.GetImageData()), copy=True)
    if array.ndim == 4:
        if array.shape[-1] in (3, 4):
            array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            raise MRMLError(f"volume {_node_name(volumeNode)} has {array.shape[-1]} components "
                            "per voxel: expected a scalar or RGB volume")
    return Volume(array, _geometry_of(volumeNode).ijk_to_ras)


def _geometry_of(volumeNode) -> Volume:
    """World geometry of a volume without copying its voxels (a zero-stride stand-in array)."""
    _check_volume_node(volumeNode)
    shape = tuple(volumeNode.GetImageData().GetDimensions()[::-1])
    world = _parent_to_world(volumeNode) @ _local_ijk_to_ras(volumeNode)
    if np.linalg.det(world[:3, :3]) == 0:
        raise MRMLError(f"volume {_node_name(volumeNode)} has a singular IJK-to-RAS matrix")
    return Volume(np.broadcast_to(np.zeros((), np.uint8), shape), world)


def _resolve_axis(volume: Volume, axis) -> int:
    try:
        return resolve_axis(volume, axis)
    except GeometryError as exc:
        raise MRMLError(str(exc)) from None


def array_axis(volumeNode, axis) -> int:
    """Array axis (0 K, 1 J, 2 I) of ``axis`` (a name resolved in world space, or 0/1/2)."""
    return _resolve_axis(_geometry_of(volumeNode), axis)


def axis_name(volume: Volume, axis: int) -> str:
    """Anatomical name (axial/coronal/sagittal) of array axis ``axis`` in world space."""
    d = volume.direction[:, ::-1]  # columns in array-axis order
    ras = int(np.argmax(np.abs(d[:, axis])))
    return {v: k for k, v in AXIS_NAMES.items()}[ras]


def axis_for_slice_normal(volumeNode, normal_ras: Sequence[float]) -> int:
    """Array axis of ``volumeNode`` most nearly perpendicular to a slice view (its normal in RAS).

    Used to default the slicing axis to the orientation of the view the user paints in
    (the normal is the third column of the slice node's SliceToRAS matrix).
    """
    volume = _geometry_of(volumeNode)
    n = np.asarray(normal_ras, dtype=np.float64)[:3]
    if not np.linalg.norm(n):
        raise MRMLError("slice normal is zero")
    d = volume.direction[:, ::-1]
    return int(np.argmax(np.abs(d.T @ (n / np.linalg.norm(n)))))


def slice_index_at(volumeNode, axis, point_ras: Sequence[float]) -> int:
    """Index along ``axis`` of the volume slice through the world point ``point_ras``.

    Raises :class:`MRMLError` when the point lies outside the volume along that axis.
    """
    volume = _geometry_of(volumeNode)
    a = _resolve_axis(volume, axis)
    p = np.append(np.asarray(point_ras, dtype=np.float64)[:3], 1.0)
    ijk = np.linalg.solve(volume.ijk_to_ras, p)[:3]
    index = int(np.floor(ijk[2 - a] + 0.5))
    n = volume.array.shape[a]
    if not 0 <= index < n:
        raise MRMLError(f"the position is outside the volume along the {axis_name(volume, a)} "
                        f"axis (slice {index} of 0..{n - 1})")
    return index


def _grid_key(volumeNode, segmentationNode) -> str:
    """Fingerprint of the slice grid a record refers to: the volume's shape and IJK-to-RAS, and
    where the segmentation sits relative to it (a common parent transform changes nothing)."""
    dims = volumeNode.GetImageData().GetDimensions()
    grid = _vol_to_seg(volumeNode, segmentationNode) @ _local_ijk_to_ras(volumeNode)
    text = ",".join(str(int(d)) for d in dims) + ";" + ",".join(
        f"{v:.4f}" for v in grid[:3].ravel())
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# segments


def _segment(segmentationNode, segmentId):
    seg = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if seg is None:
        raise MRMLError(f"segmentation {_node_name(segmentationNode)} has no segment "
                        f"{segmentId!r}")
    return seg


def _resolve_segment_id(segmentationNode, key: str) -> str:
    seg = segmentationNode.GetSegmentation()
    if seg.GetSegment(key) is not None:
        return key
    sid = seg.GetSegmentIdBySegmentName(key)
    if sid:
        return sid
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    raise MRMLError(f"segmentation {_node_name(segmentationNode)} has no segment {key!r} "
                    f"(segments: {', '.join(names) or 'none'})")


def segment_mask(volumeNode, segmentationNode, segmentId) -> np.ndarray:
    """Boolean KJI mask of one segment on the volume's voxel grid (resampled by Slicer)."""
    slicer, vtk = _slicer(), _vtk()
    _segment(segmentationNode, segmentId)
    shape = tuple(volumeNode.GetImageData().GetDimensions()[::-1])
    internal = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if internal is None or _extent_empty(internal.GetExtent()):
        return np.zeros(shape, dtype=bool)
    label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    stored_values = _scalars(internal)
    if stored_values is None or not (stored_values == label).any():
        return np.zeros(shape, dtype=bool)  # (Slicer would log an error resampling nothing)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    out = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentationNode, volumeNode, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, out)
    values = _scalars(out)
    if values is None:
        return np.zeros(shape, dtype=bool)
    ext = out.GetExtent()
    if values.shape == shape and ext[0] == ext[2] == ext[4] == 0:
        return values > 0
    # place whatever extent Slicer returned onto the volume extent
    full = np.zeros(shape, dtype=bool)
    lo = np.array([ext[4], ext[2], ext[0]])
    src = tuple(slice(max(0, -l), min(s, n - l)) for l, s, n in zip(lo, values.shape, shape))
    dst = tuple(slice(s.start + l, s.stop + l) for s, l in zip(src, lo))
    if all(s.stop > s.start for s in src):
        full[dst] = values[src] > 0
    return full


def _nonempty_slices(mask: np.ndarray, axis: int) -> List[int]:
    n = mask.shape[axis]
    return [int(i) for i in np.flatnonzero(np.moveaxis(mask, axis, 0).reshape(n, -1).any(axis=1))]


def _slice_hash(mask: np.ndarray, axis: int, index: int) -> str:
    plane = np.ascontiguousarray(np.take(mask, index, axis=axis), dtype=bool)
    return hashlib.sha1(np.packbits(plane).tobytes()).hexdigest()[:_HASH_CHARS]


# --------------------------------------------------------------------------------------------
# records kept in segment tags (values avoid '|' and ':', which Slicer's tag format reserves)


@dataclass
class _Record:
    axis: int
    grid: str
    labeled: List[int] = field(default_factory=list)
    empty: List[int] = field(default_factory=list)          # labeled slices marked empty
    predicted: Dict[int, str] = field(default_factory=dict)  # slice -> fingerprint


def _get_tag(segment, name: str) -> Optional[str]:
    ref = _vtk().reference("")
    if segment.GetTag(name, ref):
        return str(ref)
    return None


def _parse_fields(text: Optional[str]) -> Optional[Dict[str, str]]:
    if not text:
        return None
    parts = text.split(";")
    if parts[0] != _RECORD_VERSION:
        return None
    out = {}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            out[k] = v
    return out


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x != ""]


def _read_record(segment) -> Optional[_Record]:
    """The segment's record, or None when absent or unreadable (then painted slices count)."""
    lab = _parse_fields(_get_tag(segment, TAG_LABELED))
    pred = _parse_fields(_get_tag(segment, TAG_PREDICTED))
    if lab is None and pred is None:
        return None
    try:
        head = lab if lab is not None else pred
        rec = _Record(int(head["axis"]), head["grid"])
        if lab is not None:
            rec.labeled = _ints(lab.get("slices", ""))
            rec.empty = _ints(lab.get("empty", ""))
        if pred is not None:
            if (int(pred["axis"]), pred["grid"]) != (rec.axis, rec.grid):
                return None
            for item in pred.get("slices", "").split(","):
                if item:
                    idx, h = item.split(".", 1)
                    rec.predicted[int(idx)] = h
        return rec
    except (KeyError, ValueError):
        return None


def _record_tags(rec: _Record) -> Dict[str, Optional[str]]:
    head = f"{_RECORD_VERSION};axis={rec.axis};grid={rec.grid}"
    labeled = f"{head};slices={','.join(map(str, sorted(rec.labeled)))}"
    if rec.empty:
        labeled += f";empty={','.join(map(str, sorted(rec.empty)))}"
    predicted = None
    if rec.predicted:
        predicted = f"{head};slices=" + ",".join(f"{i}.{h}" for i, h in sorted(rec.predicted.items()))
    return {TAG_LABELED: labeled, TAG_PREDICTED: predicted}


def _set_tags(segment, tags: Dict[str, Optional[str]]) -> None:
    for k, v in tags.items():
        if v is None:
            segment.RemoveTag(k)
        else:
            segment.SetTag(k, v)


def _tags_of(segment, names: Iterable[str]) -> Dict[str, Optional[str]]:
    return {n: _get_tag(segment, n) for n in names}


# --------------------------------------------------------------------------------------------
# slice status (what the next run would use)


@dataclass
class SliceStatus:
    """Which slices of a segment the next run uses as support, along one axis."""

    segment_id: str
    name: str
    axis: int                    # array axis of the volume
    axis_name: str               # axial / coronal / sagittal (world)
    n_slices: int
    labeled: List[int]           # support for the next run (includes `edited`)
    predicted: List[int]         # untouched predicted slices (predicted again next run)
    edited: List[int]            # predicted slices the user changed: now labeled
    empty_labeled: List[int]     # labeled slices without foreground (structure absent there)
    note: str = ""               # why the stored record was ignored, if it was
    conflict: bool = False       # untouched predictions along another axis (see `note`)

    def summary(self) -> str:
        """One line for the module panel, e.g. ``axial: 3 labeled (4, 10-12), 9 predicted``."""
        text = f"{self.axis_name}: {len(self.labeled)} labeled"
        if self.labeled:
            text += f" ({format_slices(self.labeled)})"
        if self.empty_labeled:
            text += f", {len(self.empty_labeled)} empty"
        if self.edited:
            text += f", {len(self.edited)} corrected"
        if self.predicted:
            text += f", {len(self.predicted)} predicted"
        if self.note:
            text += f" [{self.note}]"
        return text


def format_slices(indices: Sequence[int]) -> str:
    """Compact slice list: ``[1, 2, 3, 7]`` -> ``1-3, 7``."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


def _status(segment_id: str, segment, mask: np.ndarray, axis: int, axis_label: str, grid: str,
            strict: bool) -> Tuple[SliceStatus, Optional[_Record]]:
    n = mask.shape[axis]
    nonempty = set(_nonempty_slices(mask, axis))
    rec = _read_record(segment)
    note, conflict = "", False
    if rec is not None and rec.grid != grid:
        note, rec = "record made on another volume grid: ignored", None
    if rec is not None and rec.axis != axis:
        if any(_slice_hash(mask, rec.axis, t) == h for t, h in rec.predicted.items()
               if t < mask.shape[rec.axis]):
            conflict = True
            note = (f"holds a prediction along array axis {rec.axis}: propagate along that "
                    "axis, or clear the prediction first")
            if strict:
                raise MRMLError(f"segment {segment.GetName()!r} {note}")
        else:
            note = "record for another axis: ignored"
        rec = None
    if rec is None:
        status = SliceStatus(segment_id, segment.GetName(), axis, axis_label, n, sorted(nonempty),
                             [], [], [], note, conflict)
        return status, None
    predicted, edited = [], []
    for t, h in sorted(rec.predicted.items()):
        if t >= n:
            continue
        (predicted if _slice_hash(mask, axis, t) == h else edited).append(t)
    keep = {t for t in rec.labeled if t < n and (t in nonempty or t in set(rec.empty))}
    labeled = keep | set(edited) | (nonempty - set(rec.predicted))
    empty = sorted(t for t in labeled if t not in nonempty)
    status = SliceStatus(segment_id, segment.GetName(), axis, axis_label, n, sorted(labeled),
                         predicted, edited, empty, note)
    return status, rec


def slice_status(volumeNode, segmentationNode, segmentId, axis="axial") -> SliceStatus:
    """Labeled / predicted / corrected slices of a segment along ``axis`` (for live summaries).

    Never raises because of the stored record (a conflicting record is reported in ``note``).
    """
    _check_segmentation_node(segmentationNode)
    volume = _geometry_of(volumeNode)
    a = _resolve_axis(volume, axis)
    sid = _resolve_segment_id(segmentationNode, segmentId)
    mask = segment_mask(volumeNode, segmentationNode, sid)
    status, _ = _status(sid, _segment(segmentationNode, sid), mask, a, axis_name(volume, a),
                        _grid_key(volumeNode, segmentationNode), strict=False)
    return status


def labeled_slices(volumeNode, segmentationNode, segmentId, axis="axial") -> List[int]:
    """Slice indices along ``axis`` that the next run will use as the segment's support."""
    return slice_status(volumeNode, segmentationNode, segmentId, axis).labeled


# --------------------------------------------------------------------------------------------
# writing


@dataclass
class _Write:
    """One segment to write: code map on the volume grid plus tags."""

    segment_id: Optional[str]        # None: create a new segment
    code: np.ndarray                 # uint8 KJI on the volume grid (KEEP/BACKGROUND/FOREGROUND)
    replace_all: bool                # ignore the segment's current content (review output)
    tags: Dict[str, Optional[str]]
    record: Optional[_Record]        # predicted fingerprints are filled in after writing
    new_name: str = ""
    new_color: Tuple[float, float, float] = (1.0, 1.0, 0.0)
    geometry_from: Optional[str] = None  # segment whose labelmap grid a new segment uses


def _segmentation_grid(segmentationNode, segment_ids: Sequence[Optional[str]], volumeNode,
                       vol_to_seg: np.ndarray) -> np.ndarray:
    """Image-to-node matrix of the segmentation's labelmap grid."""
    slicer = _slicer()
    for sid in segment_ids:
        if sid is None:
            continue
        lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(sid)
        if lm is not None and not _extent_empty(lm.GetExtent()):
            m = _vtk().vtkMatrix4x4()
            lm.GetImageToWorldMatrix(m)
            return _np_from_vtk_matrix(m)
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentationNode.GetSegmentation().GetConversionParameter(name)
    if text:
        img = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, img, False)
        m = _vtk().vtkMatrix4x4()
        img.GetImageToWorldMatrix(m)
        a = _np_from_vtk_matrix(m)
        if abs(np.linalg.det(a[:3, :3])) > 1e-12:
            return a
    return vol_to_seg @ _local_ijk_to_ras(volumeNode)


def _vol_to_seg(volumeNode, segmentationNode) -> np.ndarray:
    """Volume RAS (local) -> segmentation node coordinates; refuses shear."""
    m = np.linalg.inv(_parent_to_world(segmentationNode)) @ _parent_to_world(volumeNode)
    if _slicer().vtkOrientedImageDataResample.DoesTransformMatrixContainShear(_vtk_matrix(m)):
        raise MRMLError(f"the transform between {_node_name(volumeNode)} and "
                        f"{_node_name(segmentationNode)} contains shear: harden it first")
    return m


def _footprint_extent(vol_ijk_to_seg: np.ndarray, seg_grid: np.ndarray, dims_ijk) -> List[int]:
    """Extent of the segmentation grid covering the volume (one voxel margin)."""
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, dims_ijk[0] - 0.5)
                        for j in (-0.5, dims_ijk[1] - 0.5) for k in (-0.5, dims_ijk[2] - 0.5)])
    idx = (np.linalg.inv(seg_grid) @ vol_ijk_to_seg @ corners.T)[:3]
    lo = np.floor(idx.min(axis=1)).astype(int) - 1
    hi = np.ceil(idx.max(axis=1)).astype(int) + 1
    return [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]


def _union_extent(a, b) -> List[int]:
    if _extent_empty(a):
        return list(b)
    return [min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]),
            min(a[4], b[4]), max(a[5], b[5])]


def _segment_values(segmentationNode, segmentId, extent) -> np.ndarray:
    """The segment's stored voxels (0/1) on its own grid, placed into ``extent``."""
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    out = np.zeros(shape, dtype=np.uint8)
    lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if lm is None or _extent_empty(lm.GetExtent()):
        return out
    values = _scalars(lm)
    label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    e = lm.GetExtent()
    off = (e[4] - extent[4], e[2] - extent[2], e[0] - extent[0])
    dst = tuple(slice(o, o + n) for o, n in zip(off, values.shape))
    out[dst] = values == label
    return out


def _write_segment(segmentationNode, volumeNode, w: _Write, segment_id: str,
                   vol_to_seg: np.ndarray, seg_grid: np.ndarray) -> None:
    slicer = _slicer()
    dims = volumeNode.GetImageData().GetDimensions()
    vol_ijk_to_seg = vol_to_seg @ _local_ijk_to_ras(volumeNode)
    lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(segment_id)
    current = lm.GetExtent() if lm is not None else (0, -1, 0, -1, 0, -1)
    extent = _footprint_extent(vol_ijk_to_seg, seg_grid, dims)
    if not w.replace_all:
        extent = _union_extent(current, extent)
    code_img = _oriented_image(w.code, (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1),
                               vol_ijk_to_seg)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            code_img, _geometry_image(extent, seg_grid), resampled, False, False):
        raise MRMLError("resampling the result onto the segmentation grid failed")
    code = _scalars(resampled)
    if w.replace_all:
        values = (code == FOREGROUND).astype(np.uint8)
    else:
        values = np.where(code == KEEP, _segment_values(segmentationNode, segment_id, extent),
                          code == FOREGROUND).astype(np.uint8)
    image = _oriented_image(values, extent, seg_grid)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segment_id,
                                            logic.MODE_REPLACE):
        raise MRMLError(f"Slicer refused to update segment {segment_id!r}")


def _snapshot(segmentationNode, segment_id: str):
    """Copy of a segment's own voxels (0/1, segmentation grid) and its tags, for rollback."""
    lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(segment_id)
    tags = _tags_of(_segment(segmentationNode, segment_id), (TAG_LABELED, TAG_PREDICTED,
                                                              TAG_SOURCE))
    if lm is None or _extent_empty(lm.GetExtent()):
        return None, tags
    m = _vtk().vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    ext = lm.GetExtent()
    return _oriented_image(_segment_values(segmentationNode, segment_id, ext), ext,
                           _np_from_vtk_matrix(m)), tags


def _restore(segmentationNode, segment_id: str, snapshot) -> None:
    slicer = _slicer()
    image, tags = snapshot
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if image is None:
        logic.ClearSegment(segmentationNode, segment_id)
    else:
        logic.SetBinaryLabelmapToSegment(image, segmentationNode, segment_id, logic.MODE_REPLACE)
    _set_tags(_segment(segmentationNode, segment_id), tags)


def _call_undo(undo) -> None:
    if undo is None:
        return
    if hasattr(undo, "SaveState"):  # a vtkSegmentationHistory
        undo.SaveState()
    else:
        undo()


def _apply_writes(volumeNode, segmentationNode, writes: List[_Write], undo=None) -> List[str]:
    """Write all segments (one undo step); on failure restore what was written. Returns ids."""
    vol_to_seg = _vol_to_seg(volumeNode, segmentationNode)
    segmentation = segmentationNode.GetSegmentation()
    known = [w.segment_id or w.geometry_from for w in writes]
    grids = [_segmentation_grid(segmentationNode, [w.segment_id, w.geometry_from] + known,
                                volumeNode, vol_to_seg) for w in writes]
    _call_undo(undo)
    was_modified = segmentationNode.StartModify()
    created: List[str] = []
    snapshots: Dict[str, object] = {}
    written: List[str] = []
    try:
        for w, seg_grid in zip(writes, grids):
            sid = w.segment_id
            if sid is None:
                sid = segmentation.AddEmptySegment("", w.new_name, list(w.new_color))
                if not sid:
                    raise MRMLError(f"could not add segment {w.new_name!r}")
                created.append(sid)
            else:
                snapshots[sid] = _snapshot(segmentationNode, sid)
            _write_segment(segmentationNode, volumeNode, w, sid, vol_to_seg, seg_grid)
            written.append(sid)
        for w, sid in zip(writes, written):
            if w.record is not None:
                # fingerprints of what was actually stored, read back the way the next run reads
                mask = segment_mask(volumeNode, segmentationNode, sid)
                w.record.predicted = {t: _slice_hash(mask, w.record.axis, t)
                                      for t in w.record.predicted}
                w.tags.update(_record_tags(w.record))
            _set_tags(_segment(segmentationNode, sid), w.tags)
    except BaseException:
        for sid in created:
            segmentation.RemoveSegment(sid)
        for sid, snap in snapshots.items():
            _restore(segmentationNode, sid, snap)
        raise
    finally:
        segmentationNode.EndModify(was_modified)
    return written


# --------------------------------------------------------------------------------------------
# propagation


@dataclass
class MRMLPropagationResult:
    """What a run wrote."""

    segment_ids: List[str]                  # segments written (review segments in "new" mode)
    source_ids: List[str]                   # the segments whose labels were propagated
    mode: str
    axis: int                               # array axis of the volume
    axis_name: str
    labeled_slices: Dict[str, List[int]]    # per source segment id
    predicted_slices: Dict[str, List[int]]  # per source segment id
    device: str
    weights: str
    seconds: float


def _make_options(options: Dict[str, object]):
    from dataclasses import fields

    from .pipeline import PropagationOptions

    valid = {f.name for f in fields(PropagationOptions)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise MRMLError(f"unknown option {unknown[0]!r} (valid: {', '.join(sorted(valid))})")
    return PropagationOptions(**options)


def _source_ids(segmentationNode, segmentIds) -> List[str]:
    seg = segmentationNode.GetSegmentation()
    if segmentIds is None:
        ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
        ids = [i for i in ids if _get_tag(seg.GetSegment(i), TAG_SOURCE) is None]
    else:
        if isinstance(segmentIds, str):
            segmentIds = [segmentIds]
        ids = []
        for key in segmentIds:
            sid = _resolve_segment_id(segmentationNode, key)
            if sid not in ids:
                ids.append(sid)
    if not ids:
        raise MRMLError(f"segmentation {_node_name(segmentationNode)} has no segment to propagate")
    return ids


def _output_segment_for(segmentationNode, source_id: str) -> Optional[str]:
    seg = segmentationNode.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        if sid != source_id and _get_tag(seg.GetSegment(sid), TAG_SOURCE) == source_id:
            return sid
    return None


class PropagationJob:
    """One run, in three steps: read MRML (constructor), compute (:meth:`run`, touches no MRML
    node, so it may run in a worker thread), write (:meth:`apply`, main thread).

    Use :func:`prepare_propagation` to create one.
    """

    def __init__(self, volumeNode, segmentationNode, segmentIds=None, mode="fill",
                 supportPairs=(), engine=None, fusion=None, **options):
        from .pipeline import PropagationRequest, SegmentRequest

        if mode not in MODES:
            raise MRMLError(f"unknown output mode {mode!r}: use 'fill' or 'new'")
        opts = _make_options(options)
        _check_volume_node(volumeNode)
        _check_segmentation_node(segmentationNode)
        self.volumeNode, self.segmentationNode, self.mode = volumeNode, segmentationNode, mode
        self._scenes = (volumeNode.GetScene(), segmentationNode.GetScene())
        self.engine, self.fusion = engine, fusion
        volume = volume_from_node(volumeNode)
        _vol_to_seg(volumeNode, segmentationNode)  # refuse unusable transforms before computing
        self.axis = _resolve_axis(volume, opts.axis)
        self.axis_name = axis_name(volume, self.axis)
        opts.axis = self.axis
        self.grid = _grid_key(volumeNode, segmentationNode)
        self.source_ids = _source_ids(segmentationNode, segmentIds)
        self.masks: List[np.ndarray] = []
        self.statuses: List[SliceStatus] = []
        requests = []
        for sid in list(self.source_ids):
            segment = _segment(segmentationNode, sid)
            mask = segment_mask(volumeNode, segmentationNode, sid)
            status, _ = _status(sid, segment, mask, self.axis, self.axis_name, self.grid,
                                strict=True)
            if segmentIds is None and not status.labeled and not supportPairs:
                self.source_ids.remove(sid)  # default selection: segments the user labeled
                continue
            self.masks.append(mask)
            self.statuses.append(status)
            requests.append(SegmentRequest(segment.GetName(), mask, status.labeled or None))
        if not requests:
            raise MRMLError(f"no segment of {_node_name(segmentationNode)} has a labeled slice "
                            f"along the {self.axis_name} axis: paint at least one slice")
        supports = [self._support(pair, [r.name for r in requests]) for pair in supportPairs]
        self.request = PropagationRequest(volume, requests, opts, supports)
        self.result = None

    def _support(self, pair, names: List[str]):
        from .pipeline import SupportVolume

        try:
            vnode, snode = pair
        except (TypeError, ValueError):
            raise MRMLError("each support pair must be (volume node, segmentation node)") from None
        _check_volume_node(vnode)
        _check_segmentation_node(snode)
        if vnode is self.volumeNode and snode is self.segmentationNode:
            raise MRMLError("a support pair repeats the input volume and segmentation")
        seg = snode.GetSegmentation()
        masks: Dict[str, np.ndarray] = {}
        for i in range(seg.GetNumberOfSegments()):
            segment = seg.GetNthSegment(i)
            name = segment.GetName()
            if name in names and name not in masks and _get_tag(segment, TAG_SOURCE) is None:
                masks[name] = segment_mask(vnode, snode, seg.GetNthSegmentID(i))
        if not masks:
            raise MRMLError(f"support segmentation {_node_name(snode)} has no segment named "
                            f"{' or '.join(repr(n) for n in names)}")
        return SupportVolume(volume_from_node(vnode), masks)

    def run(self, progress: Optional[Callable[[float, str], None]] = None,
            cancel: Optional[Callable[[], bool]] = None) -> None:
        """Compute every prediction (raises ``engine.Cancelled`` when ``cancel()`` is True)."""
        from .pipeline import propagate

        self.result = propagate(self.request, progress=progress, cancel=cancel,
                                engine=self.engine, fusion=self.fusion)

    def _check_unchanged(self) -> None:
        for node, scene in zip((self.volumeNode, self.segmentationNode), self._scenes):
            if scene is not None and node.GetScene() is not scene:
                raise MRMLError(f"{_node_name(node)} was removed during the run: nothing was "
                                "written")
        for sid, mask in zip(self.source_ids, self.masks):
            if self.segmentationNode.GetSegmentation().GetSegment(sid) is None:
                raise MRMLError(f"segment {sid!r} was removed during the run: nothing was "
                                "written")
            if not np.array_equal(segment_mask(self.volumeNode, self.segmentationNode, sid), mask):
                raise MRMLError(f"segment {sid!r} was edited during the run: nothing was written "
                                "(propagate again)")

    def apply(self, undo=None) -> MRMLPropagationResult:
        """Write the results into the segmentation (one undo step)."""
        if self.result is None:
            raise MRMLError("nothing computed yet: call run() first")
        self._check_unchanged()
        writes = []
        segmentation = self.segmentationNode.GetSegmentation()
        for sid, mask, status, res in zip(self.source_ids, self.masks, self.statuses,
                                          self.result.segments):
            labeled = list(res.labeled_slices)
            rec = _Record(self.axis, self.grid, labeled,
                          [t for t in labeled if t not in set(_nonempty_slices(mask, self.axis))],
                          {t: "" for t in res.predicted_slices})
            if self.mode == "fill":
                region = sorted((set(res.predicted_slices) | set(status.predicted)) - set(labeled))
                code = np.zeros(mask.shape, dtype=np.uint8)
                take = [slice(None)] * 3
                for t in region:
                    take[self.axis] = t
                    code[tuple(take)] = np.where(res.mask[tuple(take)], FOREGROUND, BACKGROUND)
                writes.append(_Write(sid, code, False, {}, rec))
            else:
                source = segmentation.GetSegment(sid)
                code = np.where(res.mask, FOREGROUND, BACKGROUND).astype(np.uint8)
                out_id = _output_segment_for(self.segmentationNode, sid)
                writes.append(_Write(out_id, code, True, {TAG_SOURCE: sid}, rec,
                                     new_name=source.GetName() + OUTPUT_SUFFIX,
                                     new_color=tuple(source.GetColor()), geometry_from=sid))
        written = _apply_writes(self.volumeNode, self.segmentationNode, writes, undo)
        res = self.result
        return MRMLPropagationResult(
            written, list(self.source_ids), self.mode, self.axis, self.axis_name,
            {sid: list(s.labeled_slices) for sid, s in zip(self.source_ids, res.segments)},
            {sid: list(s.predicted_slices) for sid, s in zip(self.source_ids, res.segments)},
            res.device, res.weights, res.seconds)


def prepare_propagation(volumeNode, segmentationNode, segmentIds=None, mode="fill",
                        supportPairs=(), engine=None, fusion=None, **options) -> PropagationJob:
    """Read everything a run needs from MRML and check it; see :class:`PropagationJob`."""
    return PropagationJob(volumeNode, segmentationNode, segmentIds, mode, supportPairs, engine,
                          fusion, **options)


def propagate_segmentation(volumeNode, segmentationNode, segmentIds=None, mode="fill",
                           supportPairs=(), progress=None, cancel=None, engine=None, undo=None,
                           fusion=None, **options) -> MRMLPropagationResult:
    """Propagate the labeled slices of ``segmentIds`` (default: every segment that is not a
    review output) through ``volumeNode`` and write the result into ``segmentationNode``.

    ``mode``: ``"fill"`` (predict the unlabeled slices of the same segment) or ``"new"``
    (write ``"<name> (UniverSeg)"`` for review). ``supportPairs``: ``(volumeNode,
    segmentationNode)`` pairs whose segments with the same names serve as extra support.
    ``undo``: a callable (e.g. the Segment Editor widget's ``saveStateForUndo``) or a
    ``vtkSegmentationHistory``, called once right before anything is written.
    ``options``: :class:`UniverSegLogic.pipeline.PropagationOptions` fields (``axis``,
    ``support_size``, ``ensemble``, ``device``, ``weights``, ...).
    Raises :class:`MRMLError` (bad input), ``engine.Cancelled``; nothing is changed then.
    """
    t0 = time.perf_counter()
    job = prepare_propagation(volumeNode, segmentationNode, segmentIds, mode, supportPairs,
                              engine, fusion, **options)
    job.run(progress, cancel)
    result = job.apply(undo)
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# annotation-loop helpers for the panel


def mark_slice_labeled(volumeNode, segmentationNode, segmentId, axis, index: int,
                       labeled: bool = True) -> SliceStatus:
    """Mark slice ``index`` along ``axis`` as labeled with its current content (an empty slice
    then tells UniverSeg the structure is absent there), or with ``labeled=False`` unmark an
    empty labeled slice. Only the segment's record (tags) changes, never its voxels."""
    _check_segmentation_node(segmentationNode)
    volume = _geometry_of(volumeNode)
    a = _resolve_axis(volume, axis)
    sid = _resolve_segment_id(segmentationNode, segmentId)
    segment = _segment(segmentationNode, sid)
    n = volume.array.shape[a]
    if not 0 <= int(index) < n:
        raise MRMLError(f"slice {index} is outside 0..{n - 1}")
    index = int(index)
    mask = segment_mask(volumeNode, segmentationNode, sid)
    grid = _grid_key(volumeNode, segmentationNode)
    status, _ = _status(sid, segment, mask, a, axis_name(volume, a), grid, strict=True)
    nonempty = set(_nonempty_slices(mask, a))
    support = set(status.labeled)
    predicted = {t: _slice_hash(mask, a, t) for t in status.predicted}
    if labeled:
        support.add(index)
        predicted.pop(index, None)   # an accepted prediction is the user's label now
    else:
        if index in nonempty and index not in predicted:
            raise MRMLError(f"slice {index} holds painted voxels: erase them to unlabel it")
        support.discard(index)
    rec = _Record(a, grid, sorted(support), sorted(t for t in support if t not in nonempty),
                  predicted)
    _set_tags(segment, _record_tags(rec))
    return slice_status(volumeNode, segmentationNode, sid, a)


def clear_predictions(volumeNode, segmentationNode, segmentId, undo=None) -> List[int]:
    """Erase the untouched predicted slices of a segment and forget its record (corrected
    slices stay, as painted slices). Returns the slices erased. Needed before propagating
    along another axis. One undo step."""
    _check_volume_node(volumeNode)
    _check_segmentation_node(segmentationNode)
    sid = _resolve_segment_id(segmentationNode, segmentId)
    segment = _segment(segmentationNode, sid)
    rec = _read_record(segment)
    if rec is None or rec.grid != _grid_key(volumeNode, segmentationNode):
        return []
    mask = segment_mask(volumeNode, segmentationNode, sid)
    untouched = [t for t, h in sorted(rec.predicted.items())
                 if t < mask.shape[rec.axis] and _slice_hash(mask, rec.axis, t) == h]
    code = np.zeros(mask.shape, dtype=np.uint8)
    take = [slice(None)] * 3
    for t in untouched:
        take[rec.axis] = t
        code[tuple(take)] = BACKGROUND
    tags = {TAG_LABELED: None, TAG_PREDICTED: None}
    _apply_writes(volumeNode, segmentationNode, [_Write(sid, code, False, tags, None)], undo)
    return untouched
