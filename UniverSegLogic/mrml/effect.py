"""The Segment Editor effect "UniverSeg" without Qt: preview, masking, apply, cancel.

The effect (``UniverSegSlicer/SegmentEditorUniverSegLib``) follows Slicer's auto-complete effects
(Fill between slices): the painted slices are propagated into a *preview* -- a separate temporary
segmentation node holding, per propagated segment, exactly what Apply will store -- and Apply
writes it into the segmentation as one undo step, Cancel removes it. The segmentation itself is
not touched until Apply, so Cancel leaves it as it was, bit for bit.

Masking follows the Segment Editor's settings (:class:`EditMask`, read from the
``vtkMRMLSegmentEditorNode``): the editable area ("inside all segments", "outside visible
segments", ...) and the editable intensity range are evaluated by Slicer's own
``vtkMRMLSegmentationNode.GenerateEditMask`` on the segmentation's own labelmap grid, with the
source volume resampled onto that grid the way the Segment Editor does (linear interpolation).
Outside the editable area a segment keeps what it stores. All masks are evaluated on the
segmentation as it is before Apply, so the preview shows exactly what Apply writes.

Other segments: by default they are never changed (their voxels stay bit for bit; Slicer may move
one to another labelmap layer if a prediction overlaps it). When the user asks the effect to
follow the Segment Editor's "Modify other segments" setting, the segments it names ("all" or
"visible"; never the segments being propagated, which do not erase each other) lose the voxels
the prediction writes as foreground.

The painted (labeled) slices of a propagated segment are never written, whatever the masking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.slices import nonempty_slices
from ..errors import MRMLError
from .gridmap import GridMap, code_on_segment
from .job import PropagationJob
from .nodes import local_ijk_to_ras, node_name, segment_mask, segment_of, volume_to_segmentation
from .record import (
    TAG_SOURCE,
    Record,
    SliceStatus,
    get_tag,
    record_tags,
    set_tags,
    slice_hash,
    slice_status,
)
from .vtkglue import (
    extent_empty,
    geometry_image,
    image_scalars,
    np_from_vtk_matrix,
    oriented_image,
    slicer_module,
    vtk_matrix,
    vtk_module,
)
from .writing import (
    BACKGROUND,
    FOREGROUND,
    KEEP,
    call_undo,
    footprint_extent,
    restore_segment,
    segment_values,
    segmentation_grid,
    snapshot_segment,
    union_extent,
)

#: "Modify other segments": never (default), the visible ones, all of them.
OVERWRITE_MODES = ("none", "visible", "all")

#: vtkMRMLSegmentationNode.EditAllowed* values, by name (Slicer's own numbering).
MASK_MODES = {
    "everywhere": 0,
    "inside all segments": 1,
    "inside visible segments": 2,
    "outside all segments": 3,
    "outside visible segments": 4,
    "inside one segment": 5,
}
_MASK_NAMES = {v: k for k, v in MASK_MODES.items()}


@dataclass(frozen=True)
class EditMask:
    """Where the effect may write: the Segment Editor's masking settings.

    ``mask_mode``: a ``vtkMRMLSegmentationNode.EditAllowed*`` value (see :data:`MASK_MODES`);
    ``mask_segment_id``: the segment of "inside one segment"; ``intensity_range``: editable
    source-volume intensities (inclusive), None = any; ``overwrite``: which other segments lose
    voxels the prediction writes (one of :data:`OVERWRITE_MODES`).
    """

    mask_mode: int = 0
    mask_segment_id: str = ""
    intensity_range: Optional[Tuple[float, float]] = None
    overwrite: str = "none"

    def __post_init__(self):
        if self.mask_mode not in _MASK_NAMES:
            raise MRMLError(f"unknown editable-area mode {self.mask_mode!r}")
        if self.overwrite not in OVERWRITE_MODES:
            raise MRMLError(
                f"unknown overwrite mode {self.overwrite!r}: use {', '.join(OVERWRITE_MODES)}"
            )
        if self.intensity_range is not None:
            lo, hi = (float(v) for v in self.intensity_range)
            object.__setattr__(self, "intensity_range", (lo, hi))

    @classmethod
    def from_segment_editor_node(cls, editorNode, modify_other_segments: bool = False):
        """The masking settings of a ``vtkMRMLSegmentEditorNode``. Other segments are modified
        (as its "Modify other segments" says) only when ``modify_other_segments`` is True."""
        if editorNode is None:
            return cls()
        # Slicer >= 5.2 names it "source volume"; older releases "master volume"
        enabled = (
            getattr(editorNode, "GetSourceVolumeIntensityMask", None)
            or editorNode.GetMasterVolumeIntensityMask
        )
        get_range = (
            getattr(editorNode, "GetSourceVolumeIntensityMaskRange", None)
            or editorNode.GetMasterVolumeIntensityMaskRange
        )
        intensity = tuple(get_range()) if enabled() else None
        overwrite = "none"
        if modify_other_segments:
            cls_ = type(editorNode)
            overwrite = {
                cls_.OverwriteAllSegments: "all",
                cls_.OverwriteVisibleSegments: "visible",
            }.get(editorNode.GetOverwriteMode(), "none")
        return cls(
            int(editorNode.GetMaskMode()),
            editorNode.GetMaskSegmentID() or "",
            intensity,
            overwrite,
        )

    @property
    def restricts(self) -> bool:
        """True when part of the grid may be not editable."""
        return self.mask_mode != 0 or self.intensity_range is not None

    def describe(self) -> str:
        """One line for the effect's panel."""
        parts = [f"editable area: {_MASK_NAMES[self.mask_mode]}"]
        if self.intensity_range is not None:
            parts.append("intensity {:g} to {:g}".format(*self.intensity_range))
        parts.append(
            {
                "none": "other segments: untouched",
                "visible": "other segments: visible ones are overwritten",
                "all": "other segments: overwritten",
            }[self.overwrite]
        )
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# masks on the segmentation's own grid


