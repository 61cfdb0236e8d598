"""What the Slicer module's panel and the Segment Editor effect decide, without Qt.

The scripted module (``UniverSegSlicer.py``) and the effect (``SegmentEditorUniverSegLib``) stay
thin: which volume and segments to preselect, which slicing axis and slice view to use, the
suggested slices to go to, and clearing predictions as one undo step live here, tested on real
MRML through slicer-core. Runs go through :class:`~UniverSegLogic.mrml.runner.Runner`.

Importing this module never imports torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.slices import AXIS_AUTO
from ..errors import MRMLError
from .job import clear_predictions
from .nodes import (
    geometry_of,
    slice_center_ras,
    slice_view_axis,
    slice_view_index,
    volume_axis,
)
from .record import TAG_SOURCE, get_tag, infer_axis, read_record

#: Volume node classes that derive from vtkMRMLScalarVolumeNode but are no images to segment.
NOT_IMAGES = (
    "vtkMRMLLabelMapVolumeNode",
    "vtkMRMLDiffusionWeightedVolumeNode",
    "vtkMRMLDiffusionTensorVolumeNode",
)


# --------------------------------------------------------------------------------------------
# selection


def is_image_volume(node) -> bool:
    """True for a volume the bridge can segment: scalar or RGB(A), not a labelmap, with data."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        return False
    if any(node.IsA(c) for c in NOT_IMAGES):
        return False
    image = node.GetImageData()
    return image is not None and image.GetNumberOfScalarComponents() in (1, 3, 4)


def preselect_volume(scene, segmentationNode=None):
    """The volume to preselect: the segmentation's reference volume when it is an image, else
    the first image volume in the scene (labelmaps are never picked), else None."""
    if segmentationNode is not None:
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        ref = segmentationNode.GetNodeReference(role)
        if is_image_volume(ref):
            return ref
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if is_image_volume(node):
            return node
    return None


@dataclass
class SegmentRow:
    """One row of the panel's segment list."""

    segment_id: str
    name: str
    checked: bool
    color: Tuple[float, float, float]
    review_output: bool


def segment_rows(segmentationNode, choices: Optional[Dict[str, bool]] = None) -> List[SegmentRow]:
    """The segment list: every segment, checked as the user chose (``choices``: segment id ->
    checked, only what the user clicked) or by default -- every segment that is not a review
    output. A segment added later is therefore checked unless it is a review output."""
    choices = choices or {}
    rows = []
    if segmentationNode is None:
        return rows
    segmentation = segmentationNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(sid)
        review = get_tag(segment, TAG_SOURCE) is not None
        checked = bool(choices.get(sid, not review))
        rows.append(SegmentRow(sid, segment.GetName(), checked, tuple(segment.GetColor()), review))
    return rows


# --------------------------------------------------------------------------------------------
# slicing axis and slice views


def resolve_axis(
    volumeNode, segmentationNode, axis, segmentIds=None, slice_to_ras=None, default="axial"
) -> int:
    """The array axis to propagate along. ``axis``: a name / 0-2, or ``"auto"``: the axis the
    labels imply (:func:`~UniverSegLogic.mrml.record.infer_axis`), else the orientation of the
    given slice view, else ``default``."""
    if axis != AXIS_AUTO:
        return volume_axis(geometry_of(volumeNode), axis)
    if segmentationNode is not None:
        inferred = infer_axis(volumeNode, segmentationNode, segmentIds)
        if inferred is not None:
            return inferred
    if slice_to_ras is not None:
        return slice_view_axis(volumeNode, slice_to_ras)
    return volume_axis(geometry_of(volumeNode), default)


def pick_slice_view(volumeNode, axis, sliceNodes: Sequence, preferred=None):
    """The slice node to take "the current slice" from: ``preferred`` (the view last used) when
    it shows slices along ``axis``, else the first of ``sliceNodes`` that does; None if none."""
    a = volume_axis(geometry_of(volumeNode), axis)
    candidates = ([preferred] if preferred is not None else []) + list(sliceNodes)
    for node in candidates:
        if node is not None and slice_view_axis(volumeNode, node.GetSliceToRAS()) == a:
            return node
    return None


def current_slice(volumeNode, axis, sliceNode) -> int:
    """Index along ``axis`` of the slice ``sliceNode`` shows (see ``slice_view_index``)."""
    if sliceNode is None:
        raise MRMLError("no slice view shows slices along the chosen axis")
    return slice_view_index(volumeNode, axis, sliceNode.GetSliceToRAS())


def go_to_slice(volumeNode, axis, index: int, sliceNode) -> List[float]:
    """Move ``sliceNode`` (a slice view along ``axis``) to slice ``index`` of the volume: it is
    offset through the slice's centre, keeping its orientation. Returns the RAS point used."""
    if sliceNode is None:
        raise MRMLError("no slice view shows slices along the chosen axis")
    ras = slice_center_ras(volumeNode, axis, int(index))
    sliceNode.JumpSliceByOffsetting(*ras)
    return ras


def suggested_slices_of(
    suggested: Dict[str, Sequence[int]], segmentIds: Sequence[str]
) -> List[Tuple[str, int]]:
    """(segment id, slice) pairs to paint next, best first, from each segment's suggestions
    (e.g. ``MRMLPropagationResult.suggested_slices``): the first of every segment in the order
    of ``segmentIds``, then the second, ..."""
    lists = [(sid, list(suggested.get(sid, []))) for sid in segmentIds]
    out: List[Tuple[str, int]] = []
    for rank in range(max((len(v) for _, v in lists), default=0)):
        out += [(sid, v[rank]) for sid, v in lists if rank < len(v)]
    return out


# --------------------------------------------------------------------------------------------
# actions


def clear_predictions_of(volumeNode, segmentationNode, segmentIds, undo=None) -> Dict[str, int]:
    """Clear the untouched predictions of several segments as one undo step (``undo`` is called
    once, and only when some segment holds a UniverSeg record). Returns slices erased per id."""
    segmentation = segmentationNode.GetSegmentation()
    ids = list(segmentIds)
    recorded = [
        sid
        for sid in ids
        if segmentation.GetSegment(sid) is not None
        and read_record(segmentation.GetSegment(sid)) is not None
    ]
    if recorded and undo is not None:
        from .writing import call_undo

        call_undo(undo)
    return {sid: len(clear_predictions(volumeNode, segmentationNode, sid)) for sid in ids}


def forget_modules(prefixes: Sequence[str] = ("UniverSegLogic",)) -> List[str]:
    """Remove the named packages and their submodules from ``sys.modules`` so that the next
    import loads them again from disk ("Reload" in Slicer's developer mode). Returns the names."""
    gone = [
        name
        for name in list(sys.modules)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]
    for name in gone:
        del sys.modules[name]
    return gone
