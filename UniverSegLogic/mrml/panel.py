"""What the Slicer module's panel and the Segment Editor effect decide, without Qt.

The scripted module (``UniverSegSlicer.py``) and the effect (``SegmentEditorUniverSegLib``) stay
thin: which volume and segments to preselect, which slicing axis and slice view to use, clearing
predictions as one undo step, the inference engines they share (with progress and cancel while
PyTorch and the model load) and the fall-back from Apple's GPU to the CPU live here, tested on
real MRML through slicer-core.

Importing this module never imports torch (the engine is built inside :meth:`EngineCache.get`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core.device import MPS_FALLBACK_MESSAGE, choose_device, is_mps_unsupported
from ..errors import Cancelled, MRMLError
from .job import clear_predictions
from .nodes import (
    _geometry_of,
    _resolve_axis,
    infer_axis,
    slice_view_axis,
    slice_view_index,
)
from .record import TAG_SOURCE, _get_tag, _read_record

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

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
        review = _get_tag(segment, TAG_SOURCE) is not None
        checked = bool(choices.get(sid, not review))
        rows.append(SegmentRow(sid, segment.GetName(), checked, tuple(segment.GetColor()), review))
    return rows


# --------------------------------------------------------------------------------------------
# slicing axis and slice views


AXIS_AUTO = "auto"


def resolve_axis(
    volumeNode, segmentationNode, axis, segmentIds=None, slice_to_ras=None, default="axial"
) -> int:
    """The array axis to propagate along. ``axis``: a name / 0-2, or ``"auto"``: the axis the
    labels imply (:func:`~UniverSegLogic.mrml.nodes.infer_axis`), else the orientation of the
    given slice view, else ``default``."""
    if axis != AXIS_AUTO:
        return _resolve_axis(_geometry_of(volumeNode), axis)
    if segmentationNode is not None:
        inferred = infer_axis(volumeNode, segmentationNode, segmentIds)
        if inferred is not None:
            return inferred
    if slice_to_ras is not None:
        return slice_view_axis(volumeNode, slice_to_ras)
    return _resolve_axis(_geometry_of(volumeNode), default)


def pick_slice_view(volumeNode, axis, sliceNodes: Sequence, preferred=None):
    """The slice node to take "the current slice" from: ``preferred`` (the view last used) when
    it shows slices along ``axis``, else the first of ``sliceNodes`` that does; None if none."""
    a = _resolve_axis(_geometry_of(volumeNode), axis)
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
        and _read_record(segmentation.GetSegment(sid)) is not None
    ]
    if recorded and undo is not None:
        from .writing import _call_undo

        _call_undo(undo)
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


# --------------------------------------------------------------------------------------------
# engines


class EngineCache:
    """Inference engines the module and the effect share, one per (weights, device), built with
    progress and cancel between the slow steps (import PyTorch, read and check the weights,
    move the model to the device). After Apple's GPU failed once, ``auto`` means the CPU."""

    def __init__(self):
        self._engines: Dict[Tuple[str, str], Tuple[object, str]] = {}
        self.mps_failed = False

    def device_for(self, requested: str) -> str:
        """The device ``requested`` resolves to now (imports torch)."""
        import torch

        from ..core.device import torch_backends

        backends = torch_backends(torch)
        if self.mps_failed and (requested or "auto").lower() == "auto":
            backends["mps"] = False
        return choose_device(requested, **backends)

    def get(
        self,
        weights: str = "starter",
        device: str = "auto",
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ):
        """(engine, description of the weights) for ``weights`` on ``device``."""

        def step(message: str) -> None:
            if cancel is not None and cancel():
                raise Cancelled("cancelled while loading the model")
            if progress is not None:
                progress(0.0, message)

        if "torch" not in sys.modules:
            # unsupported MPS operations run on the CPU instead of failing (read at import)
            os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
            step("Loading PyTorch (first run only)...")
        dev = self.device_for(device)
        key = (str(weights), dev)
        if key not in self._engines:
            from ..core.engine import InferenceEngine
            from ..core.weights import build_model, load_weights

            step("Reading the weights...")
            loaded = load_weights(weights)
            step(f"Loading the model on {dev}...")
            engine = InferenceEngine(build_model(loaded, "cpu"), dev)
            step("Model ready")
            self._engines[key] = (engine, loaded.description)
        return self._engines[key]

    def clear(self) -> None:
        """Drop every engine (frees GPU memory)."""
        self._engines.clear()


def run_with_cpu_fallback(
    make_job: Callable[[object], object],
    engines: EngineCache,
    weights: str,
    device: str,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    notes: Optional[List[str]] = None,
):
    """Build the engine, ``make_job(engine)`` and run it; if it fails on Apple's GPU because an
    operation is not supported there, run it again on the CPU and add one note saying so.
    Returns (job, description of the weights)."""
    engine, description = engines.get(weights, device, progress, cancel)
    job = make_job(engine)
    try:
        job.run(progress, cancel)
    except Exception as exc:  # noqa: BLE001 - only the MPS case is handled, the rest re-raised
        if getattr(engine, "device", "") != "mps" or not is_mps_unsupported(exc):
            raise
        engines.mps_failed = True
        if notes is not None:
            notes.append(MPS_FALLBACK_MESSAGE)
        engine, description = engines.get(weights, "cpu", progress, cancel)
        job = make_job(engine)
        job.run(progress, cancel)
    return job, description