def _aligned_source(sourceVolumeNode, segmentationNode, reference):
    """The source volume resampled onto ``reference`` (segmentation node coordinates), as the
    Segment Editor does for its intensity mask: first component, linear interpolation."""
    slicer, vtk = slicer_module(), vtk_module()
    image = sourceVolumeNode.GetImageData()
    if image is None:
        raise MRMLError(f"volume {node_name(sourceVolumeNode)} holds no image data")
    if image.GetNumberOfScalarComponents() > 1:
        extract = vtk.vtkImageExtractComponents()
        extract.SetInputData(image)
        extract.SetComponents(0)
        extract.Update()
        image = extract.GetOutput()
    source = slicer.vtkOrientedImageData()
    source.ShallowCopy(image)
    source.SetImageToWorldMatrix(vtk_matrix(local_ijk_to_ras(sourceVolumeNode)))
    transform = vtk.vtkTransform()
    transform.SetMatrix(vtk_matrix(volume_to_segmentation(sourceVolumeNode, segmentationNode)))
    out = slicer.vtkOrientedImageData()
    background = float(sourceVolumeNode.GetImageBackgroundScalarComponentAsDouble(0))
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        source, reference, out, True, False, transform, background
    ):
        raise MRMLError("resampling the source volume onto the segmentation grid failed")
    return out


