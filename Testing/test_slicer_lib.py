"""FocusNetSegmentLib against Slicer's real MRML classes (the slicer-core wheel)."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # noqa: E402  (slicer-core, installed by the dev extra: these tests must not skip)
import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FocusNetSegment"))

from FocusNetSegmentLib import process, review, scene as bridge  # noqa: E402
from FocusNetSegmentLib.export import export_nifti, export_seg_nrrd, free_path  # noqa: E402
from FocusNetCore.organs import CATALOGUE, ORGAN_SETS, convert_labels  # noqa: E402
from FocusNetCore.phantom import PHANTOM_SET, generate_case  # noqa: E402
from FocusNetCore.segfile import read_seg_nrrd_segments  # noqa: E402
from FocusNetCore.study import ACTIVITY_RULES, read_records  # noqa: E402

ORGANS = ORGAN_SETS["oar22"]


@pytest.fixture(scope="module")
def phantom():
    case = generate_case(700, "small")
    # Stored with a flipped x axis: geometry must survive every step anyway.
    image = sitk.Flip(case.image, [True, False, False])
    labels = sitk.Flip(case.labels, [True, False, False])
    array, _ = convert_labels(sitk.GetArrayViewFromImage(labels), PHANTOM_SET, ORGANS)
    oar = sitk.GetImageFromArray(array)
    oar.CopyInformation(labels)
    return image, oar


@pytest.fixture
def loaded(phantom):
    image, labels = phantom
    scene = bridge.new_scene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    ct = bridge.volume_node_from_image(scene, image, "CT")
    hierarchy.CreateItem(study, ct)
    seg = bridge.import_labels(scene, labels, ORGANS, ct, "CT OARs")
    return scene, ct, seg, labels, study


def test_volume_node_keeps_geometry_and_voxels(phantom):
    image, _ = phantom
    scene = bridge.new_scene()
    node = bridge.volume_node_from_image(scene, image, "CT")
    back = bridge.image_from_volume_node(node)
    assert np.allclose(back.GetOrigin(), image.GetOrigin()) and np.allclose(back.GetSpacing(), image.GetSpacing())
    assert np.allclose(back.GetDirection(), image.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    # RAS: the first voxel's R coordinate is minus its L coordinate.
    ras = [0.0, 0.0, 0.0, 1.0]
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    assert matrix.MultiplyPoint((0, 0, 0, 1))[0] == pytest.approx(-image.GetOrigin()[0])
    del ras


def test_import_names_colours_terminology_and_hierarchy(loaded):
    scene, ct, seg, labels, study = loaded
    assert bridge.segment_names(seg) == list(ORGANS.names)
    segmentation = seg.GetSegmentation()
    for name in ORGANS.names:
        segment = segmentation.GetSegment(name)
        assert np.allclose(np.asarray(segment.GetColor()) * 255, CATALOGUE[name].color, atol=0.5)
        tag = vtk.mutable("")
        assert segment.GetTag("TerminologyEntry", tag)
        assert f"SCT^{CATALOGUE[name].snomed_code}^" in str(tag)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(seg)) == study


def test_export_is_voxel_exact_on_the_ct_grid(loaded):
    scene, ct, seg, labels, _ = loaded
    out = bridge.export_labels(scene, seg, ct, ORGANS)
    for what in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(out, what)(), getattr(labels, what)(), atol=1e-4), what
    assert np.array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(labels))


def test_seg_nrrd_and_nifti_export_never_overwrite(loaded, tmp_path):
    scene, ct, seg, labels, _ = loaded
    first = export_seg_nrrd(scene, seg, tmp_path / "case.seg.nrrd")
    second = export_seg_nrrd(scene, seg, tmp_path / "case.seg.nrrd")
    assert first.name == "case.seg.nrrd" and second.name == "case (2).seg.nrrd"
    segments = read_seg_nrrd_segments(first)
    assert [s["name"] for s in segments] == list(ORGANS.names)
    nifti = export_nifti(scene, seg, ct, ORGANS, tmp_path / "case.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(nifti))), sitk.GetArrayViewFromImage(labels))
    table = json.loads((tmp_path / "case.labels.json").read_text())
    assert table["labels"][ORGANS.label_of("Pituitary") - 1]["name"] == "Pituitary"
    assert free_path(tmp_path / "new.seg.nrrd") == tmp_path / "new.seg.nrrd"


def test_progress_lines_parse():
    event = process.parse_progress_line('{"stage": "inference", "fraction": 0.5, "message": "chunk 2/4"}')
    assert event.stage == "inference" and event.fraction == 0.5 and event.label == "Segmenting"
    assert process.parse_progress_line("Traceback (most recent call last):") is None
    assert process.parse_progress_line('{"stage": "x", "fraction": "nan?"}') is None
    assert process.parse_progress_line('{"fraction": 1}') is None
    assert process.parse_progress_line('{"stage": "done", "fraction": 7}').fraction == 1.0


def test_background_process_progress_and_cancel(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import json, subprocess, sys, time\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open(sys.argv[1], 'w').write(str(grandchild.pid))\n"
        "for k in range(100):\n"
        "    print(json.dumps({'stage': 'inference', 'fraction': k / 100, 'message': 'working'}), flush=True)\n"
        "    time.sleep(0.05)\n")
    job = process.SegmentationProcess([sys.executable, str(script), str(tmp_path / "pid")]).start()
    events = []
    deadline = time.time() + 20
    while len(events) < 3 and time.time() < deadline:
        events += job.poll()
        time.sleep(0.05)
    assert events and events[0].stage == "inference"
    job.cancel()
    assert not job.running and job.cancelled
    grandchild = int((tmp_path / "pid").read_text())
    time.sleep(0.2)

    assert not _alive(grandchild)  # the whole tree is gone


def test_failure_text_reaches_the_user(tmp_path):
    job = process.SegmentationProcess([sys.executable, "-m", "FocusNetCore", "segment", str(tmp_path / "none.nrrd"),
                                       "--out", str(tmp_path), "--progress", "json"]).start()
    job.wait(60)
    time.sleep(0.2)
    job.poll()
    assert job.returncode == 2
    assert "none.nrrd" in job.error_text() and "no such file" in job.error_text()
    command = process.segment_command("PythonSlicer", ["ct.nrrd"], "out", model="m.pt", device="cpu")
    assert command[:4] == ["PythonSlicer", "-m", "FocusNetCore", "segment"] and "--progress" in command


def _alive(pid):
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for a reaper is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def paint(seg, name, labels_like, slab):
    """Add the voxels of a (z, y, x) slab to a segment, as a Segment Editor paint stroke does
    (MODE_MERGE_MASK is what the editor's "add" uses on shared label maps)."""
    mask = np.zeros(sitk.GetArrayViewFromImage(labels_like).shape, np.uint8)
    mask[slab] = 1
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(labels_like)
    node = bridge.volume_node_from_image(seg.GetScene(), image, "stroke", "vtkMRMLLabelMapVolumeNode")
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(node)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented, seg, name, slicer.vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MASK)
    seg.GetScene().RemoveNode(node)


