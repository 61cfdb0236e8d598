"""The annotation-loop record kept in segment tags, and the slice status derived from it.

Values avoid '|' and ':', which Slicer's tag format reserves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import GeometryError
from ..core.slices import auto_axis, nonempty_slices
from ..errors import MRMLError
from .nodes import (
    axis_name,
    check_segmentation_node,
    check_volume_node,
    geometry_of,
    grid_key,
    resolve_segment_id,
    segment_mask,
    segment_of,
    volume_axis,
)
from .vtkglue import vtk_module

TAG_LABELED = "UniverSeg.Labeled"
TAG_PREDICTED = "UniverSeg.Predicted"
TAG_SOURCE = "UniverSeg.Source"
_RECORD_VERSION = "v1"
_HASH_CHARS = 16


def slice_hash(mask: np.ndarray, axis: int, index: int) -> str:
    """Fingerprint of slice ``index`` along ``axis`` of a boolean mask (stored per predicted
    slice, so a later run sees whether the user changed it)."""
    plane = np.ascontiguousarray(np.take(mask, index, axis=axis), dtype=bool)
    return hashlib.sha1(np.packbits(plane).tobytes()).hexdigest()[:_HASH_CHARS]


@dataclass
class Record:
    """A segment's annotation-loop record: the axis and grid it belongs to, its labeled slices
    (``empty``: those marked labeled while empty) and a fingerprint per predicted slice."""

    axis: int
    grid: str
    labeled: List[int] = field(default_factory=list)
    empty: List[int] = field(default_factory=list)  # labeled slices marked empty
    predicted: Dict[int, str] = field(default_factory=dict)  # slice -> fingerprint


def get_tag(segment, name: str) -> Optional[str]:
    """The value of the segment tag ``name``, or None."""
    ref = vtk_module().reference("")
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


def read_record(segment) -> Optional[Record]:
    """The segment's record, or None when absent or unreadable (then painted slices count)."""
    lab = _parse_fields(get_tag(segment, TAG_LABELED))
    pred = _parse_fields(get_tag(segment, TAG_PREDICTED))
    if lab is None and pred is None:
        return None
    try:
        head = lab if lab is not None else pred
        rec = Record(int(head["axis"]), head["grid"])
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


def record_tags(rec: Record) -> Dict[str, Optional[str]]:
    """The tag values that store ``rec`` (None: remove the tag)."""
    head = f"{_RECORD_VERSION};axis={rec.axis};grid={rec.grid}"
    labeled = f"{head};slices={','.join(map(str, sorted(rec.labeled)))}"
    if rec.empty:
        labeled += f";empty={','.join(map(str, sorted(rec.empty)))}"
    predicted = None
    if rec.predicted:
        predicted = f"{head};slices=" + ",".join(
            f"{i}.{h}" for i, h in sorted(rec.predicted.items())
        )
    return {TAG_LABELED: labeled, TAG_PREDICTED: predicted}


def set_tags(segment, tags: Dict[str, Optional[str]]) -> None:
    """Set (or, for None, remove) segment tags."""
    for k, v in tags.items():
        if v is None:
            segment.RemoveTag(k)
        else:
            segment.SetTag(k, v)


def tags_of(segment, names: Iterable[str]) -> Dict[str, Optional[str]]:
    """The values of the tags ``names`` (None where absent)."""
    return {n: get_tag(segment, n) for n in names}


# --------------------------------------------------------------------------------------------
# slice status (what the next run would use)


@dataclass
class SliceStatus:
    """Which slices of a segment the next run uses as support, along one axis."""

    segment_id: str
    name: str
    axis: int  # array axis of the volume
    axis_name: str  # axial / coronal / sagittal (world)
    n_slices: int
    labeled: List[int]  # support for the next run (includes `edited`)
    predicted: List[int]  # untouched predicted slices (predicted again next run)
    edited: List[int]  # predicted slices the user changed: now labeled
    empty_labeled: List[int]  # labeled slices without foreground (structure absent there)
    note: str = ""  # why the stored record was ignored, if it was
    conflict: bool = False  # untouched predictions along another axis (see `note`)

    def counts(self, slice_list: bool = False) -> str:
        """The slice counts, in one stable wording the panel, the effect and the browser app
        share: ``3 labeled, 1 corrected, 1 empty, 24 predicted`` (``labeled`` counts every slice
        the next run uses as support, corrected and empty labeled ones included; ``corrected``
        are predicted slices the user changed; ``empty`` labeled slices without foreground;
        ``predicted`` untouched predictions), then the note on the stored record in brackets.
        ``slice_list`` adds the labeled slices after their count."""
        text = f"{len(self.labeled)} labeled"
        if slice_list and self.labeled:
            text += f" ({format_slices(self.labeled)})"
        for count, word in (
            (self.edited, "corrected"),
            (self.empty_labeled, "empty"),
            (self.predicted, "predicted"),
        ):
            if count:
                text += f", {len(count)} {word}"
        if self.note:
            text += f" [{self.note}]"
        return text

    def summary(self) -> str:
        """One line for the module panel, e.g. ``axial: 3 labeled (4, 10-12), 9 predicted``."""
        return f"{self.axis_name}: {self.counts(slice_list=True)}"


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