def editable_region(
    segmentationNode,
    segmentId: str,
    extent: Sequence[int],
    grid: np.ndarray,
    mask: EditMask,
    sourceVolumeNode=None,
) -> Optional[np.ndarray]:
    """Boolean KJI array over ``extent`` of the grid ``grid`` (image-to-node matrix): True where
    ``segmentId`` may be edited under ``mask``; None when everything is editable.

    Evaluated by Slicer's ``GenerateEditMask`` (``segmentId`` is the edited segment: "outside
    all segments" leaves its own voxels editable).
    """
    if not mask.restricts:
        return None
    slicer = slicer_module()
    reference = geometry_image(extent, grid)
    source, intensity = None, None
    if mask.intensity_range is not None:
        if sourceVolumeNode is None:
            raise MRMLError("an editable intensity range needs the source volume")
        source = _aligned_source(sourceVolumeNode, segmentationNode, reference)
        intensity = list(mask.intensity_range)
    if mask.mask_mode == MASK_MODES["inside one segment"]:
        if not mask.mask_segment_id or not segmentationNode.GetSegmentation().GetSegment(
            mask.mask_segment_id
        ):
            raise MRMLError("the editable area is one segment, but that segment does not exist")
    out = slicer.vtkOrientedImageData()
    args = [out, int(mask.mask_mode), reference, segmentId, mask.mask_segment_id]
    if source is not None:
        args += [source, intensity]
    if not segmentationNode.GenerateEditMask(*args):
        raise MRMLError("Slicer could not compute the editable area")
    values = image_scalars(out)
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if values is None or values.shape != shape:
        raise MRMLError("the editable area does not cover the written region")
    return values == 0  # GenerateEditMask: non-zero = not editable


# --------------------------------------------------------------------------------------------
# what Apply writes


@dataclass
class _Plan:
    """One propagated segment: its final content on its own grid, and what changed."""

    segment_id: str
    extent: List[int]
    grid: np.ndarray  # image-to-node matrix of the segmentation grid
    final: np.ndarray  # uint8 KJI over extent: what the segment stores after Apply
    written_fg: np.ndarray  # bool: voxels the prediction writes as foreground
    record: Record
    masked: int = 0  # predicted foreground voxels left as they were (not editable)


@dataclass
class _Erase:
    """A segment that is not propagated, losing voxels under the prediction (overwrite)."""

    segment_id: str
    extent: List[int]
    grid: np.ndarray
    final: np.ndarray
    lost: int  # voxels the segment loses


@dataclass
class EffectResult:
    """What Apply wrote."""

    segment_ids: List[str]  # propagated segments
    axis: int
    axis_name: str
    labeled_slices: Dict[str, List[int]]
    predicted_slices: Dict[str, List[int]]
    overwritten: Dict[str, int]  # other segment id -> voxels it lost (overwrite modes)
    masked_voxels: Dict[str, int]  # per segment: predicted voxels left as they were (masking)
    device: str
    weights: str
    notes: List[str] = field(default_factory=list)
    #: segments left as they were because they have no labeled slice along ``axis``
    skipped_ids: List[str] = field(default_factory=list)


def _fill_code(job: PropagationJob, index: int) -> np.ndarray:
    """KEEP/BACKGROUND/FOREGROUND on the volume grid for segment ``index`` of a finished job:
    the predicted (and previously predicted) slices that the user did not label."""
    mask, status, res = job.masks[index], job.statuses[index], job.result.segments[index]
    labeled = set(res.labeled_slices)
    region = sorted((set(res.predicted_slices) | set(status.predicted)) - labeled)
    code = np.zeros(mask.shape, dtype=np.uint8)
    take = [slice(None)] * 3
    for t in region:
        take[job.axis] = t
        code[tuple(take)] = np.where(res.mask[tuple(take)], FOREGROUND, BACKGROUND)
    return code


def _resample_code(job: PropagationJob, code: np.ndarray, extent, grid) -> np.ndarray:
    """A volume-grid code map on ``extent`` of the segmentation ``grid``, by the bridge's one
    cell rule (:func:`gridmap.code_on_segment`: the same rule reads painted voxels, so kept
    slices read back unchanged whatever the two grids' relation)."""
    vol_ijk_to_seg = volume_to_segmentation(
        job.volumeNode, job.segmentationNode
    ) @ local_ijk_to_ras(job.volumeNode)
    return code_on_segment(code, GridMap(np.linalg.solve(vol_ijk_to_seg, grid)), extent)


