"""UniverSeg for 3D Slicer: propagate a few painted slices through a volume.

The Slicer module is a thin panel over the Qt-free package ``UniverSegLogic`` (installed beside
this file by the extension; in a source checkout it is the package at the repository top level).
All MRML reading and writing happens in ``UniverSegLogic.mrml``: runs go through its ``Runner``
(prepare, run with the fall-back to the CPU, apply or preview), what the panel decides (which
volume, segments, axis and slice view) is in ``UniverSegLogic.mrml.panel``. The module also registers the Segment Editor effect "UniverSeg"
(``SegmentEditorUniverSegLib/SegmentEditorEffect.py``).

Imports at load time never need PyTorch: ``UniverSegLogic.errors``, ``.core.device`` and ``.mrml``
are torch-free (Testing/test_packaging.py checks it); torch is imported only after
:meth:`UniverSegSlicerLogic.ensureTorch` succeeded.
"""

import importlib
import logging
import os
import shutil
import sys
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLogicPackageToPath() -> None:
    """Make ``UniverSegLogic`` importable: beside this file (installed extension) or one level up
    (source checkout, module folder added to Slicer's additional module paths)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "UniverSegLogic", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return


_addLogicPackageToPath()

# torch-free (checked by Testing/test_packaging.py)
from UniverSegSlicerLib import torch_install  # noqa: E402

import UniverSegLogic.mrml as mrml  # noqa: E402
from UniverSegLogic.core import device as devices  # noqa: E402
from UniverSegLogic.errors import Cancelled, UniverSegError  # noqa: E402
from UniverSegLogic.mrml import panel  # noqa: E402

AXIS_CHOICES = [panel.AXIS_AUTO, "axial", "coronal", "sagittal"]
DEVICE_CHOICES = list(devices.DEVICE_NAMES)
#: the fusion of the network with the painted slices (``PropagationOptions.fusion_model``)
FUSION_CHOICES = ["logistic", "learned"]
WEIGHTS_CHOICES = ["starter", "official", "file"]
MODE_CHOICES = ["fill", "new"]

SETTINGS_LICENSE_ACCEPTED = "UniverSeg/OfficialWeightsLicenseAccepted"
#: The Segment Editor effect, relative to this file (Slicer's scripted-effect convention: the
#: folder is the Python module name, the file name the class name).
EFFECT_SOURCE = "SegmentEditorUniverSegLib/SegmentEditorEffect.py"


#
# UniverSegSlicer
#


class UniverSegSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UniverSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["UniverSeg for 3D Slicer contributors"]
        self.parent.helpText = _("""
<p>Paint a structure on a few slices, then let <b>UniverSeg</b> (an in-context 2D segmentation
network, ICCV 2023) segment every slice in between, no training needed.</p>
<p><b>Segment Editor effect.</b> In Segment Editor, the <i>UniverSeg</i> effect (next to
<i>Fill between slices</i>) previews the propagated segments; <i>Apply</i> writes them as one
undo step, <i>Cancel</i> leaves the segmentation as it was. It honours the editor's masking
(editable area, editable intensity range); other segments are left untouched unless you tick
<i>Modify other segments</i>. This module holds the settings the effect uses.</p>
<p><b>How support slices work.</b> A slice you painted is a <i>labeled</i> slice: UniverSeg
uses the nearest labeled slices above and below each target slice (up to <i>Support size</i> of
them) as examples. Labeled slices are never changed. After a run the predicted slices are
remembered with the segment: a predicted slice you correct becomes a labeled slice on the next
run; untouched predictions are predicted again and never serve as examples. To say "the
structure is absent here", show that slice and click <i>Mark current slice as labeled</i> while
it is empty. Other loaded volumes with a segmentation that has a segment of the same name can
add examples (<i>Extra support</i>).</p>
<p><b>Output.</b> <i>fill</i> writes the prediction into the unlabeled slices of the same
segment (one undo step in Segment Editor); <i>new</i> writes "&lt;name&gt; (UniverSeg)"
for review, replaced on every run. Cancel or an error leaves the segmentation unchanged.</p>
<p><b>Weights.</b> <i>Starter</i> weights ship with the extension (Apache-2.0). The
<i>official</i> UniverSeg v1 weights are downloaded on first use after you accept their license
(OpenRAIL++-M, research use only). A local copy can be chosen as a file.</p>
""")
        self.parent.acknowledgementText = _("""
