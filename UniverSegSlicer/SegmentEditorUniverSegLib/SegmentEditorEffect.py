"""Segment Editor effect "UniverSeg": propagate painted slices, preview, Apply or Cancel.

An auto-complete effect like Slicer's *Fill between slices*: the visible segments' painted
slices are propagated with UniverSeg into a preview; *Apply* writes it as one undo step, honouring
the editor's masking (editable area, editable intensity range) and -- only when *Modify other
segments* is ticked -- its "Modify other segments" mode; *Cancel* leaves the segmentation as it
was. The settings (support size, device, weights, extra support) come from the UniverSeg module,
and the effect shares the module's engines and propagation sessions, so *Update* after a
correction is fast.

All decisions are made in the Qt-free ``UniverSegLogic.mrml.effect`` / ``.panel`` (tested on
slicer-core); this file only connects them to the Segment Editor. Loaded by
``qSlicerSegmentEditorScriptedEffect.setPythonSource`` (module "SegmentEditorUniverSegLib",
class ``SegmentEditorEffect``); it must import without PyTorch.
"""

import os
import sys

import qt
import slicer
import vtk
from SegmentEditorEffects import *  # noqa: F403
from SegmentEditorEffects.AbstractScriptedSegmentEditorAutoCompleteEffect import (
    AbstractScriptedSegmentEditorAutoCompleteEffect,
    ResultPreviewNodeReferenceRole,
)
from slicer.i18n import tr as _


def _addLogicPackageToPath() -> None:
    """``UniverSegLogic`` is installed beside the module (one level up from this folder) or, in a
    source checkout, at the repository top level (two levels up)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isfile(os.path.join(folder, "UniverSegLogic", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return


_addLogicPackageToPath()

# torch-free (checked by Testing/test_packaging.py)
from UniverSegLogic.errors import Cancelled  # noqa: E402
from UniverSegLogic.mrml import effect as effects  # noqa: E402
from UniverSegLogic.mrml import panel  # noqa: E402

EFFECT_NAME = "UniverSeg"  # not translated: modules find effects by name


class SegmentEditorEffect(AbstractScriptedSegmentEditorAutoCompleteEffect):
    """UniverSeg propagation as a Segment Editor auto-complete effect."""

    def __init__(self, scriptedEffect):
        AbstractScriptedSegmentEditorAutoCompleteEffect.__init__(self, scriptedEffect)
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.title = _("UniverSeg")
        self._preview = None  # UniverSegLogic.mrml.effect.PropagationPreview
        self._suggestions = []  # (segment id, slice) to paint next, best first
        self._suggestionIndex = 0
        self._previewMask = None  # the EditMask the preview node shows
        self._computing = False
        self._cancelRequested = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effectsPythonQt

        clonedEffect = effectsPythonQt.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        if os.path.exists(iconPath):
            return qt.QIcon(iconPath)
        return qt.QIcon()

    def helpText(self):
        return "<html>" + _("""Propagate painted slices to the whole structure with UniverSeg<br>.