def status_of(
    segment_id: str, segment, mask: np.ndarray, axis: int, axis_label: str, grid: str, strict: bool
) -> Tuple[SliceStatus, Optional[Record]]:
    """(status, the record it used) of one segment along ``axis``: a record for another grid or
    axis is ignored (noted); untouched predictions along another axis are a conflict, which
    raises :class:`MRMLError` when ``strict``."""
    n = mask.shape[axis]
    nonempty = set(nonempty_slices(mask, axis))
    rec = read_record(segment)
    note, conflict = "", False
    if rec is not None and rec.grid != grid:
        note, rec = "record made on another volume grid: ignored", None
    if rec is not None and rec.axis != axis:
        if any(
            slice_hash(mask, rec.axis, t) == h
            for t, h in rec.predicted.items()
            if t < mask.shape[rec.axis]
        ):
            conflict = True
            note = (
                f"holds a prediction along array axis {rec.axis}: propagate along that "
                "axis, or clear the prediction first"
            )
            if strict:
                raise MRMLError(f"segment {segment.GetName()!r} {note}")
        else:
            note = "record for another axis: ignored"
        rec = None
    if rec is None:
        status = SliceStatus(
            segment_id,
            segment.GetName(),
            axis,
            axis_label,
            n,
            sorted(nonempty),
            [],
            [],
            [],
            note,
            conflict,
        )
        return status, None
    predicted, edited = [], []
    for t, h in sorted(rec.predicted.items()):
        if t >= n:
            continue
        (predicted if slice_hash(mask, axis, t) == h else edited).append(t)
    keep = {t for t in rec.labeled if t < n and (t in nonempty or t in set(rec.empty))}
    labeled = keep | set(edited) | (nonempty - set(rec.predicted))
    empty = sorted(t for t in labeled if t not in nonempty)
    status = SliceStatus(
        segment_id,
        segment.GetName(),
        axis,
        axis_label,
        n,
        sorted(labeled),
        predicted,
        edited,
        empty,
        note,
    )
    return status, rec


def slice_status(volumeNode, segmentationNode, segmentId, axis="axial") -> SliceStatus:
    """Labeled / predicted / corrected slices of a segment along ``axis`` (for live summaries).

    Never raises because of the stored record (a conflicting record is reported in ``note``).
    """
    check_segmentation_node(segmentationNode)
    volume = geometry_of(volumeNode)
    a = volume_axis(volume, axis)
    sid = resolve_segment_id(segmentationNode, segmentId)
    mask = segment_mask(volumeNode, segmentationNode, sid)
    status, _ = status_of(
        sid,
        segment_of(segmentationNode, sid),
        mask,
        a,
        axis_name(volume, a),
        grid_key(volumeNode, segmentationNode),
        strict=False,
    )
    return status


def labeled_slices(volumeNode, segmentationNode, segmentId, axis="axial") -> List[int]:
    """Slice indices along ``axis`` that the next run will use as the segment's support."""
    return slice_status(volumeNode, segmentationNode, segmentId, axis).labeled


def infer_axis(volumeNode, segmentationNode, segmentIds=None) -> int | None:
    """The slicing axis ``auto`` means: the axis the user's painted slices lie on
    (:func:`~UniverSegLogic.core.slices.auto_axis`), or None when nothing is painted.

    Per segment: the axis of its UniverSeg record when the record belongs to this volume grid (the
    axis it was propagated along), else the axis its painted voxels lie on separate slices of. A
    segment painted solidly tells none. Segments that tell different axes raise
    :class:`MRMLError` (one line naming them). ``segmentIds`` default: every segment that is not
    a review output.
    """
    check_volume_node(volumeNode)
    segmentation = segmentationNode.GetSegmentation()
    if segmentIds is None:
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        ids = [i for i in ids if get_tag(segmentation.GetSegment(i), TAG_SOURCE) is None]
    else:
        ids = [resolve_segment_id(segmentationNode, s) for s in segmentIds]
    grid = grid_key(volumeNode, segmentationNode)
    names = [segment_of(segmentationNode, sid).GetName() for sid in ids]
    known, paintings = {}, {}
    for sid, name in zip(ids, names):
        label = name if names.count(name) == 1 else f"{name} [{sid}]"
        rec = read_record(segment_of(segmentationNode, sid))
        if rec is not None and rec.grid == grid and 0 <= rec.axis <= 2:
            known[label] = rec.axis
        else:
            paintings[label] = segment_mask(volumeNode, segmentationNode, sid)
    volume = geometry_of(volumeNode)
    try:
        return auto_axis(paintings, known, lambda a: axis_name(volume, a))
    except GeometryError as exc:
        raise MRMLError(str(exc)) from None