def _labelmap_grid(segmentationNode, segmentId) -> Tuple[Optional[List[int]], np.ndarray]:
    lm = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if lm is None or extent_empty(lm.GetExtent()):
        return None, None
    m = vtk_module().vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    return list(lm.GetExtent()), np_from_vtk_matrix(m)


def _overwrite_targets(segmentationNode, propagated: Sequence[str], mode: str) -> List[str]:
    if mode == "none":
        return []
    segmentation = segmentationNode.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    ids = [i for i in ids if i not in set(propagated)]
    if mode == "visible":
        display = segmentationNode.GetDisplayNode()
        ids = [i for i in ids if display is None or display.GetSegmentVisibility(i)]
    return ids


def _build(job: PropagationJob, mask: EditMask, sourceVolumeNode=None):
    """Plans for every propagated segment and erasures of other segments (nothing written)."""
    node = job.segmentationNode
    vol_to_seg = volume_to_segmentation(job.volumeNode, node)
    dims = job.volumeNode.GetImageData().GetDimensions()
    vol_ijk_to_seg = vol_to_seg @ local_ijk_to_ras(job.volumeNode)
    plans: List[_Plan] = []
    for index, sid in enumerate(job.source_ids):
        res, status = job.result.segments[index], job.statuses[index]
        grid = segmentation_grid(node, [sid] + list(job.source_ids), job.volumeNode, vol_to_seg)
        lm = node.GetBinaryLabelmapInternalRepresentation(sid)
        current_extent = lm.GetExtent() if lm is not None else (0, -1, 0, -1, 0, -1)
        extent = union_extent(current_extent, footprint_extent(vol_ijk_to_seg, grid, dims))
        code = _resample_code(job, _fill_code(job, index), extent, grid)
        editable = editable_region(node, sid, extent, grid, mask, sourceVolumeNode)
        masked = 0
        if editable is not None:
            masked = int(((code == FOREGROUND) & ~editable).sum())
            code = np.where(editable, code, KEEP).astype(np.uint8)
        current = segment_values(node, sid, extent)
        final = np.where(code == KEEP, current, code == FOREGROUND).astype(np.uint8)
        labeled = list(res.labeled_slices)
        nonempty = set(nonempty_slices(job.masks[index], job.axis))
        record = Record(
            job.axis,
            job.grid,
            labeled,
            [t for t in labeled if t not in nonempty],
            {t: "" for t in sorted(set(res.predicted_slices) | set(status.predicted))},
        )
        plans.append(_Plan(sid, list(extent), grid, final, code == FOREGROUND, record, masked))
    erasures: List[_Erase] = []
    for tid in _overwrite_targets(node, job.source_ids, mask.overwrite):
        extent, grid = _labelmap_grid(node, tid)
        if extent is None:
            continue
        current = segment_values(node, tid, extent)
        lose = np.zeros(current.shape, dtype=bool)
        for plan in plans:
            if np.allclose(plan.grid, grid, atol=1e-9):
                lose |= place_values(plan.written_fg, plan.extent, extent)
            else:
                lose |= _resample_bool(plan.written_fg, plan.extent, plan.grid, extent, grid)
        lost = int((lose & (current > 0)).sum())
        if lost:
            final = np.where(lose, 0, current).astype(np.uint8)
            erasures.append(_Erase(tid, extent, grid, final, lost))
    return plans, erasures


