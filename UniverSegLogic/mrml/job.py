"""A propagation run on Slicer nodes in three steps (read, compute, write), and the panel's
annotation actions. :class:`~UniverSegLogic.mrml.runner.Runner` prepares, runs and applies jobs;
nothing else creates one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..core.slices import AXIS_AUTO, nonempty_slices
from ..errors import MRMLError
from .nodes import (
    axis_name,
    check_segmentation_node,
    check_volume_node,
    geometry_of,
    grid_key,
    node_name,
    resolve_segment_id,
    segment_mask,
    segment_of,
    volume_axis,
    volume_from_node,
    volume_to_segmentation,
)
from .record import (
    TAG_LABELED,
    TAG_PREDICTED,
    TAG_SOURCE,
    Record,
    SliceStatus,
    get_tag,
    infer_axis,
    read_record,
    record_tags,
    set_tags,
    slice_hash,
    slice_status,
    status_of,
)
from .session import session_for, support_stamp
from .writing import BACKGROUND, FOREGROUND, SegmentWrite, apply_writes

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
    seconds: float  # from prepare to the end of the write
    #: messages for the user (segments skipped, hand-set fusion defaults, a fall-back to the CPU)
    notes: List[str] = field(default_factory=list)
    #: per source segment id: slices to paint next along ``axis``, best first (core.suggest;
    #: a slice beyond the predicted range may be one to mark labeled empty)
    suggested_slices: Dict[str, List[int]] = field(default_factory=dict)
    #: per source segment id: {slice along ``axis``: expected wrong voxels} (labeled slices 0)
    slice_uncertainty: Dict[str, Dict[int, float]] = field(default_factory=dict)
    #: segments left as they were because they have no labeled slice along ``axis``
    skipped_ids: List[str] = field(default_factory=list)


def _source_ids(segmentationNode, segmentIds) -> List[str]:
    seg = segmentationNode.GetSegmentation()
    if segmentIds is None:
        ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
        ids = [i for i in ids if get_tag(seg.GetSegment(i), TAG_SOURCE) is None]
    else:
        if isinstance(segmentIds, str):
            segmentIds = [segmentIds]
        ids = []
        for key in segmentIds:
            sid = resolve_segment_id(segmentationNode, key)
            if sid not in ids:
                ids.append(sid)
    if not ids:
        raise MRMLError(f"segmentation {node_name(segmentationNode)} has no segment to propagate")
    return ids


def _output_segment_for(segmentationNode, source_id: str) -> Optional[str]:
    seg = segmentationNode.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        if sid != source_id and get_tag(seg.GetSegment(sid), TAG_SOURCE) == source_id:
            return sid
    return None


class PropagationJob:
    """One run, in three steps: read MRML (constructor, main thread), compute (:meth:`run`,
    touches no MRML node, so it may run in a worker thread), write (:meth:`apply`, main thread).

    ``options``: the caller's :class:`~UniverSegLogic.core.propagator.PropagationOptions`, the
    one source of the axis (``auto``: the axis the painted slices lie on), the weights and the
    device; ``sessions``: the :class:`~UniverSegLogic.mrml.session.SessionStore` whose engines
    and sessions the run uses. Segments without a labeled slice are skipped with a note (an
    error only when none has one). Created by :meth:`Runner.prepare
    <UniverSegLogic.mrml.runner.Runner.prepare>`.
    """

    def __init__(
        self,
        volumeNode,
        segmentationNode,
        segmentIds,
        options,
        sessions,
        *,
        mode: str = "fill",
        supportPairs: Sequence = (),
        fusion=None,
    ):
        from ..core.propagator import PropagationOptions, SegmentInput

        self.t0 = time.perf_counter()
        if not isinstance(options, PropagationOptions):
            raise MRMLError("options must be a PropagationOptions (built once by the caller)")
        if mode not in MODES:
            raise MRMLError(f"unknown output mode {mode!r}: use 'fill' or 'new'")
        check_volume_node(volumeNode)
        check_segmentation_node(segmentationNode)
        self.volumeNode, self.segmentationNode, self.mode = volumeNode, segmentationNode, mode
        self._scenes = (volumeNode.GetScene(), segmentationNode.GetScene())
        self.sessions, self.fusion = sessions, fusion
        geometry = geometry_of(volumeNode)
        volume_to_segmentation(volumeNode, segmentationNode)  # refuse unusable transforms now
        self.source_ids = _source_ids(segmentationNode, segmentIds)
        if str(options.axis).strip().lower() == AXIS_AUTO:
            axis = infer_axis(volumeNode, segmentationNode, self.source_ids)
            if axis is None and not supportPairs:
                raise MRMLError(
                    f"no labeled slice in any segment of {node_name(segmentationNode)}: "
                    "paint at least one slice"
                )
            self.axis = volume_axis(geometry, "axial") if axis is None else axis
        else:
            self.axis = volume_axis(geometry, options.axis)
        self.axis_name = axis_name(geometry, self.axis)
        self.options = replace(options, axis=self.axis)
        self.grid = grid_key(volumeNode, segmentationNode)
        #: messages of this run beyond the propagation's own (e.g. a fall-back to the CPU)
        self.notes: List[str] = []
        #: segments skipped by the run (no labeled slice); known after :meth:`run`
        self.skipped_ids: List[str] = []
        self.masks: List[np.ndarray] = []
        self.statuses: List[SliceStatus] = []
        self.inputs: List[SegmentInput] = []
        for sid in self.source_ids:
            segment = segment_of(segmentationNode, sid)
            mask = segment_mask(volumeNode, segmentationNode, sid)
            status, _ = status_of(
                sid, segment, mask, self.axis, self.axis_name, self.grid, strict=True
            )
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
        if not supportPairs and not any(s.labeled for s in self.statuses):
            raise MRMLError(
                f"no labeled slice in any segment of {node_name(segmentationNode)} "
                f"along the {self.axis_name} axis: paint at least one slice"
            )
        names = [s.name for s in self.inputs]
        self.supports = [self._support(pair, names) for pair in supportPairs]
        self._support_stamps = [support_stamp(v, s) for v, s in supportPairs]
        # the voxels are read here, on the calling (main) thread, unless a kept session has them
        self._key = sessions.key(volumeNode, self.options, self._support_stamps, fusion)
        self._session = sessions.get(self._key)
        self._volume = volume_from_node(volumeNode) if self._session is None else None
        self.result = None

    def _support(self, pair, names: List[str]):
        from ..core.propagator import SupportVolume

        try:
            vnode, snode = pair
        except (TypeError, ValueError):
            raise MRMLError("each support pair must be (volume node, segmentation node)") from None
        check_volume_node(vnode)
        check_segmentation_node(snode)
        if vnode is self.volumeNode and snode is self.segmentationNode:
            raise MRMLError("a support pair repeats the input volume and segmentation")
        seg = snode.GetSegmentation()
        masks: Dict[str, np.ndarray] = {}
        for i in range(seg.GetNumberOfSegments()):
            segment = seg.GetNthSegment(i)
            name = segment.GetName()
            if name in names and name not in masks and get_tag(segment, TAG_SOURCE) is None:
                masks[name] = segment_mask(vnode, snode, seg.GetNthSegmentID(i))
        if not masks:
            raise MRMLError(
                f"support segmentation {node_name(snode)} has no segment named "
                f"{' or '.join(repr(n) for n in names)}"
            )
        return SupportVolume(volume_from_node(vnode), masks)

    @property
    def device(self) -> str:
        """The device the run's session computes on (empty before :meth:`run` built one)."""
        return str(getattr(getattr(self._session, "engine", None), "device", ""))

    def session(self):
        """The :class:`~UniverSegLogic.core.propagator.Propagator` this run uses: the session
        store's (built on first use, then kept). Building one loads the engine, so call it from
        :meth:`run`."""
        if self._session is None:
            self._session = session_for(
                self.sessions,
                self._key,
                lambda: self._volume,
                self.options,
                lambda: self.supports,
                self.fusion,
            )
            self._volume = None
        return self._session

    def use_device(self, device: str) -> None:
        """Run on ``device`` from now on (the volume already read is kept: no MRML access, so
        the fall-back may happen in a worker thread)."""
        volume = self._volume if self._session is None else self._session.image
        self.options = replace(self.options, device=device)
        self._key = self.sessions.key(
            self.volumeNode, self.options, self._support_stamps, self.fusion
        )
        self._session = self.sessions.get(self._key)
        self._volume = volume if self._session is None else None

    def run(
        self,
        progress: Optional[Callable[[float, str], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> None:
        """Compute every prediction; touches no MRML node that the main thread may change, so it
        may run in a worker thread (raises :class:`~UniverSegLogic.errors.Cancelled` when
        ``cancel()`` is True). Afterwards :attr:`source_ids` (and :attr:`masks`,
        :attr:`statuses`, :attr:`inputs`) hold the segments propagated, :attr:`skipped_ids`
        those without a labeled slice."""
        result = self.session().propagate(self.inputs, progress=progress, cancel=cancel)
        done = {s.key for s in result.segments}
        keep = [i for i, sid in enumerate(self.source_ids) if sid in done]
        self.skipped_ids = [sid for sid in self.source_ids if sid not in done]
        self.source_ids = [self.source_ids[i] for i in keep]
        self.masks = [self.masks[i] for i in keep]
        self.statuses = [self.statuses[i] for i in keep]
        self.inputs = [self.inputs[i] for i in keep]
        self.result = result

    def check_unchanged(self) -> None:
        """Raise :class:`MRMLError` when a node was removed or a propagated segment edited
        since the job read them (then nothing may be written)."""
        for node, scene in zip((self.volumeNode, self.segmentationNode), self._scenes):
            if scene is not None and node.GetScene() is not scene:
                raise MRMLError(
                    f"{node_name(node)} was removed during the run: nothing was written"
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
        self.check_unchanged()
        writes = []
        segmentation = self.segmentationNode.GetSegmentation()
        run_tags = self.result.tags()  # device and precision of the run
        for sid, mask, status in zip(self.source_ids, self.masks, self.statuses):
            res = self.result.get(sid)
            labeled = list(res.labeled_slices)
            rec = Record(
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
                writes.append(SegmentWrite(sid, code, False, dict(run_tags), rec))
            else:
                source = segmentation.GetSegment(sid)
                code = np.where(res.mask, FOREGROUND, BACKGROUND).astype(np.uint8)
                out_id = _output_segment_for(self.segmentationNode, sid)
                writes.append(
                    SegmentWrite(
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
        written = apply_writes(self.volumeNode, self.segmentationNode, writes, undo)
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
            time.perf_counter() - self.t0,
            list(res.notes) + list(self.notes),
            {sid: res.get(sid).suggested_slices(SUGGESTED_SLICES) for sid in self.source_ids},
            {sid: res.get(sid).slice_uncertainty for sid in self.source_ids},
            list(self.skipped_ids),
        )


# --------------------------------------------------------------------------------------------
# annotation-loop helpers for the panel


def mark_slice_labeled(
    volumeNode, segmentationNode, segmentId, axis, index: int, labeled: bool = True
) -> SliceStatus:
    """Mark slice ``index`` along ``axis`` as labeled with its current content (an empty slice
    then tells UniverSeg the structure is absent there), or with ``labeled=False`` unmark an
    empty labeled slice. Only the segment's record (tags) changes, never its voxels."""
    check_segmentation_node(segmentationNode)
    volume = geometry_of(volumeNode)
    a = volume_axis(volume, axis)
    sid = resolve_segment_id(segmentationNode, segmentId)
    segment = segment_of(segmentationNode, sid)
    n = volume.array.shape[a]
    if not 0 <= int(index) < n:
        raise MRMLError(f"slice {index} is outside 0..{n - 1}")
    index = int(index)
    mask = segment_mask(volumeNode, segmentationNode, sid)
    grid = grid_key(volumeNode, segmentationNode)
    status, _ = status_of(sid, segment, mask, a, axis_name(volume, a), grid, strict=True)
    nonempty = set(nonempty_slices(mask, a))
    support = set(status.labeled)
    predicted = {t: slice_hash(mask, a, t) for t in status.predicted}
    if labeled:
        support.add(index)
        predicted.pop(index, None)  # an accepted prediction is the user's label now
    else:
        if index in nonempty and index not in predicted:
            raise MRMLError(f"slice {index} holds painted voxels: erase them to unlabel it")
        support.discard(index)
    rec = Record(
        a, grid, sorted(support), sorted(t for t in support if t not in nonempty), predicted
    )
    set_tags(segment, record_tags(rec))
    return slice_status(volumeNode, segmentationNode, sid, a)


def clear_predictions(volumeNode, segmentationNode, segmentId, undo=None) -> List[int]:
    """Erase the untouched predicted slices of a segment and forget its record (corrected
    slices stay, as painted slices). Returns the slices erased. Needed before propagating
    along another axis. One undo step."""
    check_volume_node(volumeNode)
    check_segmentation_node(segmentationNode)
    sid = resolve_segment_id(segmentationNode, segmentId)
    segment = segment_of(segmentationNode, sid)
    rec = read_record(segment)
    if rec is None or rec.grid != grid_key(volumeNode, segmentationNode):
        return []
    mask = segment_mask(volumeNode, segmentationNode, sid)
    untouched = [
        t
        for t, h in sorted(rec.predicted.items())
        if t < mask.shape[rec.axis] and slice_hash(mask, rec.axis, t) == h
    ]
    code = np.zeros(mask.shape, dtype=np.uint8)
    take = [slice(None)] * 3
    for t in untouched:
        take[rec.axis] = t
        code[tuple(take)] = BACKGROUND
    tags = {TAG_LABELED: None, TAG_PREDICTED: None}
    apply_writes(volumeNode, segmentationNode, [SegmentWrite(sid, code, False, tags, None)], undo)
    return untouched
