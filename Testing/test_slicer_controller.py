"""The "Segment OARs" panel driven button by button, as the widget drives it:
every Qt signal of FocusNetSegment.py calls one PanelController method and
renders the state it returns, and the panel's timer calls ``tick``. Here a
recording view stands in for Slicer's dialogs and views; the scene is
slicer-core's, and the segmentation, pip and click-to-find run as the real
subprocesses -- through a launcher that, like PythonSlicer, runs Python as a
child process."""
import ast
import os
import signal
import types
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # noqa: F401  (slicer-core: these tests must not skip)
import vtk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FocusNetSegment"))

from FocusNetSegmentLib import dependencies, scene as bridge  # noqa: E402
from FocusNetSegmentLib.controller import PanelController, PanelView, xy_to_ras  # noqa: E402
from FocusNetSegmentLib.logic import SegmentOARsLogic  # noqa: E402
from FocusNetCore.organs import ORGAN_SETS, convert_labels  # noqa: E402
from FocusNetCore.phantom import PHANTOM_SET, generate_case  # noqa: E402
from FocusNetCore.study import read_records  # noqa: E402
from test_slicer_logic import process_group_alive as group_alive  # noqa: E402

ORGANS = ORGAN_SETS["oar22"]
WIDGET_FILE = ROOT / "FocusNetSegment" / "FocusNetSegment.py"


