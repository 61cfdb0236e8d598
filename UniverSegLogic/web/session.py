"""The annotation session of the browser app: one volume, one segmentation, the UniverSeg loop.

It drives a trame-slicer :class:`~trame_slicer.core.SlicerApp` (Slicer's MRML scene and its
Segment Editor logic, no web server), so the page and the plain-Python tests run the same code.
Everything about propagation goes through the MRML bridge's one run path
(:class:`UniverSegLogic.mrml.Runner`, as in the Slicer module and its effect): the job is
prepared on the caller's thread, computed in a worker thread (it touches no MRML node) and written
back on the caller's thread as one step of trame-slicer's undo stack.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import Cancelled, InputError, MRMLError, OutputError, UsageError, one_line
from . import rules
from .uploads import IMAGE_SUFFIXES, UploadLimits, check_upload

#: Colours given to new segments in turn (Slicer's first generic anatomy colours).
PALETTE = (
    (0.50, 0.68, 0.50),
    (0.95, 0.84, 0.57),
    (0.69, 0.48, 0.40),
    (0.44, 0.72, 0.84),
    (0.85, 0.40, 0.42),
    (0.56, 0.49, 0.74),
)
EFFECTS = ("none", "paint", "erase", "scissors")


class UnsavedChanges(UsageError):
    """Opening a file would replace a segmentation whose changes are not saved (nothing was
    changed; the caller asks the user and retries with ``discard_changes=True``)."""


def _effect_types() -> Dict[str, type]:
    from trame_slicer.segmentation import (
        SegmentationEffectErase,
        SegmentationEffectNoTool,
        SegmentationEffectPaint,
        SegmentationEffectScissors,
    )

    return {
        "none": SegmentationEffectNoTool,
        "paint": SegmentationEffectPaint,
        "erase": SegmentationEffectErase,
        "scissors": SegmentationEffectScissors,
    }


def _color_hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb[:3])


@dataclass
class PropagationReport:
    """What a finished run did, for the page's message line."""

    segment_name: str
    axis_name: str
    predicted: int  # slices written
    seconds: float
    device: str
    notes: List[str] = field(default_factory=list)
    #: slices to paint next, best first (UniverSeg's own uncertainty, no ground truth)
    suggested: List[int] = field(default_factory=list)

    def message(self) -> str:
        slices = f"{self.predicted} slice" + ("" if self.predicted == 1 else "s")
        text = (
            f"{self.segment_name}: predicted {slices} along the {self.axis_name} "
            f"axis in {self.seconds:.1f} s ({self.device})"
        )
        if self.suggested:
            text += f"; paint slice {self.suggested[0]} next"
        return "; ".join([text] + list(self.notes))


