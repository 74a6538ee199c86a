"""FocusNet "Segment OARs": the 3D Slicer scripted module.

Thin by design: the widget binds controls and shows progress; the logic calls
FocusNetSegmentLib (MRML, no Qt), which is tested headless. Inference runs
in a separate process (``PythonSlicer -m FocusNetCore segment --progress
json``) polled by a QTimer, so the GUI never freezes and Cancel kills the
whole process tree. torch is never imported in the Slicer process.
"""
import os
import shutil
import sys
import tempfile
import time

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


class FocusNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment OARs (FocusNet)"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["FocusNet developers"]
        self.parent.helpText = (
            "Segments 22 head-and-neck organs at risk on CT (FocusNetv2), with standard TG-263 names, colours and "
            "terminology, a timed review panel and export to .seg.nrrd, NIfTI, DICOM SEG and RTSTRUCT.")
        self.parent.acknowledgementText = "FocusNetv2: Gao et al., Medical Image Analysis 2021."


@parameterNodeWrapper
class FocusNetSegmentParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    modelPath: str = ""
    device: str = "auto"
    outputDirectory: str = ""
    reviewer: str = ""


class FocusNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.clock = qt.QTimer()
        self.clock.setInterval(1000)
        self.clock.connect("timeout()", self.onClock)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FocusNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FocusNetSegmentLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateModelInfo)
        self.ui.acceptAllButton.connect("clicked(bool)", self.onAcceptAll)
        self.ui.finishButton.connect("clicked(bool)", self.onFinish)
        self.ui.startManualButton.connect("clicked(bool)", self.onStartManual)
        self.ui.reviewTable.connect("cellClicked(int,int)", self.onRowSelected)
        self.ui.exportSegButton.connect("clicked(bool)", lambda: self.onExport("seg.nrrd"))
        self.ui.exportNiftiButton.connect("clicked(bool)", lambda: self.onExport("nifti"))
        self.ui.exportDicomSegButton.connect("clicked(bool)", lambda: self.onExport("dicomseg"))
        self.ui.exportRtstructButton.connect("clicked(bool)", lambda: self.onExport("rtstruct"))
        self.initializeParameterNode()
        self.updateModelInfo()
        self.offerPendingSessions()

    def cleanup(self):
        self.timer.stop()
        self.clock.stop()
        if self.logic:
            self.logic.cancel()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, parameterNode):
        self._parameterNode = parameterNode
        if parameterNode:
            self.ui.inputVolumeSelector.setCurrentNode(parameterNode.inputVolume)
            self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                lambda node: setattr(self._parameterNode, "inputVolume", node))

    # -- actions ---------------------------------------------------------------
    def updateModelInfo(self, *args):
        with slicer.util.tryWithErrorDisplay("Could not read the model bundle.", waitCursor=True):
            self.ui.modelInfoLabel.text = self.logic.describeModel(self.ui.modelPathLineEdit.currentPath or None)

    def onSegmentButton(self):
        if self.logic.running:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelled."
            self.resetSegmentButton()
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            slicer.util.errorDisplay("Select the CT to segment.")
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if not self.logic.ensureDependencies(confirm=slicer.util.confirmOkCancelDisplay):
                return
            device = ["auto", "cuda", "cpu"][self.ui.deviceComboBox.currentIndex]
            self.logic.start(volume, self.ui.modelPathLineEdit.currentPath or None, device)
            self.ui.segmentButton.text = "Cancel"
            self.ui.progressBar.value = 0
            self.timer.start()

    def resetSegmentButton(self):
        self.timer.stop()
        self.ui.segmentButton.text = "Segment OARs"

    def onPoll(self):
        for event in self.logic.poll():
            self.ui.progressBar.value = int(100 * event.fraction)
            self.ui.statusLabel.text = f"{event.label}: {event.message}"
        if self.logic.running:
            return
        self.resetSegmentButton()
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            self.logic.loadResult(reviewer=self._parameterNode.reviewer if self._parameterNode else "")
            self.fillReviewTable()
            self.clock.start()
            self.ui.statusLabel.text = "Review the contours; Finish when done."

    def onStartManual(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            slicer.util.errorDisplay("Select the CT to contour.")
            return
        with slicer.util.tryWithErrorDisplay("Could not start the manual session."):
            self.logic.startManual(volume, reviewer=self._parameterNode.reviewer if self._parameterNode else "")
            self.fillReviewTable()
            self.clock.start()

    def fillReviewTable(self):
        session = self.logic.session
        table = self.ui.reviewTable
        table.setRowCount(len(session.states))
        results = {r["name"]: r for r in (self.logic.organResults or [])}
        for row, (name, state) in enumerate(session.states.items()):
            result = results.get(name, {})
            values = [name, state.status, f"{result.get('volume_cc', 0.0):.2f}",
                      "" if result.get("confidence") is None else f"{result['confidence']:.2f}", "; ".join(state.flags)]
            for column, value in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(value))

    def onRowSelected(self, row, column):
        name = self.ui.reviewTable.item(row, 0).text()
        self.logic.focusOrgan(name)

    def onAcceptAll(self):
        if self.logic.session:
            self.logic.session.accept_all_unflagged()
            self.fillReviewTable()

    def onClock(self):
        session = self.logic.session
        if session is None:
            return
        self.ui.clockLabel.text = f"Review time: {session.now_s() / 60:.1f} min (active {session.active_s / 60:.1f} min)"
        self.fillReviewTable()

    def onFinish(self):
        with slicer.util.tryWithErrorDisplay("Could not finish the review.", waitCursor=True):
            record = self.logic.finish()
            self.clock.stop()
            self.ui.statusLabel.text = f"Finished: {record['wall_s'] / 60:.1f} min recorded in {self.logic.logPath()}"

    def onExport(self, kind):
        folder = self.ui.outputDirectoryButton.directory
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            path = self.logic.export(kind, folder)
            self.ui.statusLabel.text = f"Exported {path}"

    def offerPendingSessions(self):
        from FocusNetSegmentLib.review import ReviewSession, pending_sessions

        for checkpoint in pending_sessions(self.logic.sessionFolder()):
            if slicer.util.confirmYesNoDisplay(f"A review session was interrupted ({checkpoint.name}). Record it as "
                                               "incomplete? (No keeps it to resume.)"):
                ReviewSession.mark_incomplete(checkpoint, self.logic.logPath())


class FocusNetSegmentLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget (scripts, self-test)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.job = None
        self.case = None
        self.session = None
        self.organResults = None
        self.volumeNode = None
        self.segmentationNode = None
        self.workDir = None
        self.caseName = None
        self.modelInfo = {}

    def getParameterNode(self):
        return FocusNetSegmentParameterNode(super().getParameterNode())

    # -- environment -------------------------------------------------------------
    @staticmethod
    def coreDirectory():
        """Where the bundled FocusNetCore package lies (installed beside the module)."""
        return MODULE_DIR

    def ensureDependencies(self, confirm):
        from FocusNetSegmentLib import dependencies

        if not dependencies.torch_available():
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError("FocusNet needs PyTorch: install the PyTorch extension from the Extensions Manager.") from None
            if not confirm("FocusNet needs PyTorch. Install it now (several GB for a GPU build)?"):
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=False) is None:
                raise RuntimeError("PyTorch could not be installed (offline?). Install it with the PyTorch extension.")
        missing = dependencies.missing_requirements()
        if missing:
            if not confirm(f"FocusNet needs these Python packages: {', '.join(missing)}. Install them? "
                           "(Slicer's own numpy, SimpleITK and vtk are kept as they are.)"):
                return False
            import subprocess

            result = subprocess.run(dependencies.pip_command(missing), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError("Installing the requirements failed (offline?):\n" + result.stderr[-2000:])
        return True

    def describeModel(self, modelPath=None):
        """One line: the bundle's name and intended use (read from its metadata)."""
        import json
        import subprocess

        command = [self.python(), "-c",
                   "import json,sys; from FocusNetCore.bundle import load_bundle; "
                   "m = load_bundle(sys.argv[1])[1] if sys.argv[1] else None; "
                   "from FocusNetCore.segment import EMBEDDED_MODEL; "
                   "m = m or load_bundle(EMBEDDED_MODEL)[1]; print(json.dumps(m['provenance']))",
                   modelPath or ""]
        result = subprocess.run(command, capture_output=True, text=True, env=self.environment())
        if result.returncode != 0:
            return "Model: unavailable (" + (result.stderr.strip().splitlines() or ["?"])[-1] + ")"
        provenance = json.loads(result.stdout)
        self.modelInfo = provenance
        return f"{provenance.get('name', 'FocusNetv2')}: {provenance.get('intended_use', '')}"

    @staticmethod
    def python():
        return shutil.which("PythonSlicer") or sys.executable

    def environment(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.coreDirectory(), env.get("PYTHONPATH", "")])
        return env

    def sessionFolder(self):
        folder = os.path.join(slicer.app.slicerUserSettingsFilePath and os.path.dirname(slicer.app.slicerUserSettingsFilePath) or tempfile.gettempdir(), "FocusNet")
        os.makedirs(folder, exist_ok=True)
        return folder

    def logPath(self):
        return os.path.join(self.sessionFolder(), "review-log.jsonl")

    # -- segmentation ----------------------------------------------------------------
    @property
    def running(self):
        return self.job is not None and self.job.running

    def start(self, volumeNode, modelPath=None, device="auto"):
        import SimpleITK as sitk
        from FocusNetSegmentLib import process
        from FocusNetSegmentLib.scene import image_from_volume_node

        self.volumeNode = volumeNode
        self.workDir = tempfile.mkdtemp(prefix="FocusNet-")
        self.caseName = "ct"
        ctPath = os.path.join(self.workDir, "ct.nrrd")
        sitk.WriteImage(image_from_volume_node(volumeNode), ctPath)
        command = process.segment_command(self.python(), [ctPath], self.workDir, model=modelPath, device=device,
                                          output_format="nrrd")
        self.job = process.SegmentationProcess(command, env=self.environment()).start()

    def poll(self):
        return self.job.poll() if self.job else []

    def cancel(self):
        if self.job:
            self.job.cancel()

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self.running and (deadline is None or time.time() < deadline):
            self.poll()
            time.sleep(0.2)
        self.poll()

    def loadResult(self, reviewer=""):
        import json

        import SimpleITK as sitk

        if self.job.cancelled:
            raise RuntimeError("The segmentation was cancelled.")
        if self.job.returncode != 0:
            raise RuntimeError(self.job.error_text() or f"focusnet segment exited with code {self.job.returncode}")
        report = json.load(open(os.path.join(self.workDir, "ct.report.json")))
        labels = sitk.ReadImage(os.path.join(self.workDir, "ct.nrrd"))
        self.organResults = report["organs"]
        self._openCase(self.volumeNode, labels, report, reviewer)
        return self.segmentationNode

    def startManual(self, volumeNode, reviewer=""):
        self.volumeNode = volumeNode
        self.organResults = None
        self._openCase(volumeNode, None, None, reviewer)

    def _openCase(self, volumeNode, labels, report, reviewer):
        """The review (AI contours, or none for contouring from scratch) through
        FocusNetSegmentLib.case.ReviewCase, the code the browser review runs too."""
        from FocusNetSegmentLib.case import ReviewCase

        uid = volumeNode.GetAttribute("DICOM.instanceUIDs") or volumeNode.GetName()
        self.case = ReviewCase.open(slicer.mrmlScene, volumeNode, labels, folder=self.sessionFolder(),
                                    log_path=self.logPath(), case_uid=uid.split()[0], reviewer=reviewer,
                                    report=report, resume=True)
        self.segmentationNode = self.case.segmentation_node
        self.session = self.case.session

    def focusOrgan(self, name):
        """Centre the slice views on the organ and open the Segment Editor on it."""

        segmentation = self.segmentationNode.GetSegmentation()
        center = self.segmentationNode.GetSegmentCenterRAS(name) if segmentation.GetSegment(name) else None
        if center is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(self.segmentationNode)
        editor.setSourceVolumeNode(self.volumeNode)
        editor.setCurrentSegmentID(name if segmentation.GetSegment(name) else "")

    def finish(self):
        return self.case.finish()

    def export(self, kind, folder):
        if kind == "dicomseg":
            return self.exportDicom("DICOMSegmentationPlugin", folder)
        if kind == "rtstruct" and hasattr(slicer.modules, "dicomrtimportexport"):
            return self.exportDicom("DicomRtImportExportPlugin", folder)
        series = self.dicomSeriesFolder() if kind == "rtstruct" else None
        return self.case.export(kind, folder, self.volumeNode.GetName(), ct_series_folder=series)

    def dicomSeriesFolder(self):
        """A folder holding just the CT's DICOM files (from Slicer's DICOM database)."""
        uids = (self.volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids:
            raise RuntimeError("RTSTRUCT export needs the CT loaded from DICOM (or the SlicerRT extension).")
        folder = tempfile.mkdtemp(prefix="FocusNet-CT-")
        for uid in uids:
            source = slicer.dicomDatabase.fileForInstance(uid)
            shutil.copy(source, os.path.join(folder, os.path.basename(source) or uid))
        return folder

    def exportDicom(self, pluginName, folder):
        import DICOMScalarVolumePlugin  # noqa: F401  (registers the plugins)

        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        item = hierarchy.GetItemByDataNode(self.segmentationNode)
        plugin = slicer.modules.dicomPlugins[pluginName]()
        exportables = plugin.examineForExport(item)
        if not exportables:
            raise RuntimeError(f"{pluginName}: this segmentation cannot be exported (is the CT loaded from DICOM?)")
        for exp in exportables:
            exp.directory = folder
        error = plugin.export(exportables)
        if error:
            raise RuntimeError(error)
        return folder


class FocusNetSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: Modules > Developer Tools > Self Tests > FocusNetSegment."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentPhantom()

    def test_SegmentPhantom(self):
        import numpy as np
        from FocusNetCore.phantom import generate_case
        from FocusNetSegmentLib.scene import export_labels, image_from_volume_node, volume_node_from_image

        self.delayDisplay("Segmenting a synthetic phantom with the embedded model")
        case = generate_case(2026, "small")
        volume = volume_node_from_image(slicer.mrmlScene, case.image, "Phantom CT")
        logic = FocusNetSegmentLogic()
        logic.start(volume, device="cpu")
        logic.wait(timeout=600)
        segmentation = logic.loadResult(reviewer="self-test")
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(len(names), 22)
        self.assertIn("OpticChiasm", names)
        labels = export_labels(slicer.mrmlScene, segmentation, volume, logic.session.organs)
        self.assertEqual(labels.GetSize(), case.image.GetSize())
        self.assertTrue(np.allclose(labels.GetOrigin(), case.image.GetOrigin()))
        self.assertTrue(np.allclose(image_from_volume_node(volume).GetDirection(), case.image.GetDirection()))
        record = logic.finish()
        self.assertEqual(record["mode"], "ai")
        self.delayDisplay("FocusNetSegment self-test passed")