def start_session(loaded, tmp_path, clock, **kwargs):
    scene, ct, seg, labels, _ = loaded
    results = [{"name": n, "present": True, "volume_cc": float(np.mean(CATALOGUE[n].volume_cc)),
                "confidence": 0.9, "shape_score": 0.9} for n in ORGANS.names]
    results[ORGANS.label_of("Parotid_R") - 1]["volume_cc"] = 200.0  # a deliberately wrong organ
    results[ORGANS.label_of("Pituitary") - 1]["present"] = False
    return review.ReviewSession(seg, ORGANS, mode="ai", case_id="abc", reviewer="dr x", log_path=tmp_path / "log.jsonl",
                                checkpoint_path=tmp_path / "abc.review.json", organ_results=results, ai_labels=labels,
                                model={"name": "tiny"}, inference_seconds=12.0, idle_threshold_s=30.0, clock=clock,
                                wall=lambda: 1.7e9 + clock.t, **kwargs).start()


def test_flags_fire_on_a_wrong_segmentation(loaded, tmp_path):
    session = start_session(loaded, tmp_path, FakeClock())
    flags = {n: s.flags for n, s in session.states.items()}
    assert flags["Pituitary"] == ["missing"]
    assert any("outside" in f for f in flags["Parotid_R"]) and any("left/right" in f for f in flags["Parotid_R"])
    assert any("left/right" in f for f in flags["Parotid_L"])
    assert flags["Eye_L"] == []
    accepted = session.accept_all_unflagged()
    assert "Eye_L" in accepted and "Parotid_R" not in accepted and "Pituitary" not in accepted


