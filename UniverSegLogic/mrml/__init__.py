"""MRML bridge: propagate segments of a Slicer segmentation node with UniverSeg (no Qt).

Works with Slicer itself and with the Qt-free ``slicer-core`` package.

Running
    :class:`Runner` is the one run path of the Slicer module, its Segment Editor effect, the
    browser app and the tests: ``prepare`` (read and check, main thread), ``run`` (compute,
    may run in a worker thread; an Apple GPU that lacks an operation falls back to the CPU once,
    with a note), then ``apply`` (write, one undo step) or ``preview`` (the effect's preview).
    A run takes one :class:`~UniverSegLogic.core.propagator.PropagationOptions`, the one source
    of the axis (``auto``: the axis the painted slices lie on), the weights and the device.
    Segments without a labeled slice are skipped with a note; predicted segments never overlap.

Reading
    The volume is read as a KJI array with its *world* IJK-to-RAS matrix (a linear parent transform
    is applied, so "axial" means axial in the views). Each segment is read from its own labelmap
    grid onto the volume's voxel grid with the one rule of :mod:`.gridmap` (parent transforms of
    both nodes included): every painted voxel shows in the volume slice its centre lies in, and
    ties (grids shifted by half a voxel) go the same way as when writing.

Writing
    Nothing is written until every prediction has been computed. The change is expressed on the
    volume grid as a code per voxel (0 keep, 1 background, 2 foreground) and applied on the
    segmentation's own labelmap grid by the same rule (a voxel takes the code of the volume cell
    its centre lies in; kept cells, and voxels a kept cell reads, keep their stored values), so
    voxels outside the changed slices -- the user's labeled slices in particular -- keep their
    stored values bit for bit, whatever the segmentation's geometry. Other segments are never
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

from ..errors import MRMLError
from .job import (
    MODES,
    OUTPUT_SUFFIX,
    MRMLPropagationResult,
    PropagationJob,
    clear_predictions,
    mark_slice_labeled,
)
from .nodes import (
    array_axis,
    axis_for_slice_normal,
    axis_name,
    segment_mask,
    slice_center_ras,
    slice_index_at,
    volume_from_node,
)
from .record import (
    TAG_LABELED,
    TAG_PREDICTED,
    TAG_SOURCE,
    SliceStatus,
    format_slices,
    labeled_slices,
    slice_status,
)
from .runner import Runner, default_options
from .session import SessionStore

__all__ = [
    "MODES",
    "OUTPUT_SUFFIX",
    "TAG_LABELED",
    "TAG_PREDICTED",
    "TAG_SOURCE",
    "MRMLError",
    "MRMLPropagationResult",
    "PropagationJob",
    "Runner",
    "SessionStore",
    "SliceStatus",
    "array_axis",
    "axis_for_slice_normal",
    "axis_name",
    "clear_predictions",
    "default_options",
    "format_slices",
    "labeled_slices",
    "mark_slice_labeled",
    "segment_mask",
    "slice_center_ras",
    "slice_index_at",
    "slice_status",
    "volume_from_node",
]
