"""A propagation run on Slicer nodes (read, compute, write) and the panel's annotation actions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from ..core.slices import nonempty_slices
from ..errors import MRMLError
from .nodes import (
    _check_segmentation_node,
    _check_volume_node,
    _geometry_of,
    _grid_key,
    _node_name,
    _resolve_axis,
    _resolve_segment_id,
    _segment,
    _vol_to_seg,
    axis_name,
    segment_mask,
    volume_from_node,
)
from .record import (
    TAG_LABELED,
    TAG_PREDICTED,
    TAG_SOURCE,
    SliceStatus,
    _get_tag,
    _read_record,
    _Record,
    _record_tags,
    _set_tags,
    _slice_hash,
    _status,
    slice_status,
)
from .session import session_for, support_stamp
from .writing import BACKGROUND, FOREGROUND, _apply_writes, _Write

OUTPUT_SUFFIX = " (UniverSeg)"
MODES = ("fill", "new")
#: Slices suggested per segment in :attr:`MRMLPropagationResult.suggested_slices`.
SUGGESTED_SLICES = 3


@dataclass
class MRMLPropagationResult:
    """What a run wrote."""

    segment_ids: List[str]  # segments written (review segments in "new" mode)
    source_ids: List[str]  # the segments whose labels were propagated
    mode: str
    axis: int  # array axis of the volume
    axis_name: str
    labeled_slices: Dict[str, List[int]]  # per source segment id
    predicted_slices: Dict[str, List[int]]  # per source segment id
    device: str
    weights: str
    seconds: float
    #: one-time messages for the user (e.g. hand-set fusion defaults for these weights)
    notes: List[str] = field(default_factory=list)
    #: per source segment id: slices to paint next along ``axis``, best first (core.suggest;
    #: a slice beyond the predicted range may be one to mark labeled empty)
    suggested_slices: Dict[str, List[int]] = field(default_factory=dict)
    #: per source segment id: {slice along ``axis``: expected wrong voxels} (labeled slices 0)
    slice_uncertainty: Dict[str, Dict[int, float]] = field(default_factory=dict)


def _make_options(options: Dict[str, object]):
    from ..core.propagator import PropagationOptions
    from ..errors import UsageError

    try:
        return PropagationOptions.from_mapping(options)
    except UsageError as exc:
        raise MRMLError(str(exc)) from None


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

    def __init__(
        self,
        volumeNode,
        segmentationNode,
        segmentIds=None,
        mode="fill",
        supportPairs=(),
        engine=None,
        fusion=None,
        *,
        sessions=None,
        **options,
    ):
        from ..core.propagator import SegmentInput

        if mode not in MODES:
            raise MRMLError(f"unknown output mode {mode!r}: use 'fill' or 'new'")
        opts = _make_options(options)
        _check_volume_node(volumeNode)
        _check_segmentation_node(segmentationNode)
        self.volumeNode, self.segmentationNode, self.mode = volumeNode, segmentationNode, mode
        self._scenes = (volumeNode.GetScene(), segmentationNode.GetScene())
        self.engine, self.fusion, self.sessions = engine, fusion, sessions
        geometry = _geometry_of(volumeNode)
        _vol_to_seg(volumeNode, segmentationNode)  # refuse unusable transforms before computing
        self.axis = _resolve_axis(geometry, opts.axis)
        self.axis_name = axis_name(geometry, self.axis)
        opts.axis = self.axis
        self.options = opts
        self.grid = _grid_key(volumeNode, segmentationNode)
        self.source_ids = _source_ids(segmentationNode, segmentIds)
        self.masks: List[np.ndarray] = []
        self.statuses: List[SliceStatus] = []
        self.inputs: List[SegmentInput] = []
        for sid in list(self.source_ids):
            segment = _segment(segmentationNode, sid)
            mask = segment_mask(volumeNode, segmentationNode, sid)
            status, _ = _status(
                sid, segment, mask, self.axis, self.axis_name, self.grid, strict=True
            )
            if segmentIds is None and not status.labeled and not supportPairs:
                self.source_ids.remove(sid)  # default selection: segments the user labeled
                continue
            self.masks.append(mask)
            self.statuses.append(status)
            # what the user painted: untouched predictions are predicted again, never support
            painted = mask.copy()
            take = [slice(None)] * 3
            for t in status.predicted:
                take[self.axis] = t
                painted[tuple(take)] = False
            self.inputs.append(
                SegmentInput(sid, segment.GetName(), painted, status.labeled or None)
            )
        if not self.inputs:
            raise MRMLError(
                f"no segment of {_node_name(segmentationNode)} has a labeled slice "
                f"along the {self.axis_name} axis: paint at least one slice"
            )
        names = [s.name for s in self.inputs]
        self.supports = [self._support(pair, names) for pair in supportPairs]
        self._support_stamps = [support_stamp(v, s) for v, s in supportPairs]
        # the voxels are read here, on the calling (main) thread, unless a kept session has them
        self._session, self._key = None, None
        if sessions is not None:
            self._key = sessions.key(volumeNode, opts, self._support_stamps, engine, fusion)
            self._session = sessions.get(self._key)
        self._volume = volume_from_node(volumeNode) if self._session is None else None
        self.result = None

    def _support(self, pair, names: List[str]):
        from ..core.propagator import SupportVolume

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
            raise MRMLError(
                f"support segmentation {_node_name(snode)} has no segment named "
                f"{' or '.join(repr(n) for n in names)}"
            )
        return SupportVolume(volume_from_node(vnode), masks)

    def session(self):
        """The :class:`~UniverSegLogic.core.propagator.Propagator` this run uses: the session
        store's (built on first use, then kept) or a fresh one without a store. Building one
        loads the engine, so call it from :meth:`run`."""
        if self._session is None:
            self._session = session_for(
                self.sessions,
                self._key,
                lambda: self._volume,
                self.options,
                lambda: self.supports,
                self.engine,
                self.fusion,
            )
            self._volume = None
        return self._session

    def run(
        self,
        progress: Optional[Callable[[float, str], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> None:
        """Compute every prediction; touches no MRML node that the main thread may change, so it
        may run in a worker thread (raises :class:`~UniverSegLogic.errors.Cancelled` when
        ``cancel()`` is True)."""
        self.result = self.session().propagate(self.inputs, progress=progress, cancel=cancel)

    def _check_unchanged(self) -> None:
        for node, scene in zip((self.volumeNode, self.segmentationNode), self._scenes):
            if scene is not None and node.GetScene() is not scene:
                raise MRMLError(
                    f"{_node_name(node)} was removed during the run: nothing was written"
                )
        for sid, mask in zip(self.source_ids, self.masks):
            if self.segmentationNode.GetSegmentation().GetSegment(sid) is None:
                raise MRMLError(f"segment {sid!r} was removed during the run: nothing was written")
            if not np.array_equal(segment_mask(self.volumeNode, self.segmentationNode, sid), mask):
                raise MRMLError(
                    f"segment {sid!r} was edited during the run: nothing was written "
                    "(propagate again)"
                )

    def apply(self, undo=None) -> MRMLPropagationResult:
        """Write the results into the segmentation (one undo step)."""
        if self.result is None:
            raise MRMLError("nothing computed yet: call run() first")
        self._check_unchanged()
        writes = []
        segmentation = self.segmentationNode.GetSegmentation()
        run_tags = self.result.tags()  # device and precision of the run
        for sid, mask, status in zip(self.source_ids, self.masks, self.statuses):
            res = self.result.get(sid)
            labeled = list(res.labeled_slices)
            rec = _Record(
                self.axis,
                self.grid,
                labeled,
                [t for t in labeled if t not in set(nonempty_slices(mask, self.axis))],
                {t: "" for t in res.predicted_slices},
            )
            if self.mode == "fill":
                region = sorted((set(res.predicted_slices) | set(status.predicted)) - set(labeled))
                code = np.zeros(mask.shape, dtype=np.uint8)
                take = [slice(None)] * 3
                for t in region:
                    take[self.axis] = t
                    code[tuple(take)] = np.where(res.mask[tuple(take)], FOREGROUND, BACKGROUND)
                writes.append(_Write(sid, code, False, dict(run_tags), rec))
            else:
                source = segmentation.GetSegment(sid)
                code = np.where(res.mask, FOREGROUND, BACKGROUND).astype(np.uint8)
                out_id = _output_segment_for(self.segmentationNode, sid)
                writes.append(
                    _Write(
                        out_id,
                        code,
                        True,
                        {TAG_SOURCE: sid, **run_tags},
                        rec,
                        new_name=source.GetName() + OUTPUT_SUFFIX,
                        new_color=tuple(source.GetColor()),
                        geometry_from=sid,
                    )
                )
        written = _apply_writes(self.volumeNode, self.segmentationNode, writes, undo)
        res = self.result
        return MRMLPropagationResult(
            written,
            list(self.source_ids),
            self.mode,
            self.axis,
            self.axis_name,
            {sid: list(res.get(sid).labeled_slices) for sid in self.source_ids},
            {sid: list(res.get(sid).predicted_slices) for sid in self.source_ids},
            res.device,
            res.weights,
            res.seconds,
            list(res.notes),
            {sid: res.get(sid).suggested_slices(SUGGESTED_SLICES) for sid in self.source_ids},
            {sid: res.get(sid).slice_uncertainty for sid in self.source_ids},
        )


def prepare_propagation(
    volumeNode,
    segmentationNode,
    segmentIds=None,
    mode="fill",
    supportPairs=(),
    engine=None,
    fusion=None,
    *,
    sessions=None,
    **options,
) -> PropagationJob:
    """Read everything a run needs from MRML and check it; see :class:`PropagationJob`.

    ``sessions``: a :class:`~UniverSegLogic.mrml.session.SessionStore` the caller keeps across
    runs (fast annotation loop); None builds a fresh session for this run."""
    return PropagationJob(
        volumeNode,
        segmentationNode,
        segmentIds,
        mode,
        supportPairs,
        engine,
        fusion,
        sessions=sessions,
        **options,
    )


def propagate_segmentation(
    volumeNode,
    segmentationNode,
    segmentIds=None,
    mode="fill",
    supportPairs=(),
    progress=None,
    cancel=None,
    engine=None,
    undo=None,
    fusion=None,
    *,
    sessions=None,
    **options,
) -> MRMLPropagationResult:
    """Propagate the labeled slices of ``segmentIds`` (default: every segment that is not a
    review output) through ``volumeNode`` and write the result into ``segmentationNode``.

    ``mode``: ``"fill"`` (predict the unlabeled slices of the same segment) or ``"new"``
    (write ``"<name> (UniverSeg)"`` for review). ``supportPairs``: ``(volumeNode,
    segmentationNode)`` pairs whose segments with the same names serve as extra support.
    ``undo``: a callable (e.g. the Segment Editor widget's ``saveStateForUndo``) or a
    ``vtkSegmentationHistory``, called once right before anything is written.
    ``sessions``: a :class:`~UniverSegLogic.mrml.session.SessionStore` kept across runs.
    ``options``: :class:`~UniverSegLogic.core.propagator.PropagationOptions` fields (``axis``,
    ``support_size``, ``ensemble``, ``device``, ``weights``, ...).
    Raises :class:`MRMLError` (bad input) or another
    :class:`~UniverSegLogic.errors.UniverSegError` (``Cancelled``, ``WeightsError``, ...);
    nothing is changed then.
    """
    t0 = time.perf_counter()
    job = prepare_propagation(
        volumeNode,
        segmentationNode,
        segmentIds,
        mode,
        supportPairs,
        engine,
        fusion,
        sessions=sessions,
        **options,
    )
    job.run(progress, cancel)
    result = job.apply(undo)
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# annotation-loop helpers for the panel


def mark_slice_labeled(
    volumeNode, segmentationNode, segmentId, axis, index: int, labeled: bool = True
) -> SliceStatus:
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
    nonempty = set(nonempty_slices(mask, a))
    support = set(status.labeled)
    predicted = {t: _slice_hash(mask, a, t) for t in status.predicted}
    if labeled:
        support.add(index)
        predicted.pop(index, None)  # an accepted prediction is the user's label now
    else:
        if index in nonempty and index not in predicted:
            raise MRMLError(f"slice {index} holds painted voxels: erase them to unlabel it")
        support.discard(index)
    rec = _Record(
        a, grid, sorted(support), sorted(t for t in support if t not in nonempty), predicted
    )
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
    untouched = [
        t
        for t, h in sorted(rec.predicted.items())
        if t < mask.shape[rec.axis] and _slice_hash(mask, rec.axis, t) == h
    ]
    code = np.zeros(mask.shape, dtype=np.uint8)
    take = [slice(None)] * 3
    for t in untouched:
        take[rec.axis] = t
        code[tuple(take)] = BACKGROUND
    tags = {TAG_LABELED: None, TAG_PREDICTED: None}
    _apply_writes(volumeNode, segmentationNode, [_Write(sid, code, False, tags, None)], undo)
    return untouched