def test_edits_timing_and_records(loaded, tmp_path):
    scene, ct, seg, labels, _ = loaded
    clock = FakeClock()
    session = start_session(loaded, tmp_path, clock)                               # first sight: an act
    clock.t += 5
    paint(seg, "Parotid_L", labels, (slice(5, 7), slice(2, 8), slice(2, 8)))   # edit 1: +5 s (in the air: a real change)
    clock.t += 10
    paint(seg, "Parotid_L", labels, (slice(7, 8), slice(2, 8), slice(2, 8)))   # edit 2: +10 s active
    clock.t += 300                                                                      # coffee: idle
    paint(seg, "Eye_R", labels, (slice(10, 11), slice(2, 6), slice(12, 16)))        # edit 3: gap not counted
    clock.t += 4
    paint(seg, "Eye_R", labels, (slice(11, 12), slice(2, 6), slice(12, 16)))        # edit 4: +4 s
    session.accept("Eye_L")
    states = session.states
    assert states["Parotid_L"].status == "edited" and states["Parotid_L"].edits == 2
    assert states["Parotid_L"].first_edit_s == pytest.approx(5.0) and states["Parotid_L"].last_edit_s == pytest.approx(15.0)
    assert states["Eye_R"].edits == 2 and states["Eye_L"].status == "accepted"
    assert states["Brainstem"].status == "unreviewed"
    assert session.active_s == pytest.approx(19.0)
    clock.t += 6
    final = bridge.export_labels(scene, seg, ct, ORGANS)
    record = session.finish(final)
    # finishing 6 s after the last act of reviewing counts as active too
    assert record["wall_s"] == pytest.approx(325.0) and record["active_s"] == pytest.approx(25.0)
    assert record["activity"] == {"edit": 4} and "active_s" in record["timing_definitions"]
    assert record["activity_rules"] == ACTIVITY_RULES  # the study report trusts its active time
    assert record["metrics"]["Parotid_L"]["edited"] and record["metrics"]["Parotid_L"]["voxels_added"] > 0
    assert record["metrics"]["Parotid_L"]["voxels_added"] == 3 * 6 * 6 and record["metrics"]["Parotid_L"]["apl_mm"] > 0
    assert not record["metrics"]["Brainstem"]["edited"] and record["metrics"]["Brainstem"]["dice"] == 1.0
    records, problems = read_records(tmp_path / "log.jsonl")
    assert len(records) == 1 and not problems
    assert records[0]["mode"] == "ai" and records[0]["case_id"] == "abc" and records[0]["model"] == {"name": "tiny"}
    assert not (tmp_path / "abc.review.json").exists()


def test_crash_recovery_resume_or_incomplete(loaded, tmp_path):
    scene, ct, seg, labels, _ = loaded
    clock = FakeClock()
    session = start_session(loaded, tmp_path, clock)
    clock.t += 3
    paint(seg, "Brainstem", labels, (slice(20, 21), slice(70, 75), slice(70, 75)))
    clock.t += 7
    paint(seg, "Brainstem", labels, (slice(21, 22), slice(70, 75), slice(70, 75)))
    session.stop()  # Slicer crashes here: the checkpoint is all that is left
    assert review.pending_sessions(tmp_path) == [tmp_path / "abc.review.json"]
    clock2 = FakeClock()
    resumed = review.ReviewSession.resume(tmp_path / "abc.review.json", seg, ORGANS, tmp_path / "log.jsonl",
                                          clock=clock2, wall=lambda: 1.7e9).start()
    assert resumed.states["Brainstem"].edits == 2 and resumed.active_s == pytest.approx(10.0)
    clock2.t += 20
    assert resumed.now_s() == pytest.approx(30.0)  # 10 s before the crash + 20 s after
    resumed.stop()
    assert json.loads((tmp_path / "abc.review.json").read_text())["activity_rules"] == ACTIVITY_RULES
    record = review.ReviewSession.mark_incomplete(tmp_path / "abc.review.json", tmp_path / "log.jsonl")
    assert record["status"] == "incomplete"
    records, _ = read_records(tmp_path / "log.jsonl")
    assert [r["status"] for r in records] == ["incomplete"]
    # a checkpoint written before activity_rules existed: its active time so far was counted by the
    # earlier rules, and the resumed session's record says so
    session = start_session(loaded, tmp_path, FakeClock())
    session.stop()
    old = json.loads((tmp_path / "abc.review.json").read_text())
    del old["activity_rules"]
    (tmp_path / "abc.review.json").write_text(json.dumps(old))
    resumed = review.ReviewSession.resume(tmp_path / "abc.review.json", seg, ORGANS, tmp_path / "log.jsonl",
                                          clock=FakeClock(), wall=lambda: 1.7e9).start()
    assert resumed.state_dict()["activity_rules"] == 1
    resumed.stop()