UniverSeg: Butoi, Ortiz, Ma, Sabuncu, Guttag, Dalca. "UniverSeg: Universal Medical Image
Segmentation", ICCV 2023 (https://universeg.csail.mit.edu). This extension reimplements the
network; the official weights remain under their own license.
""")
        # Slicer's convention for scripted effects of extensions: register once the application
        # has started (the Segment Editor's effect factory exists then).
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        """Register the Segment Editor effect "UniverSeg"."""
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), EFFECT_SOURCE)
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


#
# Parameter node
#


@parameterNodeWrapper
class UniverSegSlicerParameterNode:
    """The panel's state, saved with the scene (the Segment Editor effect reads it too).

    inputVolume / segmentation - what to propagate; segmentChoices - segments the user checked
    or unchecked (the others follow the default: every segment that is not a review output).
    axis - slicing axis ("auto": the axis the labeled slices lie on).
    supportSize, ensemble, device, weights, weightsFile - UniverSeg settings.
    fusion - "logistic" (the calibrated rule) or "learned" (the learned fusion: a little more
    accurate, about 1.5x the time; the rule for weights without one).
    outputMode - "fill" (same segment) or "new" (review segment).
    supportSegmentations - other segmentations (with their reference volumes) giving examples.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentChoices: dict[str, bool]
    axis: Annotated[str, Choice(AXIS_CHOICES)] = panel.AXIS_AUTO
    supportSize: Annotated[int, WithinRange(1, 64)] = 2
    ensemble: Annotated[int, WithinRange(1, 8)] = 1
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    weights: Annotated[str, Choice(WEIGHTS_CHOICES)] = "starter"
    weightsFile: str = ""
    fusion: Annotated[str, Choice(FUSION_CHOICES)] = "logistic"
    outputMode: Annotated[str, Choice(MODE_CHOICES)] = "fill"
    supportSegmentations: list[vtkMRMLSegmentationNode]


#
# UniverSegSlicerWidget
#


class UniverSegSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    #: vtkSegmentation events, observed on the segmentation *node* (it re-invokes them and
    #: keeps doing so when a sequence replaces its vtkSegmentation object)
    SEGMENTATION_EVENTS = (
        "SegmentAdded",
        "SegmentRemoved",
        "SegmentModified",
        "SourceRepresentationModified",
    )

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedSegmentation = None
        self._lastSliceNodeId = None
        self._running = False
        self._cancelRequested = False
        self._updatingLists = False
        self._segmentsSignature = None
        self._supportSignature = None
        self._statusCache = {}
        self._suggestions, self._suggestionAxis, self._suggestionIndex = [], 0, 0
        # lists and summaries are refreshed shortly after the last change (painting fires many
        # events; a summary resamples each checked segment)
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(400)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UniverSegSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UniverSegSlicerLogic.shared()

        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.weightsPathLineEdit.nameFilters = [_("Weights (*.pt *.pth)"), _("All files (*)")]
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()

        # scene close resets the panel even while it is hidden; everything else is observed
        # only while the module is shown (enter/exit)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentsList.itemChanged.connect(self.onSegmentItemChanged)
        self.ui.supportList.itemChanged.connect(self.onSupportItemChanged)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self.onWeightsPathChanged)
        self.ui.markSliceButton.clicked.connect(lambda: self.onMarkSlice(True))
        self.ui.unmarkSliceButton.clicked.connect(lambda: self.onMarkSlice(False))
        self.ui.clearPredictionButton.clicked.connect(self.onClearPrediction)
        self.ui.suggestedSliceButton.clicked.connect(self.onGoToSuggestedSlice)
        self.ui.propagateButton.clicked.connect(self.onPropagate)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self._refreshTimer.timeout.connect(self.refresh)

    def cleanup(self) -> None:
        self._cancelRequested = True
        self._refreshTimer.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Developer "Reload": also reload UniverSegLogic (Python keeps imported packages)."""
        self.cleanup()
        panel.forget_modules(("UniverSegLogic", "SegmentEditorUniverSegLib", "UniverSegSlicerLib"))
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent):
            if not self.hasObserver(slicer.mrmlScene, event, self.onSceneChanged):
                self.addObserver(slicer.mrmlScene, event, self.onSceneChanged)
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        event = slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent
        if crosshair and not self.hasObserver(crosshair, event, self.onCursorMoved):
            self.addObserver(crosshair, event, self.onCursorMoved)
        self._refreshTimer.start()

    def exit(self) -> None:
        """Stop observing: nothing is recomputed while the module is not shown."""
        self._refreshTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent):
            if self.hasObserver(slicer.mrmlScene, event, self.onSceneChanged):
                self.removeObserver(slicer.mrmlScene, event, self.onSceneChanged)
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        event = slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent
        if crosshair and self.hasObserver(crosshair, event, self.onCursorMoved):
            self.removeObserver(crosshair, event, self.onCursorMoved)
        self.observeSegmentation(None)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = True
        self.setParameterNode(None)
        self.observeSegmentation(None)
        self._statusCache.clear()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.segmentation:
            segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if segmentation:
                p.segmentation = segmentation
        if not p.inputVolume:
            volume = panel.preselect_volume(slicer.mrmlScene, p.segmentation)
            if volume:
                p.inputVolume = volume

    def setParameterNode(self, inputParameterNode: Optional[UniverSegSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            ):
                self.removeObserver(
                    self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
                )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )
        self.onParameterNodeModified()

    # ---------------------------------------------------------------- state -> GUI

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if self.parent.isEntered:
            self.observeSegmentation(p.segmentation if p else None)
        path = p.weightsFile if p else ""
        if self.ui.weightsPathLineEdit.currentPath != path:
            wasBlocked = self.ui.weightsPathLineEdit.blockSignals(True)
            self.ui.weightsPathLineEdit.currentPath = path
            self.ui.weightsPathLineEdit.blockSignals(wasBlocked)
        self.updateButtons()
        self._refreshTimer.start()  # lists are rebuilt later, never inside their own signals

    def observeSegmentation(self, segmentationNode) -> None:
        if segmentationNode is self._observedSegmentation:
            return
        if self._observedSegmentation is not None:
            for name in self.SEGMENTATION_EVENTS:
                event = getattr(slicer.vtkSegmentation, name)
                if self.hasObserver(self._observedSegmentation, event, self.onSegmentationChanged):
                    self.removeObserver(
                        self._observedSegmentation, event, self.onSegmentationChanged
                    )
        self._observedSegmentation = segmentationNode
        if segmentationNode is not None:
            for name in self.SEGMENTATION_EVENTS:
                event = getattr(slicer.vtkSegmentation, name)
                self.addObserver(segmentationNode, event, self.onSegmentationChanged)

    def onSegmentationChanged(self, caller=None, event=None) -> None:
        if not self._running:
            self._refreshTimer.start()

    def onSceneChanged(self, caller=None, event=None) -> None:
        if not self._running:
            self._refreshTimer.start()

    def onCursorMoved(self, caller, event) -> None:
        xyz = [0.0, 0.0, 0.0]
        sliceNode = caller.GetCursorPositionXYZ(xyz)
        if sliceNode is not None and sliceNode.GetID() != self._lastSliceNodeId:
            self._lastSliceNodeId = sliceNode.GetID()

    def refresh(self) -> None:
        if self._running or not self.parent.isEntered:
            return
        self.updateSegmentsList()
        self.updateSupportList()
        self.updateSummaries()
        self.updateButtons()

    def updateSegmentsList(self) -> None:
        p = self._parameterNode
        segmentationNode = p.segmentation if p else None
        rows = panel.segment_rows(segmentationNode, dict(p.segmentChoices) if p else {})
        signature = (
            segmentationNode.GetID() if segmentationNode else None,
            tuple((r.segment_id, r.name, r.checked, r.color) for r in rows),
        )
        if signature != self._segmentsSignature:
            self._segmentsSignature = signature
            self.fillCheckList(
                self.ui.segmentsList, [(r.segment_id, r.name, r.checked, r.color) for r in rows]
            )

    def fillCheckList(self, listWidget, rows) -> None:
        """Rebuild a checkable list from (data, label, checked[, colour]) rows."""
        self._updatingLists = True
        try:
            listWidget.clear()
            for row in rows:
                item = qt.QListWidgetItem(row[1])
                item.setData(qt.Qt.UserRole, row[0])
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if row[2] else qt.Qt.Unchecked)
                if len(row) > 3:
                    pixmap = qt.QPixmap(12, 12)
                    pixmap.fill(qt.QColor.fromRgbF(*row[3][:3]))
                    item.setIcon(qt.QIcon(pixmap))
                listWidget.addItem(item)
        finally:
            self._updatingLists = False

    @staticmethod
    def checkedData(listWidget):
        """Data of the checked rows of a checkable list."""
        items = [listWidget.item(row) for row in range(listWidget.count)]
        return [it.data(qt.Qt.UserRole) for it in items if it.checkState() == qt.Qt.Checked]

    def checkedSegmentIds(self):
        return self.checkedData(self.ui.segmentsList)

    def onSegmentItemChanged(self, item) -> None:
        # itemChanged also fires for tooltips and icons: only a user's check counts, and only
        # that segment's choice is remembered (segments added later follow the default)
        if self._updatingLists or not self._parameterNode:
            return
        choices = dict(self._parameterNode.segmentChoices)
        sid = item.data(qt.Qt.UserRole)
        checked = item.checkState() == qt.Qt.Checked
        if choices.get(sid) != checked:
            choices[sid] = checked
            self._parameterNode.segmentChoices = choices

    def onWeightsPathChanged(self, path) -> None:
        if self._parameterNode and self._parameterNode.weightsFile != path:
            self._parameterNode.weightsFile = path

    def updateSupportList(self) -> None:
        p = self._parameterNode
        rows = []
        if p is not None:
            chosen = {n.GetID() for n in p.supportSegmentations if n is not None}
            for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
                volume = self.logic.referenceVolumeOf(node)
                if node is p.segmentation or volume is None or volume is p.inputVolume:
                    continue
                if node.GetHideFromEditors():  # e.g. a Segment Editor preview
                    continue
                rows.append(
                    (
                        node.GetID(),
                        f"{node.GetName()}  ({volume.GetName()})",
                        node.GetID() in chosen,
                    )
                )
        if rows != self._supportSignature:
            self._supportSignature = rows
            self.fillCheckList(self.ui.supportList, rows)

    def onSupportItemChanged(self, item) -> None:
        if self._updatingLists or not self._parameterNode:
            return
        nodes = [slicer.mrmlScene.GetNodeByID(i) for i in self.checkedData(self.ui.supportList)]
        self._parameterNode.supportSegmentations = [n for n in nodes if n is not None]

    def updateButtons(self) -> None:
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.segmentation and self.checkedSegmentIds())
        self.ui.propagateButton.enabled = ready and not self._running
        self.ui.propagateButton.toolTip = (
            _("Predict the unlabeled slices of the checked segments")
            if ready
            else _("Select a volume, a segmentation and at least one segment")
        )
        canEdit = bool(p and p.inputVolume and p.segmentation) and not self._running
        for button in (
            self.ui.markSliceButton,
            self.ui.unmarkSliceButton,
            self.ui.clearPredictionButton,
        ):
            button.enabled = canEdit
        self.ui.weightsPathLineEdit.enabled = bool(p and p.weights == "file")
        for widget in (self.ui.inputsCollapsibleButton, self.ui.settingsCollapsibleButton):
            widget.enabled = not self._running

    def lastSliceNode(self):
        if self._lastSliceNodeId:
            return slicer.mrmlScene.GetNodeByID(self._lastSliceNodeId)
        return None

    def resolvedAxis(self):
        """Array axis to use (see ``UniverSegLogic.mrml.panel.resolve_axis``)."""
        p = self._parameterNode
        sliceNode = self.lastSliceNode()
        return panel.resolve_axis(
            p.inputVolume,
            p.segmentation,
            p.axis,
            self.checkedSegmentIds() or None,
            sliceNode.GetSliceToRAS() if sliceNode else None,
        )

    def updateSummaries(self) -> None:
        p = self._parameterNode
        if not p or not p.inputVolume or not p.segmentation:
            self.ui.summaryLabel.text = ""
            return
        try:
            axis = self.resolvedAxis()
            lines = []
            self._updatingLists = True  # setToolTip fires itemChanged
            try:
                for row in range(self.ui.segmentsList.count):
                    item = self.ui.segmentsList.item(row)
                    if item.checkState() != qt.Qt.Checked:
                        item.setToolTip("")
                        continue
                    status = self.logic.sliceStatus(
                        p.inputVolume,
                        p.segmentation,
                        item.data(qt.Qt.UserRole),
                        axis,
                        self._statusCache,
                    )
                    item.setToolTip(status.summary())
                    lines.append(f"<b>{status.name}</b> &mdash; {status.summary()}")
            finally:
                self._updatingLists = False
            self.ui.summaryLabel.text = "<br>".join(lines) or _("No segment checked.")
        except Exception as exc:  # a summary must never break the panel
            self.ui.summaryLabel.text = _("Summary unavailable: {error}").format(error=exc)

    # ---------------------------------------------------------------- actions

    def onMarkSlice(self, labeled: bool) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not mark the slice."), waitCursor=True):
            ids = self.checkedSegmentIds()
            if len(ids) != 1:
                raise ValueError(_("Check exactly one segment to mark a slice for."))
            axis = self.resolvedAxis()
            status = self.logic.markCurrentSlice(
                p.inputVolume, p.segmentation, ids[0], axis, self.lastSliceNode(), labeled
            )
            self.ui.statusLabel.text = status.summary()
        self._refreshTimer.start()

    def onGoToSuggestedSlice(self) -> None:
        """Show the next suggested slice of the last run in a slice view along its axis."""
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not go to the slice."), waitCursor=True):
            if not self._suggestions:
                raise ValueError(_("Propagate first: suggestions come with a run."))
            sid, index = self._suggestions[self._suggestionIndex % len(self._suggestions)]
            self._suggestionIndex += 1
            sliceNode = panel.pick_slice_view(
                p.inputVolume,
                self._suggestionAxis,
                self.logic.sliceNodes(),
                preferred=self.lastSliceNode(),
            )
            panel.go_to_slice(p.inputVolume, self._suggestionAxis, index, sliceNode)
            name = p.segmentation.GetSegmentation().GetSegment(sid).GetName()
            self.ui.statusLabel.text = _(
                "Suggested: paint slice {index} of {name} (or mark it "
                "as labeled if the structure is absent there)."
            ).format(index=index, name=name)

    def onClearPrediction(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not clear the prediction."), waitCursor=True):
            erased = self.logic.clearPredictions(
                p.inputVolume,
                p.segmentation,
                self.checkedSegmentIds(),
                self.logic.segmentEditorUndo(p.segmentation),
            )
            self.ui.statusLabel.text = _("Erased {count} predicted slices.").format(count=erased)
        self._refreshTimer.start()

    def onCancel(self) -> None:
        self._cancelRequested = True
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = _("Cancelling...")

    def cancelRequested(self) -> bool:
        return self._cancelRequested

    def onProgress(self, fraction: float, message: str) -> None:
        """Progress of any step; ``fraction`` < 0: unknown (busy indicator)."""
        if fraction < 0:
            self.ui.progressBar.maximum = 0
        else:
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = int(round(100 * fraction))
        if message:
            self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keep Slicer responsive; Cancel is read between steps

    def setRunning(self, running: bool) -> None:
        self._running = running
        self.ui.progressBar.visible = running
        self.ui.cancelButton.visible = running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.maximum = 100
        self.ui.progressBar.value = 0
        self.updateButtons()

    def onPropagate(self) -> None:
        if self._running:
            return
        p = self._parameterNode
        self._cancelRequested = False
        self.setRunning(True)
        try:
            with slicer.util.tryWithErrorDisplay(
                _("UniverSeg propagation failed."), waitCursor=False
            ):
                try:
                    weights = self.logic.prepareRun(
                        p.weights, p.weightsFile, self.onProgress, self.cancelRequested
                    )
                    if weights is None:
                        self.ui.statusLabel.text = _("Nothing was changed.")
                        return
                    result = self.logic.runner.propagate(
                        p.inputVolume,
                        p.segmentation,
                        self.checkedSegmentIds(),
                        self.logic.runOptions(p, weights, self.resolvedAxis()),
                        mode=p.outputMode,
                        supportPairs=self.logic.supportPairs(p),
                        progress=self.onProgress,
                        cancel=self.cancelRequested,
                        undo=self.logic.segmentEditorUndo(p.segmentation),
                    )
                except Cancelled:
                    self.ui.statusLabel.text = _("Cancelled: nothing changed.")
                    return
                slices = sum(len(v) for v in result.predicted_slices.values())
                segments = len(result.source_ids)
                text = _(
                    "Predicted {slices} of {segments} along the {axis} axis in {seconds:.1f} s "
                    "({device})."
                ).format(
                    slices=_("1 slice") if slices == 1 else _("{n} slices").format(n=slices),
                    segments=_("1 segment")
                    if segments == 1
                    else _("{n} segments").format(n=segments),
                    axis=result.axis_name,
                    seconds=result.seconds,
                    device=result.device,
                )
                logging.info("UniverSeg: %s %s", text, " ".join(result.notes))
                self.ui.statusLabel.text = " ".join([text] + result.notes)
                self._suggestions = panel.suggested_slices_of(
                    result.suggested_slices, result.source_ids
                )
                self._suggestionAxis, self._suggestionIndex = result.axis, 0
                self.ui.suggestedSliceButton.enabled = bool(self._suggestions)
        finally:
            self.setRunning(False)
            self._refreshTimer.start()


#
# UniverSegSlicerLogic
#


class UniverSegSlicerLogic(ScriptedLoadableModuleLogic):
    """Calls :mod:`UniverSegLogic.mrml`; everything here also works without the widget.

    :meth:`shared` is the one instance the module's panel and the Segment Editor effect use, so
    they share one :class:`UniverSegLogic.mrml.Runner` -- its inference engines and propagation
    sessions (a correction followed by Update recomputes only what changed)."""

    _shared = None

    @classmethod
    def shared(cls):
        """The instance the panel and the effect share."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: the one run path (engines and propagation sessions) of the panel and the effect
        self.runner = mrml.Runner()

    def getParameterNode(self):
        return UniverSegSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def referenceVolumeOf(segmentationNode):
        """The volume a segmentation was drawn on (its reference geometry node), if loaded."""
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        node = segmentationNode.GetNodeReference(role) if segmentationNode else None
        return node if panel.is_image_volume(node) else None

    def supportPairs(self, parameterNode):
        """(volume, segmentation) pairs of the extra support segmentations."""
        return [
            (self.referenceVolumeOf(n), n)
            for n in parameterNode.supportSegmentations
            if n is not None and self.referenceVolumeOf(n) is not None
        ]

    @staticmethod
    def sliceStatus(volumeNode, segmentationNode, segmentId, axis, cache=None):
        """Slice status of one segment; ``cache`` (a dict) skips segments that did not change."""
        key = None
        if cache is not None:
            segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
            labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
            key = (
                segmentationNode.GetID(),
                segmentId,
                axis,
                volumeNode.GetID(),
                volumeNode.GetMTime(),
                segment.GetMTime() if segment else 0,
                labelmap.GetMTime() if labelmap else 0,
            )
            if key in cache:
                return cache[key]
        status = mrml.slice_status(volumeNode, segmentationNode, segmentId, axis)
        if cache is not None:
            if len(cache) > 256:
                cache.clear()
            cache[key] = status
        return status

    @staticmethod
    def sliceNodes():
        return list(slicer.util.getNodesByClass("vtkMRMLSliceNode"))

    def markCurrentSlice(
        self, volumeNode, segmentationNode, segmentId, axis, preferredSliceNode=None, labeled=True
    ):
        """Mark (or unmark) the slice shown in a slice view along ``axis`` as labeled."""
        sliceNode = panel.pick_slice_view(
            volumeNode, axis, self.sliceNodes(), preferred=preferredSliceNode
        )
        index = panel.current_slice(volumeNode, axis, sliceNode)
        return mrml.mark_slice_labeled(
            volumeNode, segmentationNode, segmentId, axis, index, labeled
        )

    def clearPredictions(self, volumeNode, segmentationNode, segmentIds, undo=None) -> int:
        """Clear untouched predictions of several segments (one undo step)."""
        erased = panel.clear_predictions_of(volumeNode, segmentationNode, segmentIds, undo)
        return sum(erased.values())

    @staticmethod
    def segmentEditorUndo(segmentationNode):
        """Segment Editor's "save state for undo", when the editor shows this segmentation."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except (AttributeError, RuntimeError):
            return None
        node = editor.segmentationNode()
        if node is None or segmentationNode is None or node.GetID() != segmentationNode.GetID():
            return None
        return editor.saveStateForUndo

    # ------------------------------------------------------------ dependencies and weights

    @staticmethod
    def _pythonSlicer():
        path = shutil.which("PythonSlicer")
        if not path:
            raise UniverSegError(_("PythonSlicer was not found: cannot install PyTorch."))
        return path

    @staticmethod
    def torchBuild(torchLogic):
        """(computation backend, text): the PyTorch build PyTorchUtils (light-the-torch) finds
        compatible with this machine's GPU driver; (None, text) when it cannot tell."""
        try:
            backends = torchLogic.getCompatibleComputationBackends(
                torchVersionRequirement=torch_install.TORCH_REQUIREMENT
            )
        except Exception as exc:  # noqa: BLE001 - the install can still let ltt choose
            logging.warning("UniverSeg: PyTorch build detection failed: %s", exc)
            return None, _("build chosen by light-the-torch")
        if not backends:
            return None, _("build chosen by light-the-torch")
        best = max(backends)
        spec = getattr(best, "local_specifier", None) or str(best)
        driver = ""
        try:
            driver = torchLogic.nvidiaDriverVersionInformation
        except Exception:  # noqa: BLE001
            driver = ""
        text = _("build {build}").format(build=spec)
        if driver:
            text += ", " + _("NVIDIA driver {driver}").format(driver=driver)
        return spec, text

    def ensureTorch(self, progress=None, cancel=None) -> bool:
        """Make sure PyTorch >= the required version is installed, offering to install or
        upgrade it through the PyTorch extension (the build for this machine's GPU driver).
        Returns False when the user declines or a restart is needed first."""
        check = torch_install.check_torch()
        if check.ok:
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise UniverSegError(
                _(
                    "UniverSeg needs the PyTorch extension: install 'PyTorch' from "
                    "the Extensions Manager and restart Slicer."
                )
            ) from None
        question = (
            _("UniverSeg needs the PyTorch Python package, which is not installed yet.")
            if check.version is None
            else _("{problem}.").format(problem=check.message)
        )
        question += "\n\n" + _(
            "Install PyTorch {requirement} now? The download is large (up to a few GB with GPU "
            "support) and may take several minutes; you can stop it until the installation "
            "itself starts."
        ).format(requirement=torch_install.TORCH_REQUIREMENT)
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install PyTorch")):
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()

        def report(message):
            if progress is not None:
                progress(-1.0, message)

        report(_("Finding the PyTorch build for this computer..."))
        backend, buildText = self.torchBuild(torchLogic)
        logging.info(
            "UniverSeg: installing PyTorch %s (%s)", torch_install.TORCH_REQUIREMENT, buildText
        )
        command = [
            self._pythonSlicer(),
            "-m",
            "light_the_torch",
            "install",
            f"torch{torch_install.TORCH_REQUIREMENT}",
        ]
        if backend and backend != "cpu":
            command.append(f"--pytorch-computation-backend={backend}")
        torch_install.run_install(
            command,
            progress=lambda m: report(
                _("PyTorch ({build}): {step}").format(build=buildText, step=m)
            ),
            cancel=cancel,
            poll=slicer.app.processEvents,
        )
        if "torch" in sys.modules:  # an older torch is loaded in this process
            if slicer.util.confirmOkCancelDisplay(
                _("PyTorch was updated. Restart Slicer now to use it?"),
                windowTitle=_("Restart required"),
            ):
                slicer.util.restart()
            return False
        importlib.invalidate_caches()
        check = torch_install.check_torch()
        if not check.ok:
            raise UniverSegError(
                _("PyTorch installation did not succeed: {problem}").format(problem=check.message)
            )
        return True

    @staticmethod
    def useSlicerCache() -> None:
        """Downloaded weights go to Slicer's cache folder (unless UNIVERSEG_CACHE is set)."""
        if not os.environ.get("UNIVERSEG_CACHE"):
            os.environ["UNIVERSEG_CACHE"] = os.path.join(slicer.app.cachePath, "UniverSeg")

    def ensureOfficialWeights(self, progress=None, cancel=None) -> bool:
        """Download and verify the official weights after the user accepts their license."""
        self.useSlicerCache()
        from UniverSegLogic.core import weights

        path = weights.cache_dir() / weights.OFFICIAL_FILENAME
        if path.is_file():
            return True
        settings = qt.QSettings()
        if not slicer.util.toBool(settings.value(SETTINGS_LICENSE_ACCEPTED, False)):
            if not slicer.util.confirmOkCancelDisplay(
                weights.OFFICIAL_LICENSE_NOTICE + "\n\n" + _("Download them now (about 5 MB)?"),
                windowTitle=_("Official UniverSeg weights"),
            ):
                return False
            settings.setValue(SETTINGS_LICENSE_ACCEPTED, True)

        def report(done, total):
            if cancel is not None and cancel():
                raise Cancelled("download cancelled")
            if progress is not None:
                progress(
                    done / total if total else -1.0,
                    _("Downloading official weights: {mb:.1f} MB").format(mb=done / 1e6),
                )

        weights.official_path(allow_download=True, echo=logging.info, progress=report)
        return True

    def prepareRun(self, weightsChoice, weightsFile=None, progress=None, cancel=None):
        """Dependencies and weights for a run; returns the ``weights`` option, or None when the
        user declined an installation or download (raises ``Cancelled`` when stopped)."""
        self.useSlicerCache()
        if not self.ensureTorch(progress, cancel):
            return None
        if weightsChoice == "official":
            return "official" if self.ensureOfficialWeights(progress, cancel) else None
        if weightsChoice == "file":
            path = str(weightsFile or "")
            if not path or not os.path.isfile(path):
                raise UniverSegError(_("Choose a weights file (.pt) first."))
            return path
        return "starter"

    # ------------------------------------------------------------ propagation

    @staticmethod
    def runOptions(parameterNode, weights, axis):
        """The one :class:`PropagationOptions` of a run, from the module's settings (the panel and
        the effect both use it): ``weights`` from :meth:`prepareRun`, ``axis`` resolved by the
        caller (``UniverSegLogic.mrml.panel.resolve_axis``)."""
        from UniverSegLogic.core.propagator import PropagationOptions

        return PropagationOptions(
            axis=axis,
            support_size=parameterNode.supportSize,
            ensemble=parameterNode.ensemble,
            device=parameterNode.device,
            weights=weights,
            fusion_model=parameterNode.fusion,
        )


