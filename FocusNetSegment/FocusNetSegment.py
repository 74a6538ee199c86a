"""FocusNet "Segment OARs": the 3D Slicer scripted module (Slicer 5.8 or later).

Bindings only (the humble-object pattern): every decision of the panel is
``FocusNetSegmentLib.controller.PanelController`` (no Qt), which the test
suite drives button by button against slicer-core with the real
subprocesses. Each Qt signal here calls one controller method and renders the
``PanelState`` it returns; :class:`SlicerView` gives the controller what only
the running application has (dialogs, the Segment Editor, slice views,
PyTorch's installer, the DICOM plugins). A check in the test suite keeps
every method of this file to a few statements.

Slicer imports this file at start-up: it imports nothing of FocusNet's work
(numpy, SimpleITK, scipy, FocusNetCore) until the panel is first opened.
FocusNet never imports torch in the Slicer process: inference runs as
``PythonSlicer -m FocusNetCore segment``, click to find as ``PythonSlicer -m
FocusNetCore worker``.
"""
import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget

from FocusNetSegmentLib.startup import check_slicer_version, load_terminology

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "FocusNet.term.json")
EDITOR_TAG = "FocusNetSegmentEditor"
EXPORT_BUTTONS = {"exportSegButton": "seg.nrrd", "exportNiftiButton": "nifti",
                  "exportDicomSegButton": "dicomseg", "exportRtstructButton": "rtstruct"}


def loadTerminology():
    """Make Slicer's terminology selector know our organs' codes."""
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


class SlicerView:
    """The controller's PanelView in the running application."""

    def __init__(self, widget):
        self.widget = widget
        self.clickObservers = []  # (interactor, tag) while "Click to place" is on

    def ask(self, question):
        return slicer.util.confirmYesNoDisplay(question)

    def error(self, text, detail=""):
        # (detailedText=None would show "None" behind a "Show Details..." button)
        slicer.util.errorDisplay(text, **({"detailedText": detail} if detail else {}))

    def jump_to(self, ras):
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)

    def edit(self, segmentationNode, volumeNode):
        self.widget.editor.setSegmentationNode(segmentationNode)
        self.widget.editor.setSourceVolumeNode(volumeNode)

    def select_segment(self, segmentId):
        self.widget.editor.setCurrentSegmentID(segmentId)

    def stop_editing(self):
        self.widget.editor.setActiveEffect(None)

    def watch_slice_clicks(self, onClick):
        layoutManager = slicer.app.layoutManager()
        for name in layoutManager.sliceViewNames():
            sliceWidget = layoutManager.sliceWidget(name)
            interactor = sliceWidget.sliceView().interactor()
            callback = lambda caller, event, w=sliceWidget: self.widget.onSliceClick(w, caller.GetEventPosition())
            self.clickObservers.append((interactor, interactor.AddObserver(vtk.vtkCommand.LeftButtonPressEvent,
                                                                           callback, 1.0)))

    def unwatch_slice_clicks(self):
        for interactor, tag in self.clickObservers:
            interactor.RemoveObserver(tag)
        self.clickObservers = []

    def install_torch(self, requirement):
        import PyTorchUtils  # the PyTorch extension (the controller reports it missing)

        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)

    def remember_reviewer(self, reviewer):
        qt.QSettings().setValue("FocusNet/reviewer", reviewer)

    def show_3d(self, segmentationNode):
        segmentationNode.CreateClosedSurfaceRepresentation()
        layoutManager = slicer.app.layoutManager()
        threeDWidget = layoutManager.threeDWidget(0) if layoutManager.threeDViewCount else None
        if threeDWidget is not None:  # a layout without a 3D view has none
            threeDWidget.threeDView().resetFocalPoint()

    def dicom_exporter(self):
        from FocusNetSegmentLib.dicomexport import DicomExporter

        return DicomExporter.from_application(slicer)


class FocusNetSegmentWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        self.controller, self.ui, self.editor, self.logic = None, None, None, None
        self.sceneObservers, self.rows = [], None
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", lambda: self.render(self.controller.tick()))
        ScriptedLoadableModuleWidget.__init__(self, parent)  # (last: without a parent it calls setup())

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        tooOld = check_slicer_version(slicer.app.majorVersion, slicer.app.minorVersion)
        if tooOld:
            return self.layout.addWidget(qt.QLabel(tooOld))
        self.ui = self.loadPanel()
        self.buildController()
        self.setupSegmentEditor()
        self.connectSignals()
        self.render(self.controller.on_reviewer_changed(self.ui.reviewerLineEdit.text))  # the remembered reviewer

    def buildController(self):
        from FocusNetSegmentLib.controller import PanelController  # FocusNet's work, imported on first use

        self.logic = FocusNetSegmentLogic()  # (what slicer.util.getModuleLogic returns)
        self.controller = PanelController(self.logic, SlicerView(self))

    def loadPanel(self):
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FocusNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        loadTerminology()  # (also when the module was added after Slicer started)
        return slicer.util.childWidgetVariables(uiWidget)

    def connectSignals(self):
        c, ui = self.controller, self.ui
        for signal, widget, handler in (
                ("currentNodeChanged(vtkMRMLNode*)", ui.inputVolumeSelector, c.on_input_changed),
                ("textChanged(QString)", ui.reviewerLineEdit, c.on_reviewer_changed),
                ("directoryChanged(QString)", ui.outputDirectoryButton, c.on_output_folder_changed),
                # (the path edit's own currentPathChanged is not sent for an emptied field)
                ("editTextChanged(QString)", ui.modelPathLineEdit.comboBox(), c.on_model_changed),
                ("currentIndexChanged(int)", ui.deviceComboBox, c.on_device_changed),
                ("toggled(bool)", ui.manualBaselineCheckBox, c.on_manual_toggled),
                ("toggled(bool)", ui.clickToPlaceButton, c.on_click_to_place),
                ("itemSelectionChanged()", ui.reviewTable, lambda: c.on_row_selected(self.selectedOrgan()))):
            widget.connect(signal, lambda *args, h=handler: self.render(h(*args)))
        for name, handler in (("segmentButton", c.on_segment), ("acceptButton", c.on_accept),
                              ("acceptAllButton", c.on_accept_all), ("finishButton", c.on_finish),
                              ("undoPlaceButton", c.on_undo_place), ("startManualButton", c.on_start_manual),
                              ("show3DButton", c.on_show_3d),
                              *((n, lambda kind=k: c.on_export(kind)) for n, k in EXPORT_BUTTONS.items())):
            getattr(ui, name).connect("clicked(bool)", lambda checked=False, h=handler: self.render(h()))
        # Effects that extensions register after this panel was built (as Slicer's Segment Editor does;
        # through a Python function: PythonQt would pass the signal's QString to the C++ slot).
        self.onEffectRegistered = lambda *args: self.editor.updateEffectList()
        slicer.qSlicerSegmentEditorEffectFactory.instance().connect("effectRegistered(QString)",
                                                                    self.onEffectRegistered)
        for event, handler in ((slicer.mrmlScene.StartCloseEvent, c.on_scene_start_close),
                               (slicer.mrmlScene.EndCloseEvent, c.on_scene_end_close)):
            self.sceneObservers.append(slicer.mrmlScene.AddObserver(event, lambda *a, h=handler: self.render(h())))

    def setupSegmentEditor(self):
        """The Segment Editor inside the review panel, its own segment list
        hidden (one organ list: the review table)."""
        from FocusNetSegmentLib.scene import segment_editor_node

        self.editor = slicer.qMRMLSegmentEditorWidget()
        self.editor.setMaximumNumberOfUndoStates(10)
        self.editor.setMRMLSegmentEditorNode(segment_editor_node(slicer.mrmlScene, EDITOR_TAG))
        self.editor.setMRMLScene(slicer.mrmlScene)
        self.hideEditorSelectors()
        self.ui.reviewCollapsibleButton.layout().addWidget(self.editor)
        self.ui.reviewerLineEdit.text = qt.QSettings().value("FocusNet/reviewer", "")  # (connected next)

    def hideEditorSelectors(self):
        self.editor.setSegmentationNodeSelectorVisible(False)
        self.editor.setSourceVolumeNodeSelectorVisible(False)
        for table in slicer.util.findChildren(self.editor, name="SegmentsTableResizableFrame"):
            table.hide()  # (findChild would raise if a Slicer version named it otherwise)

    def render(self, state):
        """Show a PanelState: enabled buttons, texts, table, log; the timer runs while it must."""
        ui = self.ui
        for name, enabled in (("segmentButton", state.segment_enabled), ("startManualButton", state.manual_enabled),
                              ("acceptButton", state.accept_enabled), ("acceptAllButton", state.accept_enabled),
                              ("finishButton", state.finish_enabled), ("clickToPlaceButton", state.click_enabled),
                              ("undoPlaceButton", state.undo_enabled), ("show3DButton", state.show3d_enabled),
                              *((n, state.export_enabled) for n in EXPORT_BUTTONS)):
            getattr(ui, name).enabled = enabled
        self.renderTexts(state)
        if state.rows != self.rows:
            self.fillReviewTable(state.rows)
        self.timer.start() if state.ticking else self.timer.stop()

    def renderTexts(self, state):
        ui = self.ui
        ui.segmentButton.text, ui.statusLabel.text, ui.progressBar.value = (state.segment_text, state.status,
                                                                              state.progress)
        ui.clockLabel.text, ui.modelInfoLabel.text = state.clock, state.model_info
        if self.editor.readOnly == state.editor_enabled:  # read-only also locks the effects' shortcuts
            self.editor.readOnly = not state.editor_enabled
        self.showClickToPlace(state.click_checked)
        if ui.logTextEdit.toPlainText() != "\n".join(state.log):
            ui.logTextEdit.setPlainText("\n".join(state.log))

    def showClickToPlace(self, checked):
        """The toggle shows the controller's state without toggling it again."""
        if self.ui.clickToPlaceButton.checked != checked:
            self.ui.clickToPlaceButton.blockSignals(True)
            self.ui.clickToPlaceButton.checked = checked
            self.ui.clickToPlaceButton.blockSignals(False)

    def fillReviewTable(self, rows):
        table, self.rows = self.ui.reviewTable, rows
        table.setRowCount(len(rows))
        for row, values in enumerate(rows):
            for column, value in enumerate(values):  # setText keeps the selection, setItem would not
                item = table.item(row, column)
                item.setText(value) if item else table.setItem(row, column, qt.QTableWidgetItem(value))

    def selectedOrgan(self):
        rows = self.ui.reviewTable.selectionModel().selectedRows()
        return self.ui.reviewTable.item(rows[0].row(), 0).text() if rows else None

    def onSliceClick(self, sliceWidget, position):
        self.render(self.controller.on_slice_click(sliceWidget.mrmlSliceNode(), position[0], position[1]))

    def enter(self):
        if self.controller is None:
            return
        self.editor.installKeyboardShortcuts()
        self.render(self.controller.on_enter())
        self.ui.inputVolumeSelector.setCurrentNode(self.controller.default_volume())
        self.ui.outputDirectoryButton.directory = self.controller.output_folder_shown()

    def exit(self):
        if self.controller is not None:
            self.editor.uninstallKeyboardShortcuts()
            self.render(self.controller.on_exit())

    def cleanup(self):
        self.timer.stop()
        if self.controller is not None:
            self.controller.on_cleanup()
            for tag in self.sceneObservers:
                slicer.mrmlScene.RemoveObserver(tag)
            self.cleanupSegmentEditor()

    def cleanupSegmentEditor(self):
        """Reload builds a new panel: the old editor's shortcuts, view
        observations and factory connection must not stay behind."""
        self.editor.setActiveEffect(None)
        self.editor.uninstallKeyboardShortcuts()
        self.editor.removeViewObservations()
        slicer.qSlicerSegmentEditorEffectFactory.instance().disconnect("effectRegistered(QString)",
                                                                       self.onEffectRegistered)


def FocusNetSegmentLogic():
    """The module's logic: FocusNetSegmentLib's (tested headless) on Slicer's
    scene, its reviews and study log in Slicer's settings folder. A function,
    not a class, so the logic's imports wait for the first use."""
    from FocusNetSegmentLib.logic import SegmentOARsLogic

    folder = os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "FocusNet")
    return SegmentOARsLogic(slicer.mrmlScene, folder, default_export_folder=slicer.app.defaultScenePath)


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
        phantom_check(logic, idle=slicer.app.processEvents)  # its own session folder; the GUI stays live
        self.delayDisplay("FocusNetSegment self-test passed")
