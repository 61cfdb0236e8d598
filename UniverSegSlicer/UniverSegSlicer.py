"""UniverSeg for 3D Slicer: propagate a few painted slices through a volume.

The Slicer module is a thin panel over the Qt-free package ``UniverSegLogic`` (installed beside
this file by the extension; in a source checkout it is the package at the repository top level).
All MRML reading and writing happens in ``UniverSegLogic.mrml``.
"""

import logging
import os
import pathlib
import sys
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
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

try:  # the classes of loadable modules reach the slicer namespace late: import them directly
    from MRMLCorePython import vtkMRMLScalarVolumeNode
    from vtkSlicerSegmentationsModuleMRMLPython import vtkMRMLSegmentationNode
except ImportError:
    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode


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

#: Minimum torch version (first with every API the logic uses).
TORCH_REQUIREMENT = ">=2.1"

AXIS_CHOICES = ["view", "axial", "coronal", "sagittal"]
DEVICE_CHOICES = ["auto", "cpu", "cuda"]
WEIGHTS_CHOICES = ["starter", "official", "file"]
MODE_CHOICES = ["fill", "new"]

SETTINGS_LICENSE_ACCEPTED = "UniverSeg/OfficialWeightsLicenseAccepted"


#
# UniverSegSlicer
#


class UniverSegSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UniverSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["UniverSeg for 3D Slicer contributors"]
        self.parent.helpText = _("""
<p>Paint a structure on a few slices, then let <b>UniverSeg</b> (an in-context 2D segmentation
network, ICCV 2023) segment every slice in between, no training needed.</p>
<p><b>How support slices work.</b> A slice you painted (in Segment Editor) is a <i>labeled</i>
slice: UniverSeg uses the nearest labeled slices above and below each target slice (up to
<i>Support size</i> of them) as examples. Labeled slices are never changed. After a run the
predicted slices are remembered with the segment: a predicted slice you correct becomes a
labeled slice on the next run; untouched predictions are predicted again and never serve as
examples. To say "the structure is absent here", go to that slice and click <i>Mark current
slice as labeled</i> while it is empty. Other loaded volumes with a segmentation that has a
segment of the same name can add examples (<i>Extra support</i>).</p>
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


#
# Parameter node
#


@parameterNodeWrapper
class UniverSegSlicerParameterNode:
    """The panel's state, saved with the scene.

    inputVolume / segmentation - what to propagate; segmentIds - checked segments.
    axis - slicing axis ("view": orientation of the slice view last used).
    supportSize, ensemble, device, weights, weightsFile - UniverSeg settings.
    outputMode - "fill" (same segment) or "new" (review segment).
    supportSegmentations - other segmentations (with their reference volumes) giving examples.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentIds: list[str]
    axis: Annotated[str, Choice(AXIS_CHOICES)] = "view"
    supportSize: Annotated[int, WithinRange(1, 64)] = 2
    ensemble: Annotated[int, WithinRange(1, 8)] = 1
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    weights: Annotated[str, Choice(WEIGHTS_CHOICES)] = "starter"
    weightsFile: pathlib.Path
    outputMode: Annotated[str, Choice(MODE_CHOICES)] = "fill"
    supportSegmentations: list[vtkMRMLSegmentationNode]


#
# UniverSegSlicerWidget
#


class UniverSegSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    SEGMENTATION_EVENTS = (
        "SegmentAdded",
        "SegmentRemoved",
        "SegmentModified",
        "RepresentationModified",
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
        # lists and summaries are refreshed shortly after the last change (painting fires
        # many events; a summary resamples each checked segment)
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(400)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UniverSegSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UniverSegSlicerLogic()

        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.weightsPathLineEdit.nameFilters = [_("Weights (*.pt *.pth)"), _("All files (*)")]
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneChanged)

        self.ui.segmentsList.itemChanged.connect(self.onSegmentItemChanged)
        self.ui.supportList.itemChanged.connect(self.onSupportItemChanged)
        self.ui.markSliceButton.clicked.connect(lambda: self.onMarkSlice(True))
        self.ui.unmarkSliceButton.clicked.connect(lambda: self.onMarkSlice(False))
        self.ui.clearPredictionButton.clicked.connect(self.onClearPrediction)
        self.ui.propagateButton.clicked.connect(self.onPropagate)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self._refreshTimer.timeout.connect(self.refresh)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelRequested = True
        self._refreshTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        event = slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent
        if crosshair and not self.hasObserver(crosshair, event, self.onCursorMoved):
            self.addObserver(crosshair, event, self.onCursorMoved)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        event = slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent
        if crosshair and self.hasObserver(crosshair, event, self.onCursorMoved):
            self.removeObserver(crosshair, event, self.onCursorMoved)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = True
        self.setParameterNode(None)
        self.observeSegmentation(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume
        if not self._parameterNode.segmentation:
            segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if segmentation:
                self._parameterNode.segmentation = segmentation

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
        self.observeSegmentation(p.segmentation if p else None)
        self.updateButtons()
        self._refreshTimer.start()  # lists are rebuilt later, never inside their own signals

    def observeSegmentation(self, segmentationNode) -> None:
        if segmentationNode is self._observedSegmentation:
            return
        if self._observedSegmentation is not None:
            for name in self.SEGMENTATION_EVENTS:
                self.removeObserver(
                    self._observedSegmentation.GetSegmentation(),
                    getattr(slicer.vtkSegmentation, name),
                    self.onSegmentationChanged,
                )
        self._observedSegmentation = segmentationNode
        if segmentationNode is not None:
            for name in self.SEGMENTATION_EVENTS:
                self.addObserver(
                    segmentationNode.GetSegmentation(),
                    getattr(slicer.vtkSegmentation, name),
                    self.onSegmentationChanged,
                )

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
            if self._parameterNode and self._parameterNode.axis == "view":
                self._refreshTimer.start()

    def refresh(self) -> None:
        if self._running:
            return
        self.updateSegmentsList()
        self.updateSupportList()
        self.updateSummaries()
        self.updateButtons()

    def updateSegmentsList(self) -> None:
        p = self._parameterNode
        segmentationNode = p.segmentation if p else None
        rows = []
        if segmentationNode is not None:
            import UniverSegLogic.mrml as mrml

            segmentation = segmentationNode.GetSegmentation()
            ids = [
                segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
            ]
            checked = set(p.segmentIds).intersection(ids)
            if not checked:  # default: every segment that is not a review output
                checked = {i for i in ids if not segmentation.GetSegment(i).HasTag(mrml.TAG_SOURCE)}
            for sid in ids:
                segment = segmentation.GetSegment(sid)
                rows.append((sid, segment.GetName(), sid in checked, tuple(segment.GetColor())))
        signature = (segmentationNode.GetID() if segmentationNode else None, tuple(rows))
        if signature != self._segmentsSignature:
            self._segmentsSignature = signature
            self.fillCheckList(self.ui.segmentsList, rows)

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
        if self._updatingLists or not self._parameterNode:
            return
        self._parameterNode.segmentIds = self.checkedSegmentIds()

    def updateSupportList(self) -> None:
        p = self._parameterNode
        rows = []
        if p is not None:
            chosen = {n.GetID() for n in p.supportSegmentations if n is not None}
            for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
                volume = self.logic.referenceVolumeOf(node)
                if node is p.segmentation or volume is None or volume is p.inputVolume:
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

    def currentSliceNode(self):
        node = (
            slicer.mrmlScene.GetNodeByID(self._lastSliceNodeId) if self._lastSliceNodeId else None
        )
        return node or slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")

    def resolvedAxis(self):
        """Axis to use: the chosen one, or the array axis facing the slice view last used."""
        p = self._parameterNode
        if p.axis != "view":
            return p.axis
        return self.logic.axisOfSliceView(p.inputVolume, self.currentSliceNode())

    def updateSummaries(self) -> None:
        p = self._parameterNode
        if not p or not p.inputVolume or not p.segmentation:
            self.ui.summaryLabel.text = ""
            return
        try:
            axis = self.resolvedAxis()
            lines = []
            for row in range(self.ui.segmentsList.count):
                item = self.ui.segmentsList.item(row)
                if item.checkState() != qt.Qt.Checked:
                    item.setToolTip("")
                    continue
                status = self.logic.sliceStatus(
                    p.inputVolume, p.segmentation, item.data(qt.Qt.UserRole), axis
                )
                item.setToolTip(status.summary())
                lines.append(f"<b>{status.name}</b> &mdash; {status.summary()}")
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
            status = self.logic.markCurrentSlice(
                p.inputVolume,
                p.segmentation,
                ids[0],
                self.resolvedAxis(),
                self.currentSliceNode(),
                labeled,
            )
            self.ui.statusLabel.text = status.summary()
        self._refreshTimer.start()

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

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keep Slicer responsive; Cancel is read between batches

    def setRunning(self, running: bool) -> None:
        self._running = running
        self.ui.progressBar.visible = running
        self.ui.cancelButton.visible = running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.value = 0
        self.updateButtons()

    def onPropagate(self) -> None:
        if self._running:
            return
        p = self._parameterNode
        from UniverSegLogic.core.engine import Cancelled

        self._cancelRequested = False
        self.setRunning(True)
        try:
            with slicer.util.tryWithErrorDisplay(
                _("UniverSeg propagation failed."), waitCursor=False
            ):
                weights = self.logic.prepareRun(p.weights, p.weightsFile, progress=self.onProgress)
                if weights is None or self._cancelRequested:
                    self.ui.statusLabel.text = _("Cancelled: nothing changed.")
                    return
                supportPairs = [
                    (self.logic.referenceVolumeOf(n), n)
                    for n in p.supportSegmentations
                    if n is not None
                ]
                try:
                    result = self.logic.process(
                        p.inputVolume,
                        p.segmentation,
                        self.checkedSegmentIds(),
                        mode=p.outputMode,
                        supportPairs=supportPairs,
                        progress=self.onProgress,
                        cancel=lambda: self._cancelRequested,
                        axis=self.resolvedAxis(),
                        support_size=p.supportSize,
                        ensemble=p.ensemble,
                        device=p.device,
                        weights=weights,
                    )
                except Cancelled:
                    self.ui.statusLabel.text = _("Cancelled: nothing changed.")
                    return
                self.ui.statusLabel.text = _(
                    "Predicted {slices} slices of {segments} segment(s) along the {axis} axis "
                    "in {seconds:.1f} s ({device})."
                ).format(
                    slices=sum(len(v) for v in result.predicted_slices.values()),
                    segments=len(result.source_ids),
                    axis=result.axis_name,
                    seconds=result.seconds,
                    device=result.device,
                )
        finally:
            self.setRunning(False)
            self._refreshTimer.start()


#
# UniverSegSlicerLogic
#


class UniverSegSlicerLogic(ScriptedLoadableModuleLogic):
    """Calls :mod:`UniverSegLogic.mrml`; everything here also works without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return UniverSegSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def referenceVolumeOf(segmentationNode):
        """The volume a segmentation was drawn on (its reference geometry node), if loaded."""
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        node = segmentationNode.GetNodeReference(role) if segmentationNode else None
        return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None

    @staticmethod
    def axisOfSliceView(volumeNode, sliceNode):
        """Array axis of ``volumeNode`` facing ``sliceNode`` (falls back to axial)."""
        import UniverSegLogic.mrml as mrml

        if volumeNode is None or sliceNode is None:
            return "axial"
        m = sliceNode.GetSliceToRAS()
        return mrml.axis_for_slice_normal(volumeNode, [m.GetElement(i, 2) for i in range(3)])

    @staticmethod
    def sliceStatus(volumeNode, segmentationNode, segmentId, axis):
        import UniverSegLogic.mrml as mrml

        return mrml.slice_status(volumeNode, segmentationNode, segmentId, axis)

    def markCurrentSlice(
        self, volumeNode, segmentationNode, segmentId, axis, sliceNode, labeled=True
    ):
        """Mark (or unmark) the slice shown in ``sliceNode`` as labeled for one segment."""
        import UniverSegLogic.mrml as mrml

        if sliceNode is None:
            raise ValueError(_("No slice view found."))
        m = sliceNode.GetSliceToRAS()
        normal = [m.GetElement(i, 2) for i in range(3)]
        volumeAxis = mrml.axis_for_slice_normal(volumeNode, normal)
        geometryAxis = mrml.array_axis(volumeNode, axis)
        if volumeAxis != geometryAxis:
            raise ValueError(
                _(
                    "The slice view {view} does not show slices along the chosen axis: "
                    "use a view with that orientation."
                ).format(view=sliceNode.GetName())
            )
        center = [m.GetElement(i, 3) for i in range(3)]
        index = mrml.slice_index_at(volumeNode, geometryAxis, center)
        return mrml.mark_slice_labeled(
            volumeNode, segmentationNode, segmentId, geometryAxis, index, labeled
        )

    def clearPredictions(self, volumeNode, segmentationNode, segmentIds, undo=None) -> int:
        import UniverSegLogic.mrml as mrml

        return sum(
            len(mrml.clear_predictions(volumeNode, segmentationNode, sid, undo))
            for sid in segmentIds
        )

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
    def ensureTorch() -> bool:
        """Import torch, installing it through the PyTorch extension after the user agrees.
        Returns False when the user declines."""
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                _(
                    "UniverSeg needs the PyTorch extension: install 'PyTorch' from "
                    "the Extensions Manager and restart Slicer."
                )
            ) from None
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "UniverSeg needs the PyTorch Python package, which is not installed yet.\n\n"
                "Install it now? The download is large (up to a few GB with GPU support) "
                "and may take several minutes."
            ),
            windowTitle=_("Install PyTorch"),
        ):
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        with slicer.util.WaitCursor():
            installed = torchLogic.installTorch(
                askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT
            )
        if installed is None:
            raise RuntimeError(_("PyTorch could not be installed (see the Python console)."))
        return True

    @staticmethod
    def useSlicerCache() -> None:
        """Downloaded weights go to Slicer's cache folder (unless UNIVERSEG_CACHE is set)."""
        if not os.environ.get("UNIVERSEG_CACHE"):
            os.environ["UNIVERSEG_CACHE"] = os.path.join(slicer.app.cachePath, "UniverSeg")

    def ensureOfficialWeights(self, progress=None) -> bool:
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
            if progress is not None:
                progress(
                    done / total if total else 0.0,
                    _("Downloading official weights: {mb:.1f} MB").format(mb=done / 1e6),
                )

        weights.official_path(allow_download=True, echo=logging.info, progress=report)
        return True

    def prepareRun(self, weightsChoice, weightsFile=None, progress=None):
        """Dependencies and weights for a run; returns the ``weights`` option, or None when
        the user declined an installation or download."""
        if not self.ensureTorch():
            return None
        if weightsChoice == "official":
            return "official" if self.ensureOfficialWeights(progress) else None
        if weightsChoice == "file":
            path = str(weightsFile or "")
            if not path or path == "." or not os.path.isfile(path):
                raise ValueError(_("Choose a weights file (.pt) first."))
            return path
        return "starter"

    # ------------------------------------------------------------ propagation

    def process(
        self,
        volumeNode,
        segmentationNode,
        segmentIds=None,
        mode="fill",
        supportPairs=(),
        progress=None,
        cancel=None,
        undo="segmenteditor",
        engine=None,
        **options,
    ):
        """Propagate and write into ``segmentationNode`` (see
        ``UniverSegLogic.mrml.propagate_segmentation``). ``undo="segmenteditor"`` makes the run
        one undo step in Segment Editor when it shows this segmentation."""
        import UniverSegLogic.mrml as mrml

        if isinstance(undo, str) and undo == "segmenteditor":
            undo = self.segmentEditorUndo(segmentationNode)
        self.useSlicerCache()
        logging.info("UniverSeg: propagating %s", segmentIds)
        result = mrml.propagate_segmentation(
            volumeNode,
            segmentationNode,
            segmentIds,
            mode,
            supportPairs,
            progress=progress,
            cancel=cancel,
            engine=engine,
            undo=undo,
            **options,
        )
        logging.info(
            "UniverSeg: done in %.1f s on %s (%s)", result.seconds, result.device, result.weights
        )
        return result


#
# UniverSegSlicerTest
#


class UniverSegSlicerTest(ScriptedLoadableModuleTest):
    """End-to-end test in Slicer: CTChest, lungs painted on a few slices from a threshold-made
    reference, propagated with the starter weights, Dice against the reference."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PropagateLungsOnCTChest()

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

    def test_PropagateLungsOnCTChest(self):
        import numpy as np
        import SampleData

        import UniverSegLogic.mrml as mrml

        self.delayDisplay("Loading CTChest")
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

        self.delayDisplay("Propagating with the starter weights")
        logic = UniverSegSlicerLogic()
        self.assertTrue(logic.ensureTorch())
        result = logic.process(
            volumeNode,
            segmentationNode,
            [segmentId],
            mode="fill",
            axis="axial",
            weights="starter",
            device="auto",
        )
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