def place_values(values: np.ndarray, extent, target_extent) -> np.ndarray:
    """``values`` (over ``extent``) placed into ``target_extent`` of the same grid (zero pad)."""
    shape = tuple(target_extent[2 * i + 1] - target_extent[2 * i] + 1 for i in (2, 1, 0))  # K, J, I
    out = np.zeros(shape, dtype=values.dtype)
    lo = [extent[4] - target_extent[4], extent[2] - target_extent[2], extent[0] - target_extent[0]]
    src, dst = [], []
    for o, n, m in zip(lo, values.shape, shape):
        a, b = max(0, o), min(m, o + n)
        if b <= a:
            return out
        dst.append(slice(a, b))
        src.append(slice(a - o, b - o))
    out[tuple(dst)] = values[tuple(src)]
    return out


def _resample_bool(values, extent, grid, target_extent, target_grid) -> np.ndarray:
    slicer = slicer_module()
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        oriented_image(values.astype(np.uint8), extent, grid),
        geometry_image(target_extent, target_grid),
        out,
        False,
        False,
    ):
        raise MRMLError("resampling onto another segment's grid failed")
    return image_scalars(out) > 0


def store_labelmap(segmentationNode, segmentId: str, values: np.ndarray, extent, grid) -> None:
    """Replace a segment's labelmap by ``values`` (KJI over ``extent`` of the grid ``grid``)."""
    logic = slicer_module().vtkSlicerSegmentationsModuleLogic
    image = oriented_image(values, extent, grid)
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
        raise MRMLError(f"Slicer refused to update segment {segmentId!r}")


# --------------------------------------------------------------------------------------------
# the preview


PREVIEW_SUFFIX = " preview"