class AnnotationSession:
    """One user's annotation session on a trame-slicer app.

    ``options``: the :class:`~UniverSegLogic.core.propagator.PropagationOptions` of every run
    (default: :func:`UniverSegLogic.mrml.default_options`, axis ``auto``); runs go through
    :attr:`runner`, the :class:`UniverSegLogic.mrml.Runner` the Slicer module and its effect use
    too (``engines``: the EngineStore it takes engines from); ``out_path`` is the only place
    :meth:`save` writes to (chosen on the command line, never by the page); ``limits`` bound
    what an upload may be (:class:`~UniverSegLogic.web.uploads.UploadLimits`).
    """

    def __init__(
        self,
        slicer_app,
        out_path=None,
        limits: Optional[UploadLimits] = None,
        options=None,
        engines=None,
    ):
        from undo_stack import UndoStack

        from .. import mrml

        self.app = slicer_app
        self.editor = slicer_app.segmentation_editor
        self.scene = slicer_app.scene
        self.out_path = Path(out_path).resolve() if out_path else None
        if self.out_path is not None and not str(self.out_path).lower().endswith(".seg.nrrd"):
            raise UsageError(f"--out {out_path}: the output must be a .seg.nrrd file")
        self.limits = limits or UploadLimits()
        self.options = options if options is not None else mrml.default_options()
        #: the one run path (engines and propagation sessions kept across runs)
        self.runner = mrml.Runner(engines=engines)
        self.volume_node = None
        self.segmentation_node = None
        self.undo_stack = UndoStack(undo_limit=20)
        self.editor.set_undo_stack(self.undo_stack)
        self._upload_dir = tempfile.TemporaryDirectory(prefix="universeg-web-")
        self._cancel = threading.Event()
        self.running = False
        self._unrecorded_changes = False  # changes that are no undo step (slice marks)

    def close(self) -> None:
        """Remove the private upload folder."""
        self._upload_dir.cleanup()

    # ------------------------------------------------------------------------------ loading

    def _new_nodes(self, before) -> List:
        return [
            self.scene.GetNthNode(i)
            for i in range(self.scene.GetNumberOfNodes())
            if self.scene.GetNthNode(i).GetID() not in before
        ]

    def _node_ids(self):
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    def load_image(self, path, discard_changes: bool = False) -> None:
        """Load a volume (NRRD, NIfTI, MetaImage); it replaces the current volume and
        segmentation (a new empty segmentation is created). Nothing changes if it fails, and
        :class:`UnsavedChanges` is raised instead while the segmentation has unsaved changes,
        unless ``discard_changes``."""
        self._check_idle()
        path = Path(path)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        self._check_saved(path.name, discard_changes)
        _preflight_image(path)
        before = self._node_ids()
        try:
            volumes = self.app.io_manager.load_volumes([str(path)])
        except Exception as exc:  # noqa: BLE001 - Slicer's readers raise anything
            volumes, error = [], exc
        else:
            error = None
        volume = volumes[0] if volumes else None
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or not _has_voxels(volume):
            for node in self._new_nodes(before):
                self.scene.RemoveNode(node)
            why = f" ({one_line(error)})" if error else ""
            raise InputError(f"{path.name} could not be read as a scalar volume{why}")
        volume.SetName(_stem(path.name))
        old = [n for n in (self.volume_node, self.segmentation_node) if n is not None]
        for node in old:
            self.scene.RemoveNode(node)
        self.volume_node = volume
        self.segmentation_node = None
        seg = self.editor.create_empty_segmentation_node()
        seg.SetName(volume.GetName() + " segmentation")
        self._activate(seg)

    def load_segmentation(self, path, discard_changes: bool = False) -> None:
        """Load a ``.seg.nrrd`` onto the current volume; it replaces the current segmentation.
        Nothing changes if it fails; :class:`UnsavedChanges` as for :meth:`load_image`."""
        self._check_idle()
        if self.volume_node is None:
            raise InputError("load an image before its segmentation")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"segmentation not found: {path}")
        self._check_saved(path.name, discard_changes)
        _preflight_segmentation(path)
        before = self._node_ids()
        error = None
        try:
            seg = self.editor.load_segmentation_from_file(str(path))
        except Exception as exc:  # noqa: BLE001
            seg, error = None, exc
        if seg is None or not seg.IsA("vtkMRMLSegmentationNode"):
            for node in self._new_nodes(before):
                self.scene.RemoveNode(node)
            why = f" ({one_line(error)})" if error else ""
            raise InputError(f"{path.name} could not be read as a segmentation{why}")
        seg.SetName(_stem(path.name))
        if self.segmentation_node is not None:
            self.scene.RemoveNode(self.segmentation_node)
        self._activate(seg)

    def _activate(self, seg) -> None:
        self.segmentation_node = seg
        self.editor.deactivate_effect()
        self.editor.set_active_segmentation(seg, self.volume_node)
        self.editor.set_surface_representation_enabled(False)
        self.undo_stack.clear()  # a cleared stack is clean: the file as loaded is saved
        self._unrecorded_changes = False

    # ------------------------------------------------------------------------------ unsaved work

    def has_unsaved_changes(self) -> bool:
        """True when the segmentation differs from what was last loaded, saved or downloaded:
        an undo step since then (paint, erase, scissors, a segment added, a propagation, an
        undo or redo past that point) or a slice marked labeled."""
        if self.segmentation_node is None:
            return False
        return self._unrecorded_changes or not self.undo_stack.is_clean()

    def _mark_saved(self) -> None:
        self.undo_stack.set_clean()
        self._unrecorded_changes = False

    def _check_saved(self, replacement: str, discard_changes: bool) -> None:
        if self.has_unsaved_changes() and not discard_changes:
            raise UnsavedChanges(
                f"Opening {replacement} would discard the unsaved changes to "
                f"{self.segmentation_node.GetName()}"
            )

    def upload(self, kind: str, name, content, size=None, discard_changes: bool = False) -> str:
        """Check and load a file sent by the page (``kind`` ``image`` or ``segmentation``).

        The header is checked first (:func:`~UniverSegLogic.web.uploads.check_upload`: one
        self-contained file within :attr:`limits`, complete); then, with unsaved changes and
        without ``discard_changes``, :class:`UnsavedChanges` is raised. The file goes to this
        session's private folder under a checked plain name and is removed after loading.
        Raises :class:`InputError` and changes nothing on any problem."""
        self._check_idle()
        name = check_upload(name, content, kind, self.limits, size)
        if kind == "segmentation" and self.volume_node is None:
            raise InputError("load an image before its segmentation")
        self._check_saved(name, discard_changes)
        path = rules.safe_path(self._upload_dir.name, name)
        try:
            path.write_bytes(bytes(content))
            load = self.load_image if kind == "image" else self.load_segmentation
            load(path, discard_changes=True)  # asked above
        finally:
            if path.exists():
                path.unlink()
        return name

    # ------------------------------------------------------------------------------ segments

    @property
    def segmentation(self):
        """The vtkSegmentation being edited (None before an image is loaded)."""
        return self.segmentation_node.GetSegmentation() if self.segmentation_node else None

    def segment_ids(self) -> List[str]:
        """Ids of the segments, in order."""
        seg = self.segmentation
        if seg is None:
            return []
        return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]

    def segments(self) -> List[dict]:
        """Rows for the page: id, name, colour (``#rrggbb``), active."""
        active = self.editor.get_active_segment_id()
        return [
            {
                "id": sid,
                "name": self.segmentation.GetSegment(sid).GetName(),
                "color": _color_hex(self.segmentation.GetSegment(sid).GetColor()),
                "active": sid == active,
            }
            for sid in self.segment_ids()
        ]

    def add_segment(self, name: str) -> str:
        """Add an empty segment (one undo step) and make it the active one."""
        self._check_idle()
        if self.segmentation is None:
            raise InputError("load an image first")
        name = (name or "").strip()
        if not name:
            raise UsageError("type a name for the new segment")
        if self.segmentation.GetSegmentIdBySegmentName(name):
            raise UsageError(f"a segment named {name!r} exists already")
        color = list(PALETTE[len(self.segment_ids()) % len(PALETTE)])
        return self.editor.add_empty_segment(segment_name=name, segment_color=color)

    def select_segment(self, segment_id: str) -> None:
        """Make ``segment_id`` the segment the effects paint into."""
        if segment_id not in self.segment_ids():
            raise UsageError(f"no segment {segment_id!r}")
        self.editor.set_active_segment_id(segment_id)

    @property
    def active_segment_id(self) -> str:
        return self.editor.get_active_segment_id() or ""

    def set_effect(self, name: str, brush_diameter: Optional[float] = None) -> None:
        """Activate one of Slicer's effects: ``none``, ``paint``, ``erase``, ``scissors``."""
        types = _effect_types()
        if name not in types:
            raise UsageError(f"unknown effect {name!r} (effects: {', '.join(EFFECTS)})")
        if name != "none" and not self.active_segment_id:
            raise UsageError("add or select a segment first")
        effect = self.editor.set_active_effect_type(types[name])
        if brush_diameter is not None and hasattr(effect, "set_brush_diameter"):
            effect.set_brush_diameter(float(brush_diameter))

    def effect_name(self) -> str:
        """The active effect, one of :data:`EFFECTS`."""
        active = self.editor.get_active_effect_name() or ""
        for name, kind in _effect_types().items():
            if active.endswith("." + kind.__name__):
                return name
        return "none"

    def undo(self) -> None:
        """Undo the last edit (paint, erase, scissors, new segment or a whole propagation)."""
        self._check_idle()
        self.undo_stack.undo()

    def redo(self) -> None:
        """Redo the last undone edit."""
        self._check_idle()
        self.undo_stack.redo()

    # ------------------------------------------------------------------------------ status

    def view_position(self, view) -> Tuple[int, Optional[int]]:
        """(array axis facing a trame-slicer slice view, index of the slice it shows or None
        when it shows no slice of the volume)."""
        from .. import mrml

        m = self.scene.GetNodeByID(view.get_view_node_id()).GetSliceToRAS()
        axis = mrml.axis_for_slice_normal(self.volume_node, [m.GetElement(i, 2) for i in range(3)])
        try:
            index = mrml.slice_index_at(
                self.volume_node, axis, [m.GetElement(i, 3) for i in range(3)]
            )
        except MRMLError:
            index = None
        return axis, index

    def slice_count(self, axis: int) -> int:
        """Number of volume slices along array axis ``axis`` (0 when no volume is loaded)."""
        if self.volume_node is None or self.volume_node.GetImageData() is None:
            return 0
        return int(self.volume_node.GetImageData().GetDimensions()[2 - int(axis)])

    def modality(self) -> str:
        """The volume's modality when it came with one (a DICOM ``Modality``), else ``""``."""
        if self.volume_node is None:
            return ""
        return self.volume_node.GetAttribute("DICOM.Modality") or ""

    def go_to_slice(self, view, index: int) -> None:
        """Show slice ``index`` (along the view's axis) in a trame-slicer slice view."""
        from ..mrml import panel

        axis, _ = self.view_position(view)
        node = self.scene.GetNodeByID(view.get_view_node_id())
        panel.go_to_slice(self.volume_node, axis, index, node)

    def statuses(self, axis) -> List:
        """:class:`~UniverSegLogic.mrml.SliceStatus` of every segment that is not a review
        output, along ``axis`` (a name or an array axis)."""
        from .. import mrml

        if self.volume_node is None or self.segmentation is None:
            return []
        out = []
        for sid in self.segment_ids():
            if self.segmentation.GetSegment(sid).HasTag(mrml.TAG_SOURCE):
                continue
            out.append(mrml.slice_status(self.volume_node, self.segmentation_node, sid, axis))
        return out

    def status_lines(self, axis) -> List[str]:
        """One line per segment, e.g. ``right lung: 3 labeled, 24 predicted``."""
        return [rules.status_line(s) for s in self.statuses(axis)]

    def mark_slice(self, axis, index: int, labeled: bool = True):
        """Mark slice ``index`` of the active segment as labeled as it is (empty: the structure
        is absent there), or unmark an empty labeled slice; only the segment's record changes."""
        from .. import mrml

        self._check_idle()
        sid = self._active_for_run()
        status = mrml.mark_slice_labeled(
            self.volume_node, self.segmentation_node, sid, axis, int(index), labeled
        )
        self._unrecorded_changes = True
        return status

    def clear_predictions(self) -> List[int]:
        """Erase the untouched predicted slices of the active segment (one undo step)."""
        from .. import mrml

        self._check_idle()
        sid = self._active_for_run()
        with self._undo_step():
            return mrml.clear_predictions(self.volume_node, self.segmentation_node, sid)

    # ------------------------------------------------------------------------------ propagation

    def _check_idle(self) -> None:
        if self.running:
            raise UsageError("a propagation is running: wait for it or press Cancel")

    def _active_for_run(self) -> str:
        if self.volume_node is None or self.segmentation is None:
            raise InputError("load an image first")
        sid = self.active_segment_id
        if not sid:
            raise UsageError("add or select a segment first")
        return sid

    def _undo_step(self):
        from trame_slicer.segmentation.segmentation_undo_command import (
            SegmentationLabelMapUndoCommand,
        )

        return SegmentationLabelMapUndoCommand.push_state_change(self.editor.active_segmentation)

    def cancel(self) -> None:
        """Ask the running propagation to stop (nothing is written then)."""
        if self.running:
            self._cancel.set()

    def prepare(self, axis=None, view=None):
        """Read the active segment from MRML and check it (caller's thread); returns the job.
        ``axis``: a name, an array axis, or ``auto`` -- the axis the segment's painted slices lie
        on, else the orientation of ``view`` (a trame-slicer slice view), as in the Slicer
        module; None: the session's ``options.axis``."""
        from ..mrml import panel

        self._check_idle()
        sid = self._active_for_run()
        axis = self.options.axis if axis is None else axis
        slice_to_ras = None
        if view is not None:
            slice_to_ras = self.scene.GetNodeByID(view.get_view_node_id()).GetSliceToRAS()
        axis = panel.resolve_axis(
            self.volume_node, self.segmentation_node, axis, [sid], slice_to_ras
        )
        options = replace(self.options, axis=axis)
        return self.runner.prepare(self.volume_node, self.segmentation_node, [sid], options)

    def apply(self, job) -> PropagationReport:
        """Write a computed job into the segmentation as one undo step (caller's thread)."""
        with self._undo_step():
            result = self.runner.apply(job)
        self.editor.active_segmentation.trigger_modified()
        sid = result.source_ids[0]
        return PropagationReport(
            self.segmentation.GetSegment(sid).GetName(),
            result.axis_name,
            len(result.predicted_slices.get(sid, [])),
            result.seconds,
            result.device,
            list(result.notes),
            list(result.suggested_slices.get(sid, [])),
        )

    async def propagate(
        self,
        axis=None,
        progress: Optional[Callable[[float, str], None]] = None,
        view=None,
    ) -> PropagationReport:
        """Propagate the active segment along ``axis`` (see :meth:`prepare`): prepare here,
        compute in a worker thread through the runner (the event loop stays free; Apple's GPU
        falls back to the CPU there), write here. ``progress(fraction, message)`` is called on
        the worker thread. Raises :class:`Cancelled` after :meth:`cancel` (nothing written)."""
        job = self.prepare(axis, view)
        self.running = True
        self._cancel.clear()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.runner.run, job, progress, self._cancel.is_set)
        finally:
            self.running = False
            cancelled = self._cancel.is_set()
            self._cancel.clear()
        if cancelled:  # a cancel that came after the last check still writes nothing
            raise Cancelled("cancelled: nothing changed")
        return self.apply(job)

    # ------------------------------------------------------------------------------ saving

    def _write(self, path: Path) -> None:
        import slicer

        from ..core.atomic import atomic_output

        if self.segmentation_node is None:
            raise InputError("nothing to save: load an image first")
        with atomic_output(str(path)) as tmp:
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(tmp)
            ok = storage.WriteData(self.segmentation_node)
            if not ok or not os.path.getsize(tmp):
                raise OutputError(f"Slicer could not write {path}")

    def save(self) -> Path:
        """Write the segmentation to the ``--out`` path (atomic; names, colours, tags kept)."""
        self._check_idle()
        if self.out_path is None:
            raise UsageError("no --out file was given: use the download")
        self._write(self.out_path)
        self._mark_saved()
        return self.out_path

    def save_bytes(self) -> bytes:
        """The segmentation as ``.seg.nrrd`` bytes (for a browser download); the changes count
        as saved once the bytes are handed over."""
        self._check_idle()
        path = Path(self._upload_dir.name) / "download.seg.nrrd"
        self._write(path)
        try:
            data = path.read_bytes()
        finally:
            path.unlink()
        self._mark_saved()
        return data

    def download_name(self) -> str:
        """File name offered for the download."""
        return rules.download_name(
            self.segmentation_node.GetName() if self.segmentation_node else ""
        )


def _preflight_image(path: Path) -> None:
    """Read the whole image with SimpleITK first: a truncated or malformed file is refused with
    a Python error here, before Slicer's readers (which may load it half or abort) see it."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(f"{path.name} could not be read as an image ({detail})") from None
    if image.GetDimension() != 3:
        raise InputError(f"{path.name} is a {image.GetDimension()}D image: expected a 3D volume")


def _preflight_segmentation(path: Path) -> None:
    """Read the whole ``.seg.nrrd`` with slicerio first: Slicer's segmentation reader aborts the
    process (an uncaught ITK exception) on a truncated file."""
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise InputError(
            f"{path.name} could not be read as a segmentation ({one_line(exc)})"
        ) from None
    if seg["voxels"].ndim not in (3, 4):
        raise InputError(f"{path.name} holds a {seg['voxels'].ndim}D array: not a 3D segmentation")


def _has_voxels(volume) -> bool:
    image = volume.GetImageData()
    return image is not None and image.GetNumberOfPoints() > 0


def _stem(name: str) -> str:
    low = name.lower()
    for s in (".seg.nrrd", ".nii.gz") + IMAGE_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name