class RecordingView(PanelView):
    """Slicer's side, recorded: the questions asked (answered from
    ``answers``, default yes), errors shown, jumps, editor calls, and the
    slice-click observers."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.asked, self.errors, self.jumps, self.calls = [], [], [], []
        self.on_click = None
        self.torch_installs = []

    def ask(self, question):
        self.asked.append(question)
        return self.answers.pop(0) if self.answers else True

    def error(self, text, detail=""):
        self.errors.append(text)

    def jump_to(self, ras):
        self.jumps.append(list(ras))

    def edit(self, segmentation_node, volume_node):
        self.calls.append(("edit", segmentation_node, volume_node))

    def select_segment(self, segment_id):
        self.calls.append(("select", segment_id))

    def stop_editing(self):
        self.calls.append(("stop_editing",))

    def watch_slice_clicks(self, on_click):
        assert self.on_click is None, "slice clicks watched twice"
        self.on_click = on_click

    def unwatch_slice_clicks(self):
        self.on_click = None

    def install_torch(self, requirement):
        self.torch_installs.append(requirement)

    def show_3d(self, node):
        self.calls.append(("show_3d", node))


def launcher(tmp_path) -> str:
    """A stand-in for PythonSlicer: a launcher process whose child is the real
    Python (the launcher itself stays the parent, as CTK's does)."""
    path = tmp_path / "PythonSlicer"
    path.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nstatus=$?\nexit $status\n')
    path.chmod(0o755)
    return str(path)


def panel(tmp_path, image, name="CT", answers=()):
    scene = bridge.new_scene()
    ct = bridge.volume_node_from_image(scene, image, name)
    logic = SegmentOARsLogic(scene, tmp_path / "sessions", python=launcher(tmp_path),
                             default_export_folder=str(tmp_path / "exports"))
    view = RecordingView(answers)
    controller = PanelController(logic, view)
    state = controller.on_enter()
    assert controller.volume is ct and controller.default_volume() is ct  # the selector starts on the CT
    controller.on_device_changed(2)  # CPU
    return controller, view, ct, state


def tick_until(controller, done, timeout=300, what="the panel"):
    deadline = time.monotonic() + timeout
    state = controller.tick()
    while not done(state):
        assert state.ticking, f"the panel's timer stopped before {what}: {state.status}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s: {state.status}"
        time.sleep(0.1)
        state = controller.tick()
    return state


def segmented(state):
    return not state.ticking or bool(state.rows)


@pytest.fixture(scope="module")
def phantom():
    return generate_case(2026, "small")


def test_segment_review_click_to_place_finish_export_button_by_button(phantom, tmp_path):
    controller, view, ct, state = panel(tmp_path, phantom.image, answers=[])
    assert state.segment_enabled and state.segment_text == "Segment OARs" and not state.finish_enabled
    assert not state.ticking and state.rows == []
    controller.on_reviewer_changed("dr panel")

    state = controller.on_segment()
    assert state.segment_text == "Cancel" and state.segment_enabled and state.ticking
    assert not state.manual_enabled and not state.export_enabled
    state = tick_until(controller, lambda s: bool(s.rows), what="the result")
    assert view.errors == [] and view.asked == []  # a first run asks nothing
    assert [r[0] for r in state.rows] == list(ORGANS.names)
    assert state.segment_text == "Segment OARs" and state.finish_enabled and state.export_enabled
    assert state.progress == 100 and state.editor_enabled and "Review the contours" in state.status
    assert any(line.startswith("Segmenting:") for line in state.log), state.log  # the log area
    node = controller.logic.segmentation_node
    assert ("edit", node, ct) in view.calls and node.GetName() == "CT OARs"

    # A row: the views jump to the organ's centre and the editor selects it.
    state = controller.on_row_selected("Brainstem")
    centre = node.GetSegmentCenterRAS("Brainstem")
    assert view.jumps[-1] == pytest.approx(list(centre)) and view.calls[-1] == ("select", "Brainstem")
    state = controller.on_accept()
    assert dict((r[0], r[1]) for r in state.rows)["Brainstem"] == "accepted"
    state = controller.on_show_3d()
    assert view.calls[-1] == ("show_3d", node)

    # Click to place, through a slice view's own XY-to-RAS matrix: a click on
    # the left lens's centre places Lens_L there.
    controller.on_row_selected("Lens_L")
    state = controller.on_click_to_place(True)
    assert state.click_checked and view.on_click is not None and ("stop_editing",) in view.calls
    state = tick_until(controller, lambda s: controller.logic.click.state == "ready", what="click-to-find ready")
    truth, _ = convert_labels(sitk.GetArrayViewFromImage(phantom.labels), PHANTOM_SET, ORGANS)
    k, j, i = np.argwhere(truth == ORGANS.label_of("Lens_L")).mean(axis=0)
    lps = phantom.image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
    lens_ras = np.array([-lps[0], -lps[1], lps[2]])
    slice_node = axial_slice_node(controller.logic.scene, lens_ras, pixel=(130, 80))
    assert xy_to_ras(slice_node, 130, 80) == pytest.approx(list(lens_ras), abs=1e-6)
    state = view.on_click(slice_node, 130, 80)
    assert "Placing Lens_L" in state.status
    state = tick_until(controller, lambda s: "placed" in s.status, what="the placement")
    assert "Lens_L placed" in state.status and state.undo_enabled
    placed = np.array(node.GetSegmentCenterRAS("Lens_L"))
    assert np.linalg.norm(placed - lens_ras) < 4.0, (placed, lens_ras)
    state = controller.on_undo_place()
    assert "Lens_L: placement undone" in state.status

    # Leaving the module stops taking slice clicks (issue 46 fault 3).
    state = controller.on_exit()
    assert view.on_click is None and not state.click_checked
    assert controller.on_slice_click(slice_node, 130, 80).status == state.status  # ignored: nothing sent
    assert controller.logic.click.state == "ready"

    # Finish: read-only, the worker ends (fault 6), the record written, the timer stops.
    worker = controller.logic.click.worker.process
    state = controller.on_finish()
    assert not state.finish_enabled and not state.editor_enabled and not state.accept_enabled
    assert worker.poll() is not None and not group_alive(worker.pid)
    state = tick_until(controller, lambda s: s.status.startswith("Finished"), what="Finish")
    assert "recorded in" in state.status and view.errors == []
    assert not controller.tick().ticking  # nothing polls after Finish
    record = read_records(controller.logic.log_path())[0][-1]
    assert record["status"] == "finished" and record["reviewer"] == "dr panel"

    for kind, suffix in (("seg.nrrd", ".seg.nrrd"), ("nifti", ".nii.gz")):
        state = controller.on_export(kind)
        assert state.status.startswith("Exported") and state.status.endswith(suffix), state.status
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["CT.labels.json", "CT.nii.gz", "CT.seg.nrrd"]
    state = controller.on_export("seg.nrrd")  # never replaces: a second export gets a new name
    assert len(list((tmp_path / "exports").glob("*.seg.nrrd"))) == 2
    state = controller.on_export("dicomseg")  # a CT from a file: said in words, not a traceback
    assert "Export failed" in view.errors[-1] and "DICOM" in view.errors[-1]


def axial_slice_node(scene, ras, pixel, size=(200, 200)):
    """A slice view's node as Slicer's layout makes it: 1 mm pixels, axial,
    placed so that ``pixel`` shows ``ras``."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    node.SetDimensions(size[0], size[1], 1)
    node.SetFieldOfView(float(size[0]), float(size[1]), 1.0)
    slice_to_ras = vtk.vtkMatrix4x4()  # axial: the slice's x, y are R, A
    slice_to_ras.SetElement(0, 3, ras[0] - (pixel[0] - size[0] / 2))
    slice_to_ras.SetElement(1, 3, ras[1] - (pixel[1] - size[1] / 2))
    slice_to_ras.SetElement(2, 3, ras[2])
    node.GetSliceToRAS().DeepCopy(slice_to_ras)
    node.UpdateMatrices()
    return node


def test_segmenting_the_same_ct_again_updates_its_segmentation(phantom, tmp_path):
    """Issue 46 fault 10: a re-run replaces the CT's result (no "CT OARs_1"
    beside it); edits in the open review are only replaced after a question;
    a failed run shows its error and asks nothing about resuming."""
    controller, view, ct, _ = panel(tmp_path, phantom.image)
    controller.on_segment()
    tick_until(controller, lambda s: bool(s.rows), what="the first result")
    scene = controller.logic.scene
    first = controller.logic.segmentation_node
    controller.logic.session.mark_changed("Parotid_L")  # the reviewer edited an organ

    view.answers = [False]
    state = controller.on_segment()
    assert "Parotid_L was edited" in view.asked[-1] and state.ticking  # the review goes on
    assert not controller.logic.running and controller.logic.segmentation_node is first  # declined: nothing ran

    view.answers = [True, False]  # yes, segment again; no, do not resume the unfinished review
    controller.on_segment()
    tick_until(controller, lambda s: controller.logic.segmentation_node is not first and bool(s.rows),
               what="the second result")
    assert "unfinished review" in view.asked[-1]
    names = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode").GetName()
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    assert names == ["CT OARs"]
    statuses = [r["status"] for r in read_records(controller.logic.log_path())[0]]
    assert statuses == ["incomplete"]  # the first review, recorded as such, not lost

    # A failed run: the error, and no question about resuming the review it would have replaced.
    asked = len(view.asked)
    controller.on_model_changed(str(tmp_path / "missing-model.pt"))
    controller.on_segment()
    state = tick_until(controller, lambda s: not s.ticking or "failed" in s.status.lower() and
                       not controller.logic.running, timeout=120, what="the failure")
    assert view.errors and "Segmentation failed" in view.errors[-1]
    assert len(view.asked) == asked
    assert "missing-model.pt" in view.errors[-1] or "missing-model.pt" in state.status


def test_cancel_and_scene_close_during_a_run_end_the_whole_process_tree(phantom, tmp_path):
    """Cancel ends the launcher and the Python under it; closing the scene
    during a run does the same and the button reads "Segment OARs" again
    (issue 46 fault 5)."""
    controller, view, ct, _ = panel(tmp_path, phantom.image)
    state = controller.on_segment()
    job = controller.logic.job
    time.sleep(1.0)
    state = controller.on_segment()  # Cancel
    assert state.status == "Cancelled." and state.segment_text == "Segment OARs"
    assert not group_alive(job.process.pid)
    assert not controller.tick().ticking

    state = controller.on_segment()
    job = controller.logic.job
    time.sleep(1.0)
    state = controller.on_scene_start_close()
    assert state.segment_text == "Segment OARs" and not state.segment_enabled  # the scene has no CT now
    assert not group_alive(job.process.pid) and not controller.tick().ticking
    controller.logic.scene.Clear(0)
    state = controller.on_scene_end_close()
    assert controller.volume is None and not state.segment_enabled


def fake_plan(monkeypatch, torch=None, torch_installed=None, packages=("pytest>=7",)):
    """What is missing, as dependencies.install_plan reports it ("pytest>=7"
    is installed already: the real pip runs, and needs no package index)."""
    plan = dependencies.InstallPlan(torch, torch_installed, list(packages))
    monkeypatch.setattr(dependencies, "install_plan", lambda: plan)
    return plan


def test_first_click_asks_once_installs_then_segments(phantom, tmp_path, monkeypatch):
    """The first click: one question listing everything; PyTorch through the
    PyTorch extension's installer; the rest by pip in the background, whose
    output reaches the log area; then the segmentation starts by itself. No
    extension: a clear error. A no: nothing installed."""
    controller, view, ct, _ = panel(tmp_path, phantom.image)
    fake_plan(monkeypatch, torch="install")
    monkeypatch.setattr(dependencies, "pytorch_extension_available", lambda: False)
    state = controller.on_segment()
    assert "install the PyTorch extension" in view.errors[-1] and not controller.logic.running

    monkeypatch.setattr(dependencies, "pytorch_extension_available", lambda: True)
    view.answers = [False]
    state = controller.on_segment()
    assert view.asked[-1].count("\n- ") == 2 and "PyTorch >=2.1" in view.asked[-1] and "pytest>=7" in view.asked[-1]
    assert view.torch_installs == [] and not controller.logic.running and "Not installed" in state.status

    state = controller.on_segment()  # yes
    assert view.torch_installs == [">=2.1"] and controller.logic.job.kind == "install"
    assert state.segment_text == "Segment OARs" and not state.segment_enabled and state.ticking
    state = tick_until(controller, lambda s: controller.logic.job.kind == "segment", timeout=120,
                       what="the install")
    assert any("already satisfied" in line.lower() for line in state.log), state.log
    assert state.segment_text == "Cancel"  # the segmentation started by itself
    controller.on_segment()  # (cancelled: the rest is the test above)


def test_an_old_torch_is_upgraded_through_the_pytorch_extension(monkeypatch):
    """Issue 46 fault 7: an installed torch older than FocusNet's range is
    noticed (from its metadata; torch is not imported) and the question says
    which version is there."""
    monkeypatch.setattr(dependencies, "torch_available", lambda: True)
    monkeypatch.setattr(dependencies, "torch_version", lambda: "1.13.1+cu117")
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: [])
    plan = dependencies.install_plan()
    assert plan.torch_action == "upgrade" and not plan.ready
    assert "in place of the installed 1.13.1+cu117" in plan.question()
    monkeypatch.setattr(dependencies, "torch_version", lambda: "2.1.0+cu121")
    assert dependencies.install_plan().ready
    assert dependencies.torch_too_old("2.0.1") and not dependencies.torch_too_old("2.13.0+cpu")


def test_pip_install_survives_scene_close_and_slicer_quitting(phantom, tmp_path, monkeypatch):
    """Issue 46 fault 5: closing the scene or Slicer during the background pip
    install does not kill pip half way: it finishes, its output in the
    session folder's pip-install.log."""
    controller, view, ct, _ = panel(tmp_path, phantom.image)
    fake_plan(monkeypatch)
    controller.on_segment()
    job = controller.logic.job
    assert job.kind == "install" and job.running
    state = controller.on_scene_start_close()
    assert job.running or job.returncode == 0
    state = controller.on_cleanup()  # Slicer quits
    assert job.wait(120) == 0
    log = (tmp_path / "sessions" / "pip-install.log").read_text().lower()
    assert "already satisfied" in log
    assert not state.segment_text == "Cancel"