class PropagationPreview:
    """A finished propagation shown as a preview, then applied or discarded.

    ``job`` is a :class:`~UniverSegLogic.mrml.job.PropagationJob` in ``fill`` mode whose
    :meth:`~UniverSegLogic.mrml.job.PropagationJob.run` has completed (made by
    :meth:`Runner.preview <UniverSegLogic.mrml.runner.Runner.preview>`).
    """

    def __init__(self, job: PropagationJob):
        if job.mode != "fill":
            raise MRMLError("the effect previews fill-mode propagations only")
        if job.result is None:
            raise MRMLError("nothing computed yet: run the propagation first")
        self.job = job
        #: messages for the user (segments skipped, fusion defaults, a fall-back to the CPU)
        self.notes = list(job.result.notes) + list(job.notes)
        #: seconds from preparing the run to the end of the computation
        self.seconds = time.perf_counter() - job.t0
        self.preview_node = None

    @property
    def segment_ids(self) -> List[str]:
        """The propagated segments."""
        return list(self.job.source_ids)

    def plans(self, mask: EditMask = EditMask(), sourceVolumeNode=None):
        """(plans, erasures): what :meth:`apply` would write, computed on the current state."""
        return _build(self.job, mask, sourceVolumeNode or self.job.volumeNode)

    def show(self, mask: EditMask = EditMask(), sourceVolumeNode=None, previewNode=None):
        """Create (or update) the preview node: per propagated segment, what Apply stores.

        The segmentation is not changed. Returns the preview segmentation node.
        """
        node = self.job.segmentationNode
        scene = node.GetScene()
        if scene is None:
            raise MRMLError(f"{node_name(node)} is not in a scene")
        plans, _ = self.plans(mask, sourceVolumeNode)
        preview = previewNode or self.preview_node
        if preview is None or preview.GetScene() is None:
            preview = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            preview.CreateDefaultDisplayNodes()
            preview.SetHideFromEditors(True)
        preview.SetName(node.GetName() + PREVIEW_SUFFIX)
        preview.SetAndObserveTransformNodeID(node.GetTransformNodeID())
        segmentation = node.GetSegmentation()
        target = preview.GetSegmentation()
        was_modified = preview.StartModify()
        try:
            for sid in [target.GetNthSegmentID(i) for i in range(target.GetNumberOfSegments())]:
                if sid not in self.job.source_ids:
                    target.RemoveSegment(sid)
            for plan in plans:
                source = segmentation.GetSegment(plan.segment_id)
                if target.GetSegment(plan.segment_id) is None:
                    target.AddEmptySegment(
                        plan.segment_id, source.GetName(), list(source.GetColor())
                    )
                store_labelmap(preview, plan.segment_id, plan.final, plan.extent, plan.grid)
        finally:
            preview.EndModify(was_modified)
        self.preview_node = preview
        return preview

    def discard(self) -> None:
        """Remove the preview node (Cancel). The segmentation was never changed."""
        preview, self.preview_node = self.preview_node, None
        if preview is not None and preview.GetScene() is not None:
            preview.GetScene().RemoveNode(preview)

    def apply(self, mask: EditMask = EditMask(), sourceVolumeNode=None, undo=None) -> EffectResult:
        """Write the previewed result into the segmentation as one undo step (``undo`` is called
        once, before anything is written: e.g. the effect's ``saveStateForUndo``). On failure
        every segment written so far is restored. The preview node is removed afterwards."""
        job = self.job
        try:
            job.check_unchanged()
        except MRMLError as exc:
            raise MRMLError(
                str(exc)
                .replace("during the run", "since the preview")
                .replace("(propagate again)", "(press Update)")
            ) from None
        node = job.segmentationNode
        plans, erasures = self.plans(mask, sourceVolumeNode)
        call_undo(undo)
        was_modified = node.StartModify()
        snapshots = {}
        try:
            for item in list(erasures) + list(plans):
                snapshots[item.segment_id] = snapshot_segment(node, item.segment_id)
            for erase in erasures:
                store_labelmap(node, erase.segment_id, erase.final, erase.extent, erase.grid)
            for plan in plans:
                store_labelmap(node, plan.segment_id, plan.final, plan.extent, plan.grid)
            for plan in plans:
                stored = segment_mask(job.volumeNode, node, plan.segment_id)
                plan.record.predicted = {
                    t: slice_hash(stored, plan.record.axis, t) for t in plan.record.predicted
                }
                set_tags(segment_of(node, plan.segment_id), record_tags(plan.record))
        except BaseException:
            for sid, snap in snapshots.items():
                restore_segment(node, sid, snap)
            raise
        finally:
            node.EndModify(was_modified)
        self.discard()
        res = job.result
        return EffectResult(
            list(job.source_ids),
            job.axis,
            job.axis_name,
            {sid: list(s.labeled_slices) for sid, s in zip(job.source_ids, res.segments)},
            {sid: list(s.predicted_slices) for sid, s in zip(job.source_ids, res.segments)},
            {e.segment_id: e.lost for e in erasures},
            {p.segment_id: p.masked for p in plans},
            res.device,
            res.weights,
            list(self.notes),
            list(job.skipped_ids),
        )


# --------------------------------------------------------------------------------------------
# which segments the effect propagates


def effect_segments(
    volumeNode, segmentationNode, axis, candidates: Optional[Sequence[str]] = None
) -> Tuple[List[str], List[SliceStatus]]:
    """(segments to propagate, their slice status): the ``candidates`` (default: the segments
    visible in the segmentation's display node) that are not review outputs and hold no
    prediction along another axis -- none when no such segment has a labeled slice along
    ``axis`` (a run skips, with a note, those that have none). Statuses are returned for every
    candidate considered."""
    segmentation = segmentationNode.GetSegmentation()
    if candidates is None:
        display = segmentationNode.GetDisplayNode()
        candidates = [
            segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
        ]
        if display is not None:
            candidates = [s for s in candidates if display.GetSegmentVisibility(s)]
    ids, statuses = [], []
    for sid in candidates:
        segment = segmentation.GetSegment(sid)
        if segment is None or get_tag(segment, TAG_SOURCE) is not None:
            continue
        status = slice_status(volumeNode, segmentationNode, sid, axis)
        statuses.append(status)
        if not status.conflict:
            ids.append(sid)
    labeled = {s.segment_id for s in statuses if s.labeled and not s.conflict}
    return (ids if labeled else []), statuses