def test_review_case_autosave_resume_export_finish(phantom, tmp_path):
    """ReviewCase, the review both front ends run: an edit is autosaved; after a
    crash the same case reopens with those contours, statuses and times; the
    export never replaces a file; finishing logs one record and cleans up."""
    from FocusNetSegmentLib.case import ReviewCase

    image, labels = phantom
    clock = FakeClock()

    def open_case():
        scene = bridge.new_scene()
        ct = bridge.volume_node_from_image(scene, image, "CT")
        return ReviewCase.open(scene, ct, labels, folder=tmp_path / "sessions", log_path=tmp_path / "log.jsonl",
                               case_uid="1.2.3", report={"model": {"name": "tiny", "organ_set": "oar22"}},
                               clock=clock, wall=lambda: 1.7e9 + clock.t)

    case = open_case()
    assert case.session.mode == "ai" and case.session.model == {"name": "tiny", "organ_set": "oar22"}
    clock.t += 4
    paint(case.segmentation_node, "Parotid_L", labels, (slice(5, 7), slice(2, 8), slice(2, 8)))
    case.session.accept("Brainstem")
    case.autosave()
    case.session.stop()  # the server or Slicer dies here

    resumed = open_case()
    assert resumed.session.states["Parotid_L"].status == "edited"
    assert resumed.session.states["Brainstem"].status == "accepted"
    assert resumed.session.now_s() == pytest.approx(4.0)
    final = sitk.GetArrayFromImage(resumed.final_labels())
    ai = sitk.GetArrayFromImage(labels)
    painted = np.zeros_like(final, bool)
    painted[5:7, 2:8, 2:8] = True
    assert np.all(final[painted] == ORGANS.label_of("Parotid_L"))  # the autosaved stroke came back
    assert np.array_equal(final[~painted], ai[~painted])

    first = resumed.export("seg.nrrd", tmp_path, "CT")
    second = resumed.export("seg.nrrd", tmp_path, "CT")
    assert first.name == "CT.seg.nrrd" and second.name == "CT (2).seg.nrrd"
    clock.t += 2
    record = resumed.finish()
    assert record["organs"]["Parotid_L"]["status"] == "edited" and record["client"] == "slicer"
    assert record["metrics"]["Parotid_L"]["voxels_added"] > 0  # against the AI contours, not the autosave
    assert not list((tmp_path / "sessions").iterdir())


def test_only_real_contour_changes_count_as_edits(loaded, tmp_path):
    """Making the closed surface ("Show 3D") fires RepresentationModified for
    all 22 segments and is no edit; one paint stroke fires it more than once
    and is one edit; "Accept all unflagged" still accepts the untouched organs."""
    scene, ct, seg, labels, _ = loaded
    clock = FakeClock()
    session = start_session(loaded, tmp_path, clock)
    seg.CreateClosedSurfaceRepresentation()
    assert all(s.status == "unreviewed" and s.edits == 0 for s in session.states.values())
    clock.t += 3
    paint(seg, "Parotid_L", labels, (slice(5, 7), slice(2, 8), slice(2, 8)))
    edited = {n: s.edits for n, s in session.states.items() if s.edits}
    assert edited == {"Parotid_L": 1}
    seg.RemoveClosedSurfaceRepresentation()
    seg.CreateClosedSurfaceRepresentation()
    assert {n: s.edits for n, s in session.states.items() if s.edits} == {"Parotid_L": 1}
    accepted = session.accept_all_unflagged()
    assert "Brainstem" in accepted and "Parotid_L" not in accepted


def open_shown_case(phantom, tmp_path, clock, shown=True):
    from FocusNetSegmentLib.case import ReviewCase

    image, labels = phantom
    scene = bridge.new_scene()
    ct = bridge.volume_node_from_image(scene, image, "CT")
    ct.CreateDefaultDisplayNodes()
    case = ReviewCase.open(scene, ct, labels, folder=tmp_path / "sessions", log_path=tmp_path / "log.jsonl",
                           case_uid="4.5.6", report={"model": {"name": "tiny", "organ_set": "oar22"}},
                           clock=clock, wall=lambda: 1.7e9 + clock.t, shown=shown)
    case.session.idle_threshold_s = 10.0
    return case


