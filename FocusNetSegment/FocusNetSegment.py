"""FocusNet "Segment OARs": the 3D Slicer scripted module (Slicer 5.8 or later).

Thin by design: the widget builds the panel, binds signals and shows
messages. Everything else is ``FocusNetSegmentLib.logic.SegmentOARsLogic``
(no Qt), which the test suite runs headless against slicer-core with the real
segmentation subprocess; this file adds only what needs the running
application: the Segment Editor, slice-view jumps, the DICOM plugins and
database, PyTorch's installer and the dialogs. FocusNet never imports torch
in the Slicer process (the PyTorch extension's installer does, once, right
after installing it): inference runs as ``PythonSlicer -m FocusNetCore segment``,
polled by a QTimer; Cancel ends its whole process tree. Click to find runs
``PythonSlicer -m FocusNetCore worker`` the same way (one per reviewed CT).
"""
import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import parameterNodeWrapper  # Slicer 5.4+; 5.8+ is checked at setup
from slicer.util import VTKObservationMixin

# The module's folder is on sys.path; importing the Lib also makes FocusNetCore
# importable from the source tree. Neither imports torch or scipy here.
from FocusNetSegmentLib.logic import SegmentOARsLogic, check_slicer_version
from FocusNetSegmentLib.scene import segment_editor_node

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "FocusNet.term.json")
EDITOR_TAG = "FocusNetSegmentEditor"


def loadTerminology():
    """Make Slicer's terminology selector know our organs' codes."""
    from FocusNetSegmentLib.scene import load_terminology

    try:
        load_terminology(slicer.modules.terminologies.logic(), TERMINOLOGY_FILE)
    except Exception as error:  # a missing context only degrades the selector
        logging.warning(f"FocusNet: {error}")


class FocusNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment OARs (FocusNet)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy", "Terminologies", "Markups"]
        self.parent.contributors = ["FocusNet developers"]
        self.parent.helpText = (
            "Segments 22 head-and-neck organs at risk on CT (FocusNetv2), with standard TG-263 names, colours and "
            "terminology, a timed review panel and export to .seg.nrrd, NIfTI, DICOM SEG and RTSTRUCT. "
            "Needs 3D Slicer 5.8 or later and the PyTorch extension.")
        self.parent.acknowledgementText = "FocusNetv2: Gao et al., Medical Image Analysis 2021."
        slicer.app.connect("startupCompleted()", loadTerminology)


@parameterNodeWrapper
class FocusNetSegmentParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputDirectory: str = ""
    reviewer: str = ""


class FocusNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._afterInstall = None
        self.editor = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.clock = qt.QTimer()
        self.clock.setInterval(1000)
        self.clock.connect("timeout()", self.onClock)
        self.clickTimer = qt.QTimer()
        self.clickTimer.setInterval(50)
        self.clickTimer.connect("timeout()", self.onClickPoll)
        self._clickObservers = []  # (interactor, tag) of the slice views while "Click to place" is on

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        tooOld = check_slicer_version(slicer.app.majorVersion, slicer.app.minorVersion)
        if tooOld:
            self.layout.addWidget(qt.QLabel(tooOld))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FocusNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FocusNetSegmentLogic()
        loadTerminology()
        self.setupSegmentEditor()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.reviewerLineEdit.connect("textChanged(QString)", self.onReviewerChanged)
        self.ui.outputDirectoryButton.connect("directoryChanged(QString)", self.onOutputDirectoryChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateModelInfo)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.acceptAllButton.connect("clicked(bool)", self.onAcceptAll)
        self.ui.finishButton.connect("clicked(bool)", self.onFinish)
        self.ui.clickToPlaceButton.connect("toggled(bool)", self.onClickToPlace)
        self.ui.undoPlaceButton.connect("clicked(bool)", self.onUndoPlace)
        self.ui.manualBaselineCheckBox.connect("toggled(bool)", self.updateButtons)
        self.ui.startManualButton.connect("clicked(bool)", self.onStartManual)
        self.ui.reviewTable.connect("itemSelectionChanged()", self.onRowSelected)
        self.ui.exportSegButton.connect("clicked(bool)", lambda: self.onExport("seg.nrrd"))
        self.ui.exportNiftiButton.connect("clicked(bool)", lambda: self.onExport("nifti"))
        self.ui.exportDicomSegButton.connect("clicked(bool)", lambda: self.onExport("dicomseg"))
        self.ui.exportRtstructButton.connect("clicked(bool)", lambda: self.onExport("rtstruct"))
        self.ui.reviewerLineEdit.text = qt.QSettings().value("FocusNet/reviewer", "")
        self.initializeParameterNode()
        self.updateModelInfo()
        self.updateButtons()
        self.offerPendingSessions()

    def setupSegmentEditor(self):
        """The Segment Editor inside the review panel, so the review table stays
        in view while editing; its own segment list is hidden (one organ list)."""
        self.editor = slicer.qMRMLSegmentEditorWidget()
        self.editor.setMaximumNumberOfUndoStates(10)
        self.editor.setMRMLSegmentEditorNode(segment_editor_node(slicer.mrmlScene, EDITOR_TAG))
        self.editor.setMRMLScene(slicer.mrmlScene)
        self.editor.setSegmentationNodeSelectorVisible(False)
        self.editor.setSourceVolumeNodeSelectorVisible(False)
        for table in slicer.util.findChildren(self.editor, name="SegmentsTableResizableFrame"):
            table.hide()  # (findChild would raise if a Slicer version named it otherwise)
        self.ui.reviewCollapsibleButton.layout().addWidget(self.editor)
        # Effects that extensions register after this panel was built (as Slicer's Segment Editor does).
        self.effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        self.effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)

    def onEffectRegistered(self, *args):
        self.editor.updateEffectList()

    def enter(self):
        if self.logic is not None:
            self.initializeParameterNode()  # the scene may have been closed while the module was hidden
        if self.editor:
            self.editor.installKeyboardShortcuts()

    def exit(self):
        if self.editor:
            self.editor.setActiveEffect(None)
            self.editor.uninstallKeyboardShortcuts()

    def cleanup(self):
        self.timer.stop()
        self.clock.stop()
        self.stopClickToPlace()
        if self.editor:
            self.effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)
        if self.logic:
            self.logic.close()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        self.stopClickToPlace()
        self.logic.close()
        self.timer.stop()
        self.clock.stop()
        self.editor.setSegmentationNode(None)
        self.editor.removeViewObservations()
        self._parameterNode = None
        self.fillReviewTable()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateButtons()

    def initializeParameterNode(self):
        self._parameterNode = FocusNetSegmentParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.ui.inputVolumeSelector.setCurrentNode(self._parameterNode.inputVolume)
        self.ui.outputDirectoryButton.directory = str(self.logic.export_folder(self._parameterNode.outputDirectory))

    def onInputVolumeChanged(self, node):
        if self._parameterNode is not None:
            self._parameterNode.inputVolume = node
        self.updateButtons()

    def onReviewerChanged(self, text):
        qt.QSettings().setValue("FocusNet/reviewer", text)
        if self._parameterNode is not None:
            self._parameterNode.reviewer = text

    def onOutputDirectoryChanged(self, folder):
        if self._parameterNode is not None:
            self._parameterNode.outputDirectory = folder

    def updateButtons(self, *args):
        busy = self.logic.running or self.logic.busy_finishing
        hasVolume = self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.segmentButton.enabled = hasVolume and not self.logic.busy_finishing
        self.ui.startManualButton.enabled = hasVolume and self.ui.manualBaselineCheckBox.checked and not busy
        for button in (self.ui.acceptButton, self.ui.acceptAllButton, self.ui.finishButton):
            button.enabled = self.logic.can_finish and not busy
        self.ui.clickToPlaceButton.enabled = self.logic.can_finish and not busy
        self.ui.undoPlaceButton.enabled = (self.logic.case is not None and self.logic.case.can_undo_place
                                           and not busy)
        for button in (self.ui.exportSegButton, self.ui.exportNiftiButton, self.ui.exportDicomSegButton,
                       self.ui.exportRtstructButton):
            button.enabled = self.logic.can_export and not busy

    def updateModelInfo(self, *args):
        self.ui.modelInfoLabel.text = self.logic.describe_model(self.ui.modelPathLineEdit.currentPath or None)[0]

    def status(self, text):
        self.ui.statusLabel.text = text

    def onSegmentButton(self):
        if self.logic.running:
            self.logic.cancel()
            self._afterInstall = None
            self.status("Cancelled.")
            self.setPolling(False)
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation."):  # no wait cursor over questions
            if self.ensureDependencies(lambda: self.startSegmentation(volume)):
                self.startSegmentation(volume)

    def startSegmentation(self, volume):
        device = ["auto", "cuda", "cpu"][self.ui.deviceComboBox.currentIndex]
        self.logic.start(volume, self.ui.modelPathLineEdit.currentPath or None, device)
        self.ui.progressBar.value = 0
        self.setPolling(True)

    def ensureDependencies(self, then):
        """True when everything is there; else installs (after asking) and
        calls ``then`` once the background pip install has succeeded."""
        state = self.logic.prepare_requirements(slicer.util.confirmOkCancelDisplay, self.installTorch)
        if state == "installing":
            self._afterInstall = then
            self.setPolling(True)
        return state == "ready"

    def installTorch(self, requirement):
        import PyTorchUtils  # the PyTorch extension (the logic reports it missing)

        self.ui.segmentButton.enabled = False  # the installer runs Slicer's event loop while it blocks
        self.status("Installing PyTorch (this can take minutes)...")
        try:
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)
        finally:
            self.updateButtons()

    def setPolling(self, on):
        self.timer.start() if on else self.timer.stop()
        self.ui.segmentButton.text = "Cancel" if on else "Segment OARs"
        self.updateButtons()

    def onPoll(self):
        if self.logic.finishing is not None:
            if not self.logic.busy_finishing:
                self.onFinished()
            return
        job = self.logic.job
        text = self.logic.status_text(self.logic.poll())
        self.ui.progressBar.value = self.logic.progress
        if text:
            self.status(text)
        if self.logic.running:
            return
        self.setPolling(False)
        if job.kind == "install":
            then, self._afterInstall = self._afterInstall, None
            if job.returncode != 0:
                slicer.util.errorDisplay("Installing the requirements failed (offline?).",
                                         detailedText=job.error_text()[-3000:])
            elif then is not None:
                with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
                    then()
        elif not job.cancelled:
            self.loadResult()

    def loadResult(self):
        resume = False
        checkpoint = self.logic.pending_checkpoint(self.logic.volume_node)
        if checkpoint is not None:
            resume = slicer.util.confirmYesNoDisplay(
                "This CT has an unfinished review. Resume it (its times and statuses; the contours are the new "
                "result)? No starts a new review and records the old one as incomplete.")
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            self.logic.load_result(reviewer=self.ui.reviewerLineEdit.text, resume=resume)
            self.openReview()
            self.status("Review the contours: select an organ to edit it; Finish when done.")

    def onStartManual(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("Could not start the manual session."):
            self.logic.start_manual(volume, reviewer=self.ui.reviewerLineEdit.text)
            self.openReview()
            self.status("Contour the organs from scratch; Finish when done.")

    def openReview(self):
        self.logic.session.listeners.append(self.fillReviewTable)
        self.logic.session.on_change_after_finish = self.onChangedAfterFinish
        self.editor.enabled = True
        self.editor.setSegmentationNode(self.logic.segmentation_node)
        self.editor.setSourceVolumeNode(self.logic.volume_node)
        self.fillReviewTable()
        self.clock.start()
        self.updateButtons()

    def fillReviewTable(self):
        rows = self.logic.review_rows()
        self.ui.reviewTable.setRowCount(len(rows))
        for row, values in enumerate(rows):
            for column, value in enumerate(values):  # setText keeps the selection, setItem would not
                item = self.ui.reviewTable.item(row, column)
                item.setText(value) if item else self.ui.reviewTable.setItem(row, column, qt.QTableWidgetItem(value))
        self.updateButtons()

    def selectedOrgan(self):
        rows = self.ui.reviewTable.selectionModel().selectedRows()
        if not rows:
            return None
        return self.ui.reviewTable.item(rows[0].row(), 0).text()

    def onRowSelected(self):
        name = self.selectedOrgan()
        if name is None or self.logic.segmentation_node is None:
            return
        center = self.logic.organ_center_ras(name)
        if center is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)
        self.editor.setCurrentSegmentID(name)

    def onAccept(self):
        with slicer.util.tryWithErrorDisplay("Could not accept the organ."):
            self.logic.accept(self.selectedOrgan())

    def onAcceptAll(self):
        with slicer.util.tryWithErrorDisplay("Could not accept the organs."):
            self.logic.accept_all_unflagged()

    # -- click to find -----------------------------------------------------------------
    def onClickToPlace(self, checked):
        if not checked:
            self.stopClickToPlace()
            return
        organ = self.selectedOrgan()
        try:
            if self.logic.case is None:
                raise ValueError("Segment the CT first: click-to-find works on a review.")
            if organ not in self.logic.case.organs.small_names:
                raise ValueError("Select a small organ in the table first (" +
                                 ", ".join(self.logic.case.organs.small_names) + "); the others are edited "
                                 "with the Segment Editor's tools.")
            self.editor.setActiveEffect(None)  # a click places the organ; it must not paint too
            device = ["auto", "cuda", "cpu"][self.ui.deviceComboBox.currentIndex]
            click = self.logic.start_click_to_find(self.ui.modelPathLineEdit.currentPath or None, device)
        except Exception as error:
            self.ui.clickToPlaceButton.checked = False
            slicer.util.errorDisplay(f"Could not start click-to-find: {error}")
            return
        layoutManager = slicer.app.layoutManager()
        for name in layoutManager.sliceViewNames():
            sliceWidget = layoutManager.sliceWidget(name)
            interactor = sliceWidget.sliceView().interactor()
            tag = interactor.AddObserver(vtk.vtkCommand.LeftButtonPressEvent,
                                         lambda caller, event, w=sliceWidget: self.onSliceClick(w), 1.0)
            self._clickObservers.append((interactor, tag))
        self.clickTimer.start()
        self.status(f"Click on {organ} in a slice view." if click.state == "ready" else
                    "Click-to-find is getting ready (the CT is segmented once more, in the background)...")

    def stopClickToPlace(self):
        for interactor, tag in self._clickObservers:
            interactor.RemoveObserver(tag)
        self._clickObservers = []
        if self.ui is not None and self.ui.clickToPlaceButton.checked:
            self.ui.clickToPlaceButton.checked = False

    def onSliceClick(self, sliceWidget):
        organ = self.selectedOrgan()
        x, y = sliceWidget.sliceView().interactor().GetEventPosition()
        ras = sliceWidget.mrmlSliceNode().GetXYToRAS().MultiplyPoint((x, y, 0, 1))[:3]
        try:
            self.logic.click_to_find(organ, ras)
            self.status(f"Placing {organ}...")
        except Exception as error:
            self.status(f"Click-to-find: {error}")

    def onClickPoll(self):
        for message in self.logic.poll_click_to_find():
            self.status(message)
        self.updateButtons()
        if self.logic.click is None or self.logic.click.state in ("idle", "failed"):
            self.clickTimer.stop()
            self.stopClickToPlace()

    def onUndoPlace(self):
        with slicer.util.tryWithErrorDisplay("Could not undo the placement."):
            organ = self.logic.undo_click_to_find()
            self.status(f"{organ}: placement undone." if organ else "Nothing to undo.")
            self.updateButtons()

    def onClock(self):
        session = self.logic.session
        if session is None or session.finished:
            return
        self.ui.clockLabel.text = (f"Review time: {session.now_s() / 60:.1f} min "
                                   f"(active {session.active_s / 60:.1f} min)")

    def onChangedAfterFinish(self, name):
        self.status(f"{name} was changed after Finish: the change is not in the review's timing record "
                    "(exports take the contours as they are now). Segment again for a new timed review.")

    def onFinish(self):
        self.stopClickToPlace()
        with slicer.util.tryWithErrorDisplay("Could not finish the review.", waitCursor=True):
            self.editor.setActiveEffect(None)
            self.editor.enabled = False  # the finished review is read-only here; changes elsewhere are reported
            self.logic.start_finish()
            self.clock.stop()
            self.status("Finishing: comparing the contours with the AI's...")
            self.timer.start()
            self.updateButtons()

    def onFinished(self):
        call, self.logic.finishing = self.logic.finishing, None
        self.timer.stop()
        self.updateButtons()
        if call.error is not None:
            slicer.util.errorDisplay(f"Could not finish the review: {call.error}")
            return
        self.status(f"Finished: {call.result['wall_s'] / 60:.1f} min recorded in {self.logic.log_path()}")

    def onExport(self, kind):
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            path = self.logic.export(kind, self.ui.outputDirectoryButton.directory, dicom=self.logic.dicomExporter())
            self.status(f"Exported {path}")

    def offerPendingSessions(self):
        from FocusNetSegmentLib.review import ReviewSession, pending_sessions

        for checkpoint in pending_sessions(self.logic.session_folder):
            if slicer.util.confirmYesNoDisplay(f"A review session was interrupted ({checkpoint.name}). Record it as "
                                               "incomplete? (No keeps it: segmenting that CT again offers to "
                                               "resume it.)"):
                ReviewSession.mark_incomplete(checkpoint, self.logic.log_path())


class FocusNetSegmentLogic(SegmentOARsLogic, ScriptedLoadableModuleLogic):
    # SegmentOARsLogic first: ScriptedLoadableModuleLogic.__init__ calls
    # super().__init__() with no argument, which must reach object, not the Lib.
    """FocusNetSegmentLib's logic (tested headless) in Slicer's scene."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        folder = os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "FocusNet")
        SegmentOARsLogic.__init__(self, slicer.mrmlScene, folder, default_export_folder=slicer.app.defaultScenePath)

    def dicomExporter(self):
        from FocusNetSegmentLib.dicomexport import DicomExporter

        return DicomExporter.from_application(slicer)


class FocusNetSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: Modules > Developer Tools > Self Tests > FocusNetSegment."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentPhantom()

    def test_SegmentPhantom(self):
        from FocusNetSegmentLib.logic import phantom_check

        self.delayDisplay("Segmenting a synthetic phantom with the embedded model")
        logic = FocusNetSegmentLogic()
        logic.default_export_folder = slicer.app.temporaryPath
        phantom_check(logic)
        self.delayDisplay("FocusNetSegment self-test passed")
