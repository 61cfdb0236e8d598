"""Writing results into a segmentation: resampling onto its own grid, one undo step, rollback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MRMLError
from .gridmap import (  # noqa: F401 - the codes are part of this module's interface (job.py)
    BACKGROUND,
    FOREGROUND,
    KEEP,
    GridMap,
    write_onto_segment,
)
from .nodes import local_ijk_to_ras, segment_mask, segment_of, volume_to_segmentation
from .record import (
    TAG_LABELED,
    TAG_PREDICTED,
    TAG_SOURCE,
    Record,
    record_tags,
    set_tags,
    slice_hash,
    tags_of,
)
from .vtkglue import (
    extent_empty,
    image_scalars,
    np_from_vtk_matrix,
    oriented_image,
    slicer_module,
    vtk_module,
)


@dataclass
class SegmentWrite:
    """One segment to write: code map on the volume grid plus tags."""

    segment_id: Optional[str]  # None: create a new segment
    code: np.ndarray  # uint8 KJI on the volume grid (KEEP/BACKGROUND/FOREGROUND)
    replace_all: bool  # ignore the segment's current content (review output)
    tags: Dict[str, Optional[str]]
    record: Optional[Record]  # predicted fingerprints are filled in after writing
    new_name: str = ""
    new_color: Tuple[float, float, float] = (1.0, 1.0, 0.0)
    geometry_from: Optional[str] = None  # segment whose labelmap grid a new segment uses


def segmentation_grid(
    segmentationNode, segment_ids: Sequence[Optional[str]], volumeNode, vol_to_seg: np.ndarray
) -> np.ndarray:
    """Image-to-node matrix of the segmentation's labelmap grid."""
    slicer = slicer_module()
    for sid in segment_ids:
        if sid is None:
            continue
        lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(sid)
        if lm is not None and not extent_empty(lm.GetExtent()):
            m = vtk_module().vtkMatrix4x4()
            lm.GetImageToWorldMatrix(m)
            return np_from_vtk_matrix(m)
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentationNode.GetSegmentation().GetConversionParameter(name)
    if text:
        img = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, img, False)
        m = vtk_module().vtkMatrix4x4()
        img.GetImageToWorldMatrix(m)
        a = np_from_vtk_matrix(m)
        if abs(np.linalg.det(a[:3, :3])) > 1e-12:
            return a
    return vol_to_seg @ local_ijk_to_ras(volumeNode)


def footprint_extent(vol_ijk_to_seg: np.ndarray, seg_grid: np.ndarray, dims_ijk) -> List[int]:
    """Extent of the segmentation grid covering the volume (one voxel margin)."""
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (-0.5, dims_ijk[0] - 0.5)
            for j in (-0.5, dims_ijk[1] - 0.5)
            for k in (-0.5, dims_ijk[2] - 0.5)
        ]
    )
    idx = (np.linalg.inv(seg_grid) @ vol_ijk_to_seg @ corners.T)[:3]
    lo = np.floor(idx.min(axis=1)).astype(int) - 1
    hi = np.ceil(idx.max(axis=1)).astype(int) + 1
    return [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]


def union_extent(a, b) -> List[int]:
    """The smallest extent holding the extents ``a`` and ``b`` (``a`` may be empty)."""
    if extent_empty(a):
        return list(b)
    return [
        min(a[0], b[0]),
        max(a[1], b[1]),
        min(a[2], b[2]),
        max(a[3], b[3]),
        min(a[4], b[4]),
        max(a[5], b[5]),
    ]


def segment_values(segmentationNode, segmentId, extent) -> np.ndarray:
    """The segment's stored voxels (0/1) on its own grid, placed into ``extent``."""
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    out = np.zeros(shape, dtype=np.uint8)
    lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if lm is None or extent_empty(lm.GetExtent()):
        return out
    values = image_scalars(lm)
    label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    e = lm.GetExtent()
    off = (e[4] - extent[4], e[2] - extent[2], e[0] - extent[0])
    dst = tuple(slice(o, o + n) for o, n in zip(off, values.shape))
    out[dst] = values == label
    return out