def test_scroll_window_level_and_view_changes_are_activity(phantom, tmp_path):
    """The activity model both front ends share: scrolling a slice view,
    window/level, rotating the 3D view and toggling a segment's visibility
    are acts of reviewing (read from the MRML nodes they change); a gap
    longer than the idle threshold is idle as a whole."""
    clock = FakeClock()
    case = open_shown_case(phantom, tmp_path, clock)
    scene, session = case.scene, case.session
    axial = scene.AddNode(slicer.vtkMRMLSliceNode())
    axial.SetName("Red")
    camera = scene.AddNode(slicer.vtkMRMLCameraNode())
    display = case.volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    assert session.active_s == 0.0

    for step in range(8):                      # 8 s of scrolling, one slice a second
        clock.t += 1
        axial.SetSliceOffset(float(step))
    clock.t += 2
    display.SetWindowLevel(400, 40)            # a preset: +2 s
    clock.t += 3
    camera.SetPosition(100.0, 0.0, 0.0)        # rotate the 3D view: +3 s
    clock.t += 1
    case.segmentation_node.GetDisplayNode().SetSegmentVisibility("Eye_L", False)  # +1 s
    assert session.active_s == pytest.approx(14.0)
    assert all(s.edits == 0 and s.status == "unreviewed" for s in session.states.values())
    clock.t += 6                               # away from the desk ...
    camera.GetCamera().SetClippingRange(5.0, 900.0)  # ... while a render resets the clipping range: not an act
    clock.t += 39                              # longer than the threshold in all
    axial.SetSliceOffset(20.0)
    assert session.active_s == pytest.approx(14.0)
    clock.t += 2
    axial.SetSliceOffset(21.0)
    assert session.active_s == pytest.approx(16.0)
    counts = session.state_dict()["activity"]
    assert counts["slice"] == 10 and counts["window_level"] >= 1 and counts["view3d"] >= 1 and counts["display"] >= 1
    record = case.finish()
    assert record["wall_s"] == pytest.approx(61.0) and record["active_s"] == pytest.approx(16.0)
    case.close()


def test_wall_clock_starts_at_first_sight_and_pauses_without_a_page(phantom, tmp_path):
    clock = FakeClock()
    case = open_shown_case(phantom, tmp_path, clock, shown=False)   # the browser: contours ready, no page yet
    session = case.session
    clock.t += 117                                # nobody looks yet
    case.scene.AddNode(slicer.vtkMRMLSliceNode()).SetSliceOffset(3.0)  # no page: not an act of reviewing
    assert session.now_s() == 0.0 and session.active_s == 0.0
    session.shown()                               # the page opens
    clock.t += 4
    session.accept("Brainstem")                   # +4 s
    clock.t += 5
    session.hidden()                              # the page is closed: +5 s (closing is an act)
    clock.t += 600                                # no page open: paused
    assert session.now_s() == pytest.approx(9.0) and session.active_s == pytest.approx(9.0)
    session.shown()
    clock.t += 3
    record = case.finish()
    assert record["wall_s"] == pytest.approx(12.0) and record["active_s"] == pytest.approx(12.0)
    # "started" is first sight, 117 s after the contours were ready
    assert record["started"] == review._iso(1.7e9 + 1000 + 117)
    case.close()


def test_a_contour_changed_after_finish_is_reported_not_lost(phantom, tmp_path):
    image, labels = phantom
    clock = FakeClock()
    case = open_shown_case(phantom, tmp_path, clock)
    changed = []
    case.session.on_change_after_finish = changed.append
    clock.t += 3
    record = case.finish()
    paint(case.segmentation_node, "Parotid_L", labels, (slice(5, 7), slice(2, 8), slice(2, 8)))
    assert changed == ["Parotid_L"]
    assert case.session.states["Parotid_L"].edits == 0 and record["organs"]["Parotid_L"]["status"] == "unreviewed"
    assert not list((tmp_path / "sessions").glob("*.review.json")), "no checkpoint reappears after Finish"
    case.close()