def test_stopping_a_busy_worker_under_a_launcher_ends_its_python_at_once(phantom, tmp_path):
    """Issue 46 fault 4: PythonSlicer is a launcher whose child is the real
    Python; stopping click-to-find while the worker is busy (opening the CT)
    ends both, without freezing the GUI for seconds."""
    controller, view, ct, _ = panel(tmp_path, phantom.image)
    logic = controller.logic
    labels = sitk.Image(phantom.image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(phantom.image)
    logic.open_review(ct, labels)
    controller._open_review()
    controller.on_row_selected("Lens_R")
    controller.on_click_to_place(True)
    process = logic.click.worker.process
    time.sleep(2.0)  # the worker is segmenting the CT
    children = [p for p in Path("/proc").glob("[0-9]*/stat")
                if p.read_text().rsplit(")", 1)[1].split()[1] == str(process.pid)]
    assert children, "the launcher should run Python as a child"
    started = time.monotonic()
    state = controller.on_scene_start_close()
    assert time.monotonic() - started < 3.0
    assert not group_alive(process.pid) and not state.ticking and view.on_click is None


def statement_count(function) -> int:
    return sum(isinstance(node, ast.stmt) for node in ast.walk(function)) - 1  # not the def itself


def test_the_widget_holds_no_logic():
    """Every method of the widget and of its view is a few statements of
    bindings; every controller method it binds exists and is driven by a
    test in this file."""
    tree = ast.parse(WIDGET_FILE.read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    too_long = [f"{cls}.{f.name}: {statement_count(f)}" for cls in ("FocusNetSegmentWidget", "SlicerView")
                for f in classes[cls].body if isinstance(f, ast.FunctionDef) and statement_count(f) > 10]
    assert too_long == []
    called = {node.attr for node in ast.walk(classes["FocusNetSegmentWidget"])
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "c"}
    called |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and isinstance(node.value, ast.Attribute) and node.value.attr == "controller"}
    assert {"on_segment", "on_finish", "tick", "on_slice_click", "on_cleanup"} <= called
    missing = sorted(name for name in called if not hasattr(PanelController, name))
    assert missing == []
    this_file = Path(__file__).read_text()
    untested = sorted(name for name in called if f".{name}(" not in this_file)
    assert untested == []
    view_methods = {f.name for f in classes["SlicerView"].body if isinstance(f, ast.FunctionDef)} - {"__init__"}
    assert view_methods == {n for n in vars(PanelView) if not n.startswith("_")}


def test_the_widget_check_can_fail():
    tree = ast.parse("def f(self):\n" + "".join(f"    x{i} = {i}\n" for i in range(11)))
    assert statement_count(tree.body[0]) == 11


def test_controller_docs_match_the_widgets_bindings():
    """The widget renders every field of PanelState (a field nobody shows is a decision lost)."""
    from FocusNetSegmentLib.controller import PanelState

    text = WIDGET_FILE.read_text()
    unshown = [name for name in PanelState.__dataclass_fields__ if f"state.{name}" not in text]
    assert unshown == []


def test_manual_baseline_accept_all_export_folder_and_interrupted_reviews(phantom, tmp_path):
    """The manual baseline's path; the output folder; at the next start an
    interrupted review is offered: yes records it as incomplete, no keeps it."""
    controller, view, ct, state = panel(tmp_path, phantom.image)
    assert not controller.on_input_changed(None).segment_enabled
    state = controller.on_input_changed(ct)
    assert state.segment_enabled and not state.manual_enabled  # the baseline needs its box ticked
    state = controller.on_manual_toggled(True)
    assert state.manual_enabled
    state = controller.on_start_manual()
    assert "from scratch" in state.status and len(state.rows) == 22
    assert {r[1] for r in state.rows} == {"unreviewed"} and controller.logic.segmentation_node.GetName() == \
        "CT OARs (manual)"
    state = controller.on_accept_all()
    assert state.status == "Accepted 22 unflagged organ(s)." and {r[1] for r in state.rows} == {"accepted"}
    chosen = tmp_path / "chosen" / "folder"
    controller.on_output_folder_changed(str(chosen))
    assert controller.output_folder_shown() == str(chosen) and chosen.is_dir()
    assert controller.on_export("seg.nrrd").status == f"Exported {chosen / 'CT.seg.nrrd'}"

    controller.on_cleanup()  # Slicer quits with the review open: its checkpoint stays
    for answer, records in ((False, 0), (True, 1)):  # the next two starts of Slicer
        again = PanelController(SegmentOARsLogic(bridge.new_scene(), tmp_path / "sessions"), RecordingView([answer]))
        assert len(again.pending_sessions()) == 1
        again.on_enter()  # the module shown: offered once per start, not at every enter
        again.on_enter()
        assert len(again.view.asked) == 1 and "interrupted" in again.view.asked[0]
        assert len(read_records(again.logic.log_path())[0]) == records
    assert again.pending_sessions() == []
    assert read_records(again.logic.log_path())[0][0]["status"] == "incomplete"


def test_a_label_map_is_no_default_ct_and_an_error_in_the_timer_is_shown_once(phantom, tmp_path, monkeypatch):
    """The CT selector lists scalar volumes without label maps: the default
    is never a label map. An unexpected error while polling is shown once,
    its traceback goes to the log, and the timer stops."""
    scene = bridge.new_scene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    ct = bridge.volume_node_from_image(scene, phantom.image, "CT")
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is labelmap
    view = RecordingView()
    controller = PanelController(SegmentOARsLogic(scene, tmp_path / "sessions"), view)
    controller.on_enter()
    assert controller.default_volume() is ct

    controller.on_start_manual()
    assert controller.state().ticking  # the review's clock

    def broken():
        raise OSError("disk gone")

    monkeypatch.setattr(controller.logic, "poll_click_to_find", broken)
    controller.logic.click = types.SimpleNamespace(state="ready", close=lambda: None)  # something to poll
    state = controller.tick()
    assert not state.ticking and len(view.errors) == 1 and "disk gone" in view.errors[0]
    assert any("Traceback" in line for line in state.log)
    controller.logic.click = None