#
# UniverSegSlicerTest
#


class UniverSegSlicerTest(ScriptedLoadableModuleTest):
    """End-to-end test in Slicer: CTChest, lungs painted on a few slices from a threshold-made
    reference, propagated with the starter weights, Dice against the reference; then the same
    through the Segment Editor effect's logic (preview, apply, undo)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PropagateLungsOnCTChest()
        self.setUp()
        self.test_EffectPreviewApplyUndo()

    @staticmethod
    def lungReference(volumeNode, axis):
        """Lungs: the two largest air-like components (-950..-400 HU) that do not touch the
        in-plane border of the slices along ``axis`` (air outside the body does)."""
        import numpy as np
        import SimpleITK as sitk

        hu = slicer.util.arrayFromVolume(volumeNode)
        air = sitk.GetImageFromArray(((hu > -950) & (hu < -400)).astype(np.uint8))
        labels = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(air)))
        planes = np.moveaxis(labels, axis, 0)
        border = set(
            np.unique(
                np.concatenate(
                    [
                        planes[:, 0].ravel(),
                        planes[:, -1].ravel(),
                        planes[:, :, 0].ravel(),
                        planes[:, :, -1].ravel(),
                    ]
                )
            )
        )
        keep = [v for v in range(1, 6) if v not in border]
        return np.isin(labels, keep[:2])

    def paintedLungs(self):
        import numpy as np
        import SampleData

        volumeNode = SampleData.SampleDataLogic().downloadSample("CTChest")
        axis = mrml.array_axis(volumeNode, "axial")
        reference = self.lungReference(volumeNode, axis)
        self.assertGreater(reference.sum(), 10000)
        present = [int(i) for i in np.flatnonzero(np.moveaxis(reference, axis, 0).any(axis=(1, 2)))]
        painted = present[::12]
        labels = np.zeros_like(reference)
        take = [slice(None)] * 3
        for k in painted:
            take[axis] = k
            labels[tuple(take)] = reference[tuple(take)]
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "lungs")
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            labels.astype(np.uint8), segmentationNode, segmentId, volumeNode
        )
        return volumeNode, segmentationNode, segmentId, axis, reference, labels, painted

    def test_PropagateLungsOnCTChest(self):
        import numpy as np

        self.delayDisplay("Loading CTChest")
        volumeNode, segmentationNode, segmentId, axis, reference, labels, painted = (
            self.paintedLungs()
        )
        take = [slice(None)] * 3
        self.delayDisplay("Propagating with the starter weights")
        logic = UniverSegSlicerLogic.shared()
        self.assertTrue(logic.ensureTorch())
        self.assertEqual(
            panel.resolve_axis(volumeNode, segmentationNode, "auto", [segmentId]), axis
        )
        options = logic.runOptions(logic.getParameterNode(), "starter", "axial")
        result = logic.runner.propagate(volumeNode, segmentationNode, [segmentId], options)
        self.assertEqual(result.labeled_slices[segmentId], painted)

        out = (
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0
        )
        for k in painted:  # labeled slices untouched
            take[axis] = k
            self.assertTrue(np.array_equal(out[tuple(take)], labels[tuple(take)]))
        predicted = result.predicted_slices[segmentId]
        self.assertGreater(len(predicted), len(painted))
        take[axis] = predicted
        a, b = out[tuple(take)], reference[tuple(take)]
        dice = 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
        self.delayDisplay(f"Dice on {len(predicted)} predicted slices: {dice:.3f}")
        self.assertGreater(dice, 0.85)

        status = mrml.slice_status(volumeNode, segmentationNode, segmentId, "axial")
        self.assertEqual(status.labeled, painted)
        self.assertEqual(status.predicted, predicted)
        self.delayDisplay("Test passed")

    def test_EffectPreviewApplyUndo(self):
        import numpy as np

        volumeNode, segmentationNode, segmentId, axis, reference, labels, painted = (
            self.paintedLungs()
        )
        logic = UniverSegSlicerLogic.shared()
        self.assertTrue(logic.ensureTorch())
        self.delayDisplay("Segment Editor effect: preview")
        before = slicer.util.arrayFromSegmentBinaryLabelmap(
            segmentationNode, segmentId, volumeNode
        ).copy()
        options = logic.runOptions(logic.getParameterNode(), "starter", "axial")
        preview = logic.runner.preview(volumeNode, segmentationNode, [segmentId], options)
        previewNode = preview.show()
        self.assertTrue(
            np.array_equal(
                slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode),
                before,
            )
        )
        history = slicer.vtkSegmentationHistory()
        history.SetSegmentation(segmentationNode.GetSegmentation())
        preview.apply(undo=history)
        self.assertIsNone(previewNode.GetScene())
        self.assertEqual(history.GetNumberOfStates(), 1)
        self.assertTrue(history.RestorePreviousState())
        after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertTrue(np.array_equal(after, before))
        self.delayDisplay("Test passed")