def test_click_to_place_replaces_the_organ_in_the_one_label_map(phantom, tmp_path):
    """Issue 44, fault 2: a placement in another organ's territory (the lens
    in the temporal lobe) becomes the organ's whole contour, takes those
    voxels from the other organ, and is what every export and the record
    hold: the .seg.nrrd read back by Slicer equals the label map the DICOM
    writers get; the record says the lens was edited (Dice < 1); undo
    restores both organs exactly."""
    from FocusNetSegmentLib.case import ReviewCase

    image, labels = phantom
    scene = bridge.new_scene()
    ct = bridge.volume_node_from_image(scene, image, "CT")
    case = ReviewCase.open(scene, ct, labels, folder=tmp_path / "sessions", log_path=tmp_path / "log.jsonl",
                           case_uid="voxels:test", save_each_edit=True)
    ai = sitk.GetArrayFromImage(labels)
    lens, brain = ORGANS.label_of("Lens_L"), ORGANS.label_of("Brainstem")
    where = np.argwhere(ai == brain)
    k, j, i = where[len(where) // 2]
    mask = sitk.GetImageFromArray(np.ones((2, 3, 3), np.uint8))
    mask.SetSpacing(image.GetSpacing())
    mask.SetDirection(image.GetDirection())
    mask.SetOrigin(image.TransformIndexToPhysicalPoint([int(i) - 1, int(j) - 1, int(k)]))
    assert case.placement_distance_mm("Lens_L", mask) > 20.0  # far from the model's lens: the station asks
    changed = case.place("Lens_L", mask)
    assert changed["taken_from"] == ["Brainstem"] and changed["after_cc"] > 0 and changed["before_cc"] > 0
    final = sitk.GetArrayFromImage(case.final_labels())
    box = (slice(k, k + 2), slice(j - 1, j + 2), slice(i - 1, i + 2))
    assert np.all(final[box] == lens) and (final == lens).sum() == 18, "the lens is the placement, nowhere else"
    untouched = np.ones(ai.shape, bool)
    untouched[box] = False
    untouched &= ai != lens
    assert np.array_equal(final[untouched], ai[untouched])
    # One label map: Slicer's own .seg.nrrd reader sees the same, no overlapping layer.
    seg = case.export("seg.nrrd", tmp_path, "CT")
    scene2 = bridge.new_scene()
    ct2 = bridge.volume_node_from_image(scene2, image, "CT")
    back = bridge.export_labels(scene2, bridge.load_segmentation(scene2, str(seg)), ct2, ORGANS)
    assert np.array_equal(sitk.GetArrayFromImage(back), final)
    state = case.session.states["Lens_L"]
    assert state.assisted_edits == 1 and state.edits == 0 and state.status == "edited"
    assert case.session.states["Brainstem"].edits == 0  # the placement is one assisted edit, not hand edits
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(case._working_path)))
    assert np.array_equal(saved, final), "the placement is on disk before it is counted"

    assert case.undo_place() == "Lens_L"
    assert np.array_equal(sitk.GetArrayFromImage(case.final_labels()), ai)
    case.place("Lens_L", mask)
    record = case.finish()
    assert record["metrics"]["Lens_L"]["dice"] < 0.5 and record["organs"]["Lens_L"]["status"] == "edited"
    assert record["metrics"]["Brainstem"]["voxels_removed"] == 18


def test_shape_flag_only_against_the_bundles_measured_threshold():
    """Issue 44, fault 7: a shape score is flagged only below the threshold
    its model measured (``shape_threshold``); a report without one (the
    embedded model, whose autoencoder does not tell shapes apart) flags no
    shape, so small organs are not all flagged."""
    base = [{"name": n, "present": True, "volume_cc": float(np.mean(CATALOGUE[n].volume_cc)), "confidence": 0.9}
            for n in ORGANS.names]
    uncalibrated = [dict(r, shape_score=0.0, shape_threshold=None) for r in base]
    assert not any(review.organ_flags(ORGANS, uncalibrated).values())
    calibrated = [dict(r, shape_score=0.4 if r["name"] == "Lens_L" else 0.8, shape_threshold=0.6) for r in base]
    flags = review.organ_flags(ORGANS, calibrated)
    assert flags["Lens_L"] == ["implausible shape (score 0.40 < 0.60)"]
    assert not any(v for n, v in flags.items() if n != "Lens_L")


def test_embedded_model_flags_no_correct_small_organ(tmp_path):
    """On a held-out phantom the embedded model's small organs (all found)
    carry no shape flag (before: every one, "score 0.00")."""
    from FocusNetCore.segment import Segmenter

    result = Segmenter(None, device="cpu").segment(generate_case(1000, "small").image)
    results = result.report()["organs"]
    small = [r for r in results if r["name"] in ORGANS.small_names]
    assert all(r["present"] for r in small)
    flags = review.organ_flags(ORGANS, results)
    assert not any("shape" in f for r in small for f in flags[r["name"]]), flags