def write_segment(
    segmentationNode,
    volumeNode,
    w: SegmentWrite,
    segment_id: str,
    vol_to_seg: np.ndarray,
    seg_grid: np.ndarray,
) -> None:
    """Store one :class:`SegmentWrite` into segment ``segment_id`` on the grid ``seg_grid``
    (the bridge's one cell rule, see :mod:`.gridmap`)."""
    slicer = slicer_module()
    dims = volumeNode.GetImageData().GetDimensions()
    vol_ijk_to_seg = vol_to_seg @ local_ijk_to_ras(volumeNode)
    lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(segment_id)
    current = lm.GetExtent() if lm is not None else (0, -1, 0, -1, 0, -1)
    extent = footprint_extent(vol_ijk_to_seg, seg_grid, dims)
    if not w.replace_all:
        extent = union_extent(current, extent)
    # one rule with the reader (gridmap): a voxel takes the code of the volume cell its centre
    # lies in; KEEP cells, and voxels that a KEEP cell reads, keep their stored values
    grid = GridMap(np.linalg.solve(vol_ijk_to_seg, seg_grid))
    current = None if w.replace_all else segment_values(segmentationNode, segment_id, extent)
    values = write_onto_segment(w.code, grid, extent, current)
    image = oriented_image(values, extent, seg_grid)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(
        image, segmentationNode, segment_id, logic.MODE_REPLACE
    ):
        raise MRMLError(f"Slicer refused to update segment {segment_id!r}")


def snapshot_segment(segmentationNode, segment_id: str):
    """Copy of a segment's own voxels (0/1, segmentation grid) and its tags, for rollback."""
    lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(segment_id)
    tags = tags_of(
        segment_of(segmentationNode, segment_id), (TAG_LABELED, TAG_PREDICTED, TAG_SOURCE)
    )
    if lm is None or extent_empty(lm.GetExtent()):
        return None, tags
    m = vtk_module().vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    ext = lm.GetExtent()
    return oriented_image(
        segment_values(segmentationNode, segment_id, ext), ext, np_from_vtk_matrix(m)
    ), tags


def restore_segment(segmentationNode, segment_id: str, snapshot) -> None:
    """Put back a segment's voxels and tags from :func:`snapshot_segment` (rollback)."""
    slicer = slicer_module()
    image, tags = snapshot
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if image is None:
        logic.ClearSegment(segmentationNode, segment_id)
    else:
        logic.SetBinaryLabelmapToSegment(image, segmentationNode, segment_id, logic.MODE_REPLACE)
    set_tags(segment_of(segmentationNode, segment_id), tags)


def call_undo(undo) -> None:
    """Save the undo state once: ``undo`` is a ``vtkSegmentationHistory``, a callable (e.g. the
    Segment Editor's ``saveStateForUndo``) or None."""
    if undo is None:
        return
    if hasattr(undo, "SaveState"):  # a vtkSegmentationHistory
        undo.SaveState()
    else:
        undo()


def apply_writes(volumeNode, segmentationNode, writes: List[SegmentWrite], undo=None) -> List[str]:
    """Write all segments (one undo step); on failure restore what was written. Returns ids."""
    vol_to_seg = volume_to_segmentation(volumeNode, segmentationNode)
    segmentation = segmentationNode.GetSegmentation()
    known = [w.segment_id or w.geometry_from for w in writes]
    grids = [
        segmentation_grid(
            segmentationNode, [w.segment_id, w.geometry_from] + known, volumeNode, vol_to_seg
        )
        for w in writes
    ]
    call_undo(undo)
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
                snapshots[sid] = snapshot_segment(segmentationNode, sid)
            write_segment(segmentationNode, volumeNode, w, sid, vol_to_seg, seg_grid)
            written.append(sid)
        for w, sid in zip(writes, written):
            if w.record is not None:
                # fingerprints of what was actually stored, read back the way the next run reads
                mask = segment_mask(volumeNode, segmentationNode, sid)
                w.record.predicted = {
                    t: slice_hash(mask, w.record.axis, t) for t in w.record.predicted
                }
                w.tags.update(record_tags(w.record))
            set_tags(segment_of(segmentationNode, sid), w.tags)
    except BaseException:
        for sid in created:
            segmentation.RemoveSegment(sid)
        for sid, snap in snapshots.items():
            restore_segment(segmentationNode, sid, snap)
        raise
    finally:
        segmentationNode.EndModify(was_modified)
    return written