<p><ul>
<li>Paint the structure on a few slices (any effect), leaving unpainted slices between them.
<li>Click <b>Initialize</b>: every visible segment with painted slices is propagated along the
axis the painted slices lie on, and shown as a preview. Correct a slice and click <b>Update</b>
(or keep <b>Auto-update</b> on): only the slices near the change are recomputed.
<li><b>Apply</b> writes the preview (one undo step); <b>Cancel</b> discards it.
</ul><p>
Painted slices are never changed. The editable area and editable intensity range of
<b>Masking</b> are honoured. Other segments are not modified unless <b>Modify other segments</b>
is ticked (then the Masking section's "Modify other segments" setting applies). Support size,
device, weights and extra support volumes are set in the <b>UniverSeg</b> module.
<p>""")

    # ---------------------------------------------------------------- GUI

    def setupOptionsFrame(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setupOptionsFrame(self)

        self.modifyOthersCheckBox = qt.QCheckBox(_("Modify other segments"))
        self.modifyOthersCheckBox.setToolTip(
            _(
                "Off (default): other segments keep every voxel. On: follow the Masking "
                "section's 'Modify other segments' setting (they lose the voxels the prediction "
                "adds). Propagated segments never erase each other."
            )
        )
        self.scriptedEffect.addOptionsWidget(self.modifyOthersCheckBox)
        self.modifyOthersCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)

        self.maskLabel = qt.QLabel()
        self.maskLabel.wordWrap = True
        self.scriptedEffect.addLabeledOptionsWidget(_("Masking:"), self.maskLabel)

        self.summaryLabel = qt.QLabel()
        self.summaryLabel.wordWrap = True
        self.summaryLabel.textFormat = qt.Qt.RichText
        self.scriptedEffect.addLabeledOptionsWidget(_("Segments:"), self.summaryLabel)

        self.progressBar = qt.QProgressBar()
        self.progressBar.hide()
        self.stopButton = qt.QPushButton(_("Stop"))
        self.stopButton.setToolTip(_("Stop the computation; nothing is changed."))
        self.stopButton.hide()
        self.stopButton.connect("clicked()", self.onStop)
        progressFrame = qt.QHBoxLayout()
        progressFrame.addWidget(self.progressBar)
        progressFrame.addWidget(self.stopButton)
        self.scriptedEffect.addOptionsWidget(progressFrame)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.suggestedSliceButton = qt.QPushButton(_("Go to suggested slice"))
        self.suggestedSliceButton.setToolTip(
            _(
                "Show the slice whose painting (or marking as empty) would improve the preview "
                "most, by UniverSeg's own uncertainty. Each click goes to the next suggestion."
            )
        )
        self.suggestedSliceButton.enabled = False
        self.suggestedSliceButton.connect("clicked()", self.onGoToSuggestedSlice)
        self.scriptedEffect.addOptionsWidget(self.suggestedSliceButton)

        settingsButton = qt.QPushButton(_("UniverSeg settings..."))
        settingsButton.setToolTip(_("Support size, device, weights and extra support volumes."))
        settingsButton.connect("clicked()", lambda: slicer.util.selectModule("UniverSegSlicer"))
        self.scriptedEffect.addOptionsWidget(settingsButton)

    def setMRMLDefaults(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setMRMLDefaults(self)
        self.scriptedEffect.setParameterDefault("ModifyOtherSegments", 0)

    def activate(self):
        self.updateSummary()

    def updateGUIFromMRML(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateGUIFromMRML(self)
        wasBlocked = self.modifyOthersCheckBox.blockSignals(True)
        self.modifyOthersCheckBox.checked = self.modifyOtherSegments()
        self.modifyOthersCheckBox.blockSignals(wasBlocked)
        mask = self.editMask()
        self.maskLabel.text = mask.describe() if mask is not None else ""
        if self._computing:
            for button in (self.previewButton, self.applyButton, self.cancelButton):
                button.setEnabled(False)
            return
        if self._preview is not None:
            segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
            previewed = self._preview.job.segmentationNode
            if segmentationNode is None or segmentationNode.GetID() != previewed.GetID():
                self.reset()  # another segmentation is edited now
            elif mask is not None and mask != self._previewMask and self.getPreviewNode():
                self.showPreview(mask)  # masking changed: show what Apply would write now

    def updateMRMLFromGUI(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateMRMLFromGUI(self)
        self.scriptedEffect.setParameter(
            "ModifyOtherSegments", 1 if self.modifyOthersCheckBox.checked else 0
        )

    # ---------------------------------------------------------------- helpers

    def modifyOtherSegments(self) -> bool:
        if not self.scriptedEffect.parameterDefined("ModifyOtherSegments"):
            return False
        return self.scriptedEffect.integerParameter("ModifyOtherSegments") != 0

    def editMask(self):
        """The editor's masking settings (None without a parameter set node)."""
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        if parameterSetNode is None:
            return None
        return effects.EditMask.from_segment_editor_node(
            parameterSetNode, self.modifyOtherSegments()
        )

    def sourceVolumeNode(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        getter = getattr(parameterSetNode, "GetSourceVolumeNode", None)
        return getter() if getter else parameterSetNode.GetMasterVolumeNode()

    @staticmethod
    def moduleLogic():
        """The UniverSeg module's shared logic (settings, and the ``runner`` the module's panel
        uses too: one run path, shared engines and sessions)."""
        import UniverSegSlicer

        return UniverSegSlicer.UniverSegSlicerLogic.shared()

    def candidateSegmentIds(self, segmentationNode):
        """Visible segments that are not UniverSeg review outputs."""
        rows = panel.segment_rows(segmentationNode)
        display = segmentationNode.GetDisplayNode()
        return [
            r.segment_id
            for r in rows
            if not r.review_output
            and (display is None or display.GetSegmentVisibility(r.segment_id))
        ]

    def inputs(self):
        """(volume, segmentation, module settings, axis, segment ids, statuses)."""
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        volumeNode = self.sourceVolumeNode()
        if segmentationNode is None or volumeNode is None:
            raise ValueError(_("Select a segmentation and a source volume first."))
        settings = self.moduleLogic().getParameterNode()
        candidates = self.candidateSegmentIds(segmentationNode)
        axis = panel.resolve_axis(volumeNode, segmentationNode, settings.axis, candidates or None)
        ids, statuses = effects.effect_segments(volumeNode, segmentationNode, axis, candidates)
        return volumeNode, segmentationNode, settings, axis, ids, statuses

    def updateSummary(self, statuses=None):
        try:
            if statuses is None:
                statuses = self.inputs()[5]
            lines = [f"<b>{s.name}</b> &mdash; {s.summary()}" for s in statuses]
            self.summaryLabel.text = "<br>".join(lines) or _("No visible segment.")
        except Exception as exc:  # a summary must never break the effect
            self.summaryLabel.text = _("Summary unavailable: {error}").format(error=exc)

    def onProgress(self, fraction, message):
        if fraction < 0:
            self.progressBar.maximum = 0
        else:
            self.progressBar.maximum = 100
            self.progressBar.value = int(round(100 * fraction))
        if message:
            self.statusLabel.text = message
        slicer.app.processEvents()

    def cancelRequested(self):
        return self._cancelRequested

    def onStop(self):
        self._cancelRequested = True
        self.stopButton.setEnabled(False)
        self.statusLabel.text = _("Stopping...")

    def setComputing(self, computing):
        self._computing = computing
        self._cancelRequested = False
        self.progressBar.visible = computing
        self.progressBar.maximum = 100
        self.progressBar.value = 0
        self.stopButton.visible = computing
        self.stopButton.setEnabled(computing)
        self.updateGUIFromMRML()

    # ---------------------------------------------------------------- preview / apply / cancel

    def preview(self):
        """Called by the base class's Initialize / Update / auto-update (inside its error
        display): propagate the visible painted segments and show the result as the preview."""
        volumeNode, segmentationNode, settings, axis, ids, statuses = self.inputs()
        self.updateSummary(statuses)
        if not ids:
            raise ValueError(
                _("Paint at least one slice of a visible segment (along the {axis} axis).").format(
                    axis=statuses[0].axis_name if statuses else _("slicing")
                )
            )
        logic = self.moduleLogic()
        self.setComputing(True)
        try:
            weights = logic.prepareRun(
                settings.weights, settings.weightsFile, self.onProgress, self.cancelRequested
            )
            if weights is None:
                self.statusLabel.text = _("Nothing was changed.")
                return
            preview = logic.runner.preview(
                volumeNode,
                segmentationNode,
                ids,
                logic.runOptions(settings, weights, axis),
                supportPairs=logic.supportPairs(settings),
                progress=self.onProgress,
                cancel=self.cancelRequested,
            )
        except Cancelled:
            self.statusLabel.text = _("Stopped: nothing was changed.")
            return
        finally:
            self.setComputing(False)
        self._preview = preview
        self._suggestions = panel.suggested_slices_of(
            {s.key: s.suggested_slices(3) for s in preview.job.result.segments}, ids
        )
        self._suggestionIndex = 0
        self.suggestedSliceButton.enabled = bool(self._suggestions)
        selected = vtk.vtkStringArray()
        for sid in ids:
            selected.InsertNextValue(sid)
        self.selectedSegmentIds = selected  # the base class's auto-update watches these
        self.selectedSegmentModifiedTimes = {}
        segmentation = segmentationNode.GetSegmentation()
        for sid in ids:
            labelmap = segmentation.GetSegment(sid).GetRepresentation(
                slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
            )
            if labelmap:
                self.selectedSegmentModifiedTimes[sid] = labelmap.GetMTime()
        self.showPreview(self.editMask())
        slices = sum(len(v) for v in (s.predicted_slices for s in preview.job.result.segments))
        segments = len(preview.segment_ids)
        self.statusLabel.text = " ".join(
            [
                _(
                    "Preview: {slices} of {segments} along the {axis} axis in {seconds:.1f} s "
                    "({device})."
                ).format(
                    slices=_("1 slice") if slices == 1 else _("{n} slices").format(n=slices),
                    segments=_("1 segment")
                    if segments == 1
                    else _("{n} segments").format(n=segments),
                    axis=preview.job.axis_name,
                    seconds=preview.seconds,
                    device=preview.job.result.device,
                )
            ]
            + list(preview.notes)
        )

    def onGoToSuggestedSlice(self):
        """Show the next suggested slice of the preview in a slice view along its axis."""
        if not self._suggestions or self._preview is None:
            return
        with slicer.util.tryWithErrorDisplay(_("UniverSeg: could not go to the slice.")):
            sid, index = self._suggestions[self._suggestionIndex % len(self._suggestions)]
            self._suggestionIndex += 1
            job = self._preview.job
            sliceNode = panel.pick_slice_view(
                job.volumeNode, job.axis, self.moduleLogic().sliceNodes()
            )
            panel.go_to_slice(job.volumeNode, job.axis, index, sliceNode)
            name = job.segmentationNode.GetSegmentation().GetSegment(sid).GetName()
            self.statusLabel.text = _("Suggested: paint slice {index} of {name}.").format(
                index=index, name=name
            )

    def showPreview(self, mask):
        """(Re)fill the preview node with what Apply would write under ``mask``."""
        opacity, show3D = self.getPreviewOpacity(), self.getPreviewShow3D()
        first = self.getPreviewNode() is None
        previewNode = self._preview.show(mask, self.sourceVolumeNode(), self.getPreviewNode())
        self._previewMask = mask
        if first:
            self.scriptedEffect.setCommonNodeReference(ResultPreviewNodeReferenceRole, previewNode)
            self.scriptedEffect.setCommonParameter(
                "SegmentationResultPreviewOwnerEffect", self.scriptedEffect.name
            )
            previewNode.GetDisplayNode().SetVisibility2DOutline(False)
        self.setPreviewOpacity(opacity)
        self.setPreviewShow3D(show3D)
        self.updateGUIFromMRML()

    def onApply(self):
        if self._preview is None or self.getPreviewNode() is None or self._computing:
            return
        self.delayedAutoUpdateTimer.stop()
        self.observeSegmentation(False)
        try:
            with slicer.util.tryWithErrorDisplay(_("UniverSeg: Apply failed."), waitCursor=True):
                result = self._preview.apply(
                    self.editMask(),
                    self.sourceVolumeNode(),
                    undo=self.scriptedEffect.saveStateForUndo,
                )
        except Exception:
            self.updateGUIFromMRML()  # the preview stays; the segmentation is unchanged
            return
        count = len(result.segment_ids)
        self.statusLabel.text = _("Applied to {segments}.").format(
            segments=_("1 segment") if count == 1 else _("{n} segments").format(n=count)
        )
        self.reset()

    def reset(self):
        self._preview = None
        self._suggestions = []
        if hasattr(self, "suggestedSliceButton"):
            self.suggestedSliceButton.enabled = False
        self._previewMask = None
        AbstractScriptedSegmentEditorAutoCompleteEffect.reset(self)
        self.updateSummary()