def test_a_stroke_that_takes_another_organs_voxels_edits_both(loaded, tmp_path):
    """A paint stroke with the Segment Editor's "overwrite other segments"
    (its default) takes voxels from the organ it crosses; Slicer reports the
    painted segment only, yet both are edited (SEMIAUTOMATIC in the exports),
    each with one edit; a stroke that crosses nothing edits one."""
    scene, ct, seg, labels, _ = loaded
    clock = FakeClock()
    session = start_session(loaded, tmp_path, clock)
    ai = sitk.GetArrayViewFromImage(labels)
    where = np.argwhere(ai == ORGANS.label_of("Parotid_R"))
    k, j, i = where[len(where) // 2]
    mask = np.zeros(ai.shape, np.uint8)
    mask[k, j - 1:j + 2, i - 1:i + 2] = 1
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(labels)
    node = bridge.volume_node_from_image(scene, image, "stroke", "vtkMRMLLabelMapVolumeNode")
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(node)
    segmentation = seg.GetSegmentation()
    others = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
              if segmentation.GetNthSegmentID(i) != "Parotid_L"]
    clock.t += 1
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented, seg, "Parotid_L", slicer.vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MASK, oriented.GetExtent(),
        False, others)
    scene.RemoveNode(node)
    final = sitk.GetArrayFromImage(bridge.export_labels(scene, seg, ct, ORGANS))
    assert np.all(final[mask > 0] == ORGANS.label_of("Parotid_L")), "the stroke overwrote Parotid_R"
    assert session.states["Parotid_L"].edits == 1 and session.states["Parotid_R"].edits == 1
    assert session.states["Parotid_R"].status == "edited"
    assert session.algorithm_types()["Parotid_R"] == "SEMIAUTOMATIC"
    assert all(s.edits == 0 for n, s in session.states.items() if n not in ("Parotid_L", "Parotid_R"))
    paint(seg, "Brainstem", labels, (slice(0, 1), slice(0, 2), slice(0, 2)))  # in the air: crosses nothing
    assert session.states["Brainstem"].edits == 1 and session.states["Parotid_R"].edits == 1


# What released Slicer 5.8-5.12 ships among the packages FocusNetCore's export path could use
# (Slicer's SuperBuild: numpy, scipy, pydicom, SimpleITK, vtk, Pillow); the rest comes from
# dependencies.REQUIREMENTS, installed on the first click.
SLICER_SHIPS = {"numpy", "scipy", "pydicom", "SimpleITK", "vtk", "PIL"}


def test_the_export_path_imports_only_what_slicer_ships_or_the_module_installs():
    """Issue 46, fault 1: RTSTRUCT export without SlicerRT failed in Slicer
    on `import contourpy`, which Slicer does not ship and the module did not
    install. Every third-party import of the writers the module calls inside
    Slicer (module level and inside those functions) is shipped by Slicer or
    installed by dependencies.REQUIREMENTS."""
    import ast
    import inspect

    from FocusNetCore import caseid, dicomseg, imageio, rtstruct, segfile
    from FocusNetSegmentLib import dependencies

    allowed = SLICER_SHIPS | set(dependencies.REQUIREMENTS) | set(sys.stdlib_module_names) | {"FocusNetCore"}
    used = {}
    functions = [rtstruct.write_rtstruct, rtstruct.mask_contours, rtstruct._ct_series, rtstruct._on_series_grid,
                 dicomseg.write_dicom_seg, caseid.stamp_nrrd_file, caseid.identity_of_dicom_series,
                 segfile.write_seg_nrrd, imageio.read_dicom_series]
    trees = [ast.parse(inspect.getsource(m)) for m in (rtstruct, dicomseg, caseid, segfile, imageio)]
    nodes = [n for tree in trees for n in tree.body] + [n for f in functions
                                                       for n in ast.walk(ast.parse(inspect.getsource(f)))]
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            used.setdefault(name.split(".")[0], node.lineno)
    assert "contourpy" in used, "the check reads the writer's imports"
    assert set(used) - allowed == set(), f"imported in Slicer's process but neither shipped nor installed: " \
                                         f"{sorted(set(used) - allowed)}"
