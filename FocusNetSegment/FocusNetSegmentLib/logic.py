"""Everything behind the "Segment OARs" panel's buttons, without Qt.

The module's widget only builds the panel, binds signals and shows
messages; its logic class is :class:`SegmentOARsLogic` plus the few adapters
that need the running application (Segment Editor, DICOM plugins, SlicerRT).
So every button's path runs headless in pytest against slicer-core, the way
the widget calls it: the CT written to a private work folder, the real
``python -m FocusNetCore segment`` subprocess polled for progress (inside
Slicer ``python`` is PythonSlicer), the result loaded as 22 named segments,
the review (:class:`FocusNetSegmentLib.case.ReviewCase`), exports, the
manual baseline and the model description (read from the bundle without
torch: the Slicer process never imports it).

Work folders (a copy of the CT, the CLI's output) are removed once the result
is loaded, on cancel and on failure.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import SimpleITK as sitk

from . import find_core_directory, process  # noqa: F401  (find_core_directory: part of the API)
from .assist import ClickToFind, ras_to_lps, worker_command
from .case import ReviewCase
from .review import NOT_IN_SCAN, ReviewSession
from .scene import image_from_volume_node
from .startup import MINIMUM_SLICER, check_slicer_version  # noqa: F401  (part of the API)

# Characters Windows (and so most file shares) refuse in a file name, plus '/'.
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]+')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


def safe_file_name(name: str, fallback: str = "segmentation") -> str:
    """A file name stem from a node name that any file system takes:
    "3: CT HEAD/NECK" -> "3_ CT HEAD_NECK"."""
    stem = _UNSAFE.sub("_", name).strip().rstrip(". ")
    if not stem or stem.upper() in _WINDOWS_RESERVED:
        stem = f"{stem}_{fallback}" if stem else fallback
    return stem[:120]


def volume_case_uid(volume_node) -> str:
    """What identifies the CT under review: its DICOM series (the instance
    UIDs Slicer's DICOM loader records) or, for a volume from a file or a
    script, its voxels and geometry. Two different CTs both named "ct" are two
    cases; the same CT loaded again is the same case."""
    from FocusNetCore.caseid import identity_of_image, identity_of_instances

    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if uids:  # the same identity as the review station and the node give the series' folder
        return identity_of_instances(uids).uid
    return identity_of_image(image_from_volume_node(volume_node)).uid


class BackgroundCall:
    """A function run on a worker thread, polled from the GUI's timer."""

    def __init__(self, function: Callable[[], object]):
        self.result, self.error = None, None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function):
        try:
            self.result = function()
        except Exception as error:  # reported to the GUI by the poll
            self.error = error

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None):
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def python_slicer() -> str:
    """The Python that runs FocusNetCore: PythonSlicer inside Slicer."""
    return shutil.which("PythonSlicer") or sys.executable


class SegmentOARsLogic:
    """The module's logic. ``scene`` is Slicer's scene (or a slicer-core one);
    ``session_folder`` holds review checkpoints and the study's log."""

    def __init__(self, scene, session_folder, python: Optional[str] = None, core_directory: Optional[str] = None,
                 default_export_folder: Optional[str] = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.scene = scene
        self.session_folder = Path(session_folder)
        self.python = python or python_slicer()
        self.core_directory = core_directory or find_core_directory(Path(__file__).resolve().parents[1])
        self.default_export_folder = default_export_folder
        self.clock, self.wall = clock, wall
        self.job: Optional[process.SegmentationProcess] = None
        self.progress = 0
        self.work_dir: Optional[Path] = None
        self.volume_node = None
        self.case: Optional[ReviewCase] = None
        self.organ_results: Optional[List[dict]] = None
        self.finishing: Optional[BackgroundCall] = None
        self._model_cache: dict = {}
        self.click: Optional[ClickToFind] = None  # click-to-find's worker, per reviewed case
        self._click_case: Optional[ReviewCase] = None

    # -- environment -------------------------------------------------------------
    def environment(self) -> dict:
        """The child's environment: FocusNetCore importable, output unbuffered."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.core_directory, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log_path(self) -> Path:
        return self.session_folder / "review-log.jsonl"

    def describe_model(self, model_path: Optional[str] = None) -> Tuple[str, bool]:
        """(one line for the panel, whether the bundle is usable), from the
        bundle's metadata alone: no torch, no subprocess; cached per file."""
        from FocusNetCore.bundleinfo import BundleError, describe_bundle, embedded_model_path

        path = Path(model_path) if model_path else embedded_model_path()
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return f"Model: {path} does not exist", False
        if key not in self._model_cache:
            try:
                self._model_cache[key] = (describe_bundle(path), True)
            except BundleError as error:
                self._model_cache[key] = (f"Model unusable: {error}", False)
        return self._model_cache[key]

    def start_install(self, requirements: List[str]) -> process.SegmentationProcess:
        """The pip install in the background (constrained so Slicer's numpy,
        SimpleITK, vtk and pydicom stay as they are), polled like a
        segmentation. Its output goes to ``pip-install.log`` in the session
        folder, not to a pipe: a pip still running when Slicer quits finishes
        instead of dying half way on a closed pipe."""
        from .dependencies import pip_command

        self._ensure_idle()
        command = pip_command(requirements, self.session_folder, python=self.python)
        self.job = process.SegmentationProcess(command, env=dict(os.environ),
                                               log_path=self.session_folder / "pip-install.log").start()
        self.job.kind = "install"
        self.progress = 0
        return self.job

    # -- segmentation ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def _ensure_idle(self):
        if self.running:
            raise RuntimeError("A segmentation is already running: wait for it or cancel it first.")

    def start(self, volume_node, model_path: Optional[str] = None, device: str = "auto"):
        """Write the CT to a private work folder and start ``focusnet segment``
        on it in the background. The CT's voxels and geometry are written as
        they are in the CT's own frame (the patient's); a parent transform is
        applied to the result by placing it under the same transform."""
        self._ensure_idle()
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("Select a CT volume with image data to segment.")
        if device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
        self._remove_work_dir()
        self.volume_node = volume_node
        self.work_dir = Path(tempfile.mkdtemp(prefix="FocusNet-"))
        ct_path = self.work_dir / "input" / "ct.nrrd"
        ct_path.parent.mkdir()
        from FocusNetCore.caseid import identity_of_image

        image = image_from_volume_node(volume_node)
        sitk.WriteImage(image, str(ct_path))
        self._sent = identity_of_image(image)  # the result must come back for exactly this CT
        command = process.segment_command(self.python, [str(ct_path)], str(self.work_dir / "output"),
                                          model=model_path, device=device, output_format="nrrd")
        self.job = process.SegmentationProcess(command, env=self.environment()).start()  # kind "segment"
        self.progress = 0
        return self.job

    def poll(self) -> List[process.ProgressEvent]:
        """New progress events; ``progress`` (0-100) never runs backwards."""
        events = self.job.poll() if self.job else []
        for event in events:
            self.progress = max(self.progress, int(100 * event.fraction))
        return events

    def status_text(self, events: List[process.ProgressEvent]) -> Optional[str]:
        """What the panel's status line says after a poll (None: no news)."""
        if events:
            return f"{events[-1].label}: {events[-1].message}"
        if self.job is not None and self.job.kind == "install" and self.job.other_output:
            return self.job.other_output[-1][:200]
        return None

    def cancel(self) -> None:
        """End the process tree and remove everything it wrote."""
        if self.job is not None:
            self.job.cancel()
            self.poll()
        if self.job is None or getattr(self.job, "kind", "") == "segment":
            self._remove_work_dir()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.2,
             idle: Optional[Callable[[], None]] = None) -> None:
        """Poll until the background job ends (scripts, tests and the
        self-test, which passes ``idle`` to keep Slicer's GUI live; the panel
        polls from its timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the background job did not finish within {timeout} s")
            self.poll()
            if idle is not None:
                idle()
            time.sleep(interval)
        self.poll()

    def _remove_work_dir(self) -> None:
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

    # -- opening a review ---------------------------------------------------------------
    def pending_checkpoint(self, volume_node) -> Optional[Path]:
        """The checkpoint of an unfinished review of this CT (a crash, or a
        session still open here), if any."""
        from FocusNetCore.study import case_id

        checkpoint, _ = ReviewCase.paths(self.session_folder, case_id(volume_case_uid(volume_node)))
        return checkpoint if checkpoint.exists() else None

    def load_result(self, reviewer: str = "", resume: bool = False, replace=None):
        """The finished segmentation as a segmentation node under review.
        A new session starts unless ``resume``: an unfinished one of the same
        CT is then recorded in the log as incomplete (never silently resumed,
        never lost). ``replace``: the segmentation node of an earlier run on
        this CT, which the new result takes the place (and name) of."""
        import json

        from FocusNetCore.caseid import check_same_case, check_same_grid, identity_in_header

        job = self.job
        try:
            if job is None or getattr(job, "kind", "") != "segment":
                raise RuntimeError("No segmentation has been run.")
            if job.running:
                raise RuntimeError("The segmentation is still running.")
            job.poll()
            if job.cancelled:
                raise RuntimeError("The segmentation was cancelled.")
            if job.returncode != 0:
                raise RuntimeError(job.error_text() or f"focusnet segment exited with code {job.returncode}")
            output = self.work_dir / "output"
            report = json.loads((output / "ct.report.json").read_text())
            labels = sitk.ReadImage(str(output / "ct.nrrd"))
            # The contours are this CT's (the case in their header and report), on its grid.
            check_same_case(self._sent, identity_in_header(output / "ct.nrrd"), output / "ct.nrrd")
            check_same_case(self._sent, (report.get("case") or {}).get("uid"), output / "ct.report.json")
            check_same_grid(image_from_volume_node(self.volume_node), labels, output / "ct.nrrd")
        finally:
            self._remove_work_dir()
        return self.open_review(self.volume_node, labels, report, reviewer, resume, replace=replace)

    def open_review(self, volume_node, labels: sitk.Image, report: Optional[dict] = None, reviewer: str = "",
                    resume: bool = False, replace=None):
        """Review contours already on the CT's grid (the segmentation's
        result, or a label map from elsewhere) with ``report``'s flags."""
        self._ensure_idle()
        self.volume_node = volume_node
        self.organ_results = (report or {}).get("organs")
        return self._open_case(volume_node, labels, report, reviewer, resume, replace)

    def start_manual(self, volume_node, reviewer: str = "", resume: bool = False):
        """The manual baseline: empty named segments, timed with mode "manual"."""
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("Select the CT to contour.")
        self._ensure_idle()
        self.volume_node = volume_node
        self.organ_results = None
        return self._open_case(volume_node, None, None, reviewer, resume)

    def _open_case(self, volume_node, labels, report, reviewer, resume, replace=None):
        self.close_session()
        if replace is not None and self.scene.IsNodePresent(replace):
            self.scene.RemoveNode(replace)  # a re-run updates the CT's result: no "OARs_1" beside it
        checkpoint = self.pending_checkpoint(volume_node)
        if checkpoint is not None and not resume:
            ReviewSession.mark_incomplete(checkpoint, self.log_path(), wall=self.wall)
        base = f"{volume_node.GetName()} OARs" + ("" if labels is not None else " (manual)")
        self.case = ReviewCase.open(self.scene, volume_node, labels, folder=self.session_folder,
                                    log_path=self.log_path(), case_uid=volume_case_uid(volume_node),
                                    reviewer=reviewer, report=report, name=self._free_name(base),
                                    resume=resume, clock=self.clock, wall=self.wall)
        node = self.case.segmentation_node
        if volume_node.GetTransformNodeID():
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        return node

    def _free_name(self, base: str) -> str:
        """``base`` while no node has it, else Slicer's next unique name."""
        return base if self.scene.GetFirstNodeByName(base) is None else self.scene.GenerateUniqueName(base)

    def close_session(self) -> None:
        """Stop listening to the open review (its checkpoint stays, so it can
        be resumed or recorded as incomplete)."""
        self.stop_click_to_find()  # its worker holds this case's CT
        if self.case is not None:
            if not self.case.session.finished:
                self.case.session.checkpoint()
            self.case.close()
        self.case = None

    # -- reviewing -------------------------------------------------------------------------
    @property
    def session(self) -> Optional[ReviewSession]:
        return self.case.session if self.case is not None else None

    @property
    def segmentation_node(self):
        return self.case.segmentation_node if self.case is not None else None

    @property
    def busy_finishing(self) -> bool:
        return self.finishing is not None and not self.finishing.done

    @property
    def can_finish(self) -> bool:
        return self.case is not None and not self.case.session.finished and not self.busy_finishing

    @property
    def can_export(self) -> bool:
        return self.case is not None and not self.busy_finishing

    def review_rows(self) -> List[Tuple[str, str, str, str, str]]:
        """The review table: organ, status, volume (cc), confidence, flags."""
        if self.session is None:
            return []
        results = {r["name"]: r for r in (self.organ_results or [])}
        rows = []
        for name, state in self.session.states.items():
            result = results.get(name, {})
            confidence = result.get("confidence")
            flags = "; ".join(state.flags) or (NOT_IN_SCAN if result.get("outside_scan") else "")
            rows.append((name, state.status, f"{float(result.get('volume_cc') or 0.0):.2f}",
                         "" if confidence is None else f"{confidence:.2f}", flags))
        return rows

    def accept(self, name: Optional[str]) -> None:
        session = self._require_session()
        if name not in session.states:
            raise ValueError("Select an organ in the review table first." if name is None
                             else f"{name!r} is not one of the organs under review")
        session.accept(name)

    def accept_all_unflagged(self) -> List[str]:
        return self._require_session().accept_all_unflagged()

    def organ_center_ras(self, name: str):
        """Where to centre the slice views for an organ (None when it is empty)."""
        node = self.segmentation_node
        if node is None or node.GetSegmentation().GetSegment(name) is None:
            return None
        return node.GetSegmentCenterRAS(name)

    def non_empty_organs(self) -> List[str]:
        """The organs that have a contour now (DICOM SEG leaves the others out)."""
        import numpy as np

        present = set(np.unique(sitk.GetArrayFromImage(self.case.final_labels())).tolist())
        return [n for n in self.case.organs.names if self.case.organs.label_of(n) in present]

    def _require_session(self) -> ReviewSession:
        if self.session is None or self.session.finished:
            raise RuntimeError("No review is open: segment a CT or start manual contouring first.")
        return self.session

    def start_finish(self) -> BackgroundCall:
        """Finish the review: the contours are read from the scene here (MRML
        is not thread-safe), the 22 organs' edit metrics and the log record are
        computed on a worker thread, so the GUI stays live."""
        session = self._require_session()
        if self.busy_finishing:
            raise RuntimeError("The review is already being finished.")
        labels = self.case.final_labels()
        session.closing = True  # a contour changed from here on is reported, not recorded (on_change_after_finish)
        case = self.case
        self.finishing = BackgroundCall(lambda: case.finish(labels))
        return self.finishing

    def finish(self) -> dict:
        return self.start_finish().wait()

    # -- export ------------------------------------------------------------------------------
    def export_folder(self, configured: Optional[str] = None) -> Path:
        """The panel's output folder, else Slicer's default scene folder,
        else the home folder; created when missing."""
        folder = Path(configured or self.default_export_folder or Path.home())
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def export(self, kind: str, folder: Optional[str] = None, dicom=None) -> Path:
        """Export the reviewed contours; never replaces a file.
        ``dicom`` (:class:`FocusNetSegmentLib.dicomexport.DicomExporter`) is
        how the running application's DICOM plugins and database are reached;
        without one, RTSTRUCT goes through FocusNetCore's writer."""
        if self.case is None:
            raise RuntimeError("Nothing to export: segment a CT or start manual contouring first.")
        target = self.export_folder(folder)
        base = safe_file_name(self.volume_node.GetName(), "CT")
        if kind in ("seg.nrrd", "nifti"):
            return self.case.export(kind, target, base)
        if kind not in ("rtstruct", "dicomseg"):
            raise ValueError(f"unknown export kind {kind!r}; use seg.nrrd, nifti, rtstruct or dicomseg")
        if dicom is None:
            raise RuntimeError("DICOM export needs the CT loaded from Slicer's DICOM database.")
        return dicom.export(kind, self, target, base)

    # -- click to find -------------------------------------------------------------------
    def start_click_to_find(self, model_path: Optional[str] = None, device: str = "auto") -> ClickToFind:
        """Start ``focusnet worker`` on the reviewed CT (it segments the CT once
        and keeps S-Net's features; poll_click_to_find says when it is ready).
        Started once per case; a failed worker is started again."""
        if self.case is None:
            raise ValueError("Segment the CT first: click-to-find works on a review.")
        if self.click is not None and self.click.state not in ("idle", "failed") and self._click_case is self.case:
            return self.click
        self.stop_click_to_find()
        self.click = ClickToFind(worker_command(self.python, model_path, device), env=self.environment())
        self.click.open(image_from_volume_node(self.volume_node))
        self._click_case = self.case
        return self.click

    def click_to_find(self, organ: Optional[str], ras) -> int:
        """A click at ``ras`` (Slicer's world coordinates, as a slice view gives
        them) for ``organ``: one refine request. The CT's parent transform (a
        registration) is undone first: the worker works in the CT's own frame."""
        if organ is None:
            raise ValueError("Select the organ to place in the review table first.")
        if self.case is None or self.click is None:
            raise ValueError("Click-to-find is not started.")
        if self.case.session.finished:
            raise ValueError("The review is finished: its contours are read-only.")
        if organ not in self.case.organs.small_names:
            raise ValueError(f"Click-to-place is for the small organs ({', '.join(self.case.organs.small_names)}); "
                             f"edit {organ} with the Segment Editor's tools.")
        point = [float(v) for v in ras[:3]]
        transform_node = self.volume_node.GetParentTransformNode()
        if transform_node is not None:
            import vtk

            to_ct = vtk.vtkGeneralTransform()
            transform_node.GetTransformFromWorld(to_ct)
            point = list(to_ct.TransformPoint(point))
        return self.click.click(organ, ras_to_lps(point))

    def poll_click_to_find(self) -> List[str]:
        """Answers since the last poll, applied: each placed contour replaces
        the organ's inside the ROI (an assisted edit). Returns what the status
        line says about each."""
        if self.click is None:
            return []
        messages = []
        for result in self.click.poll():
            if result["op"] == "open":
                messages.append(f"Click-to-find is ready ({result['round_trip_s']:.0f} s): select a small organ, "
                                "then click on it in a slice view." if result.get("ok")
                                else f"Click-to-find failed: {result.get('error')}")
            elif result["op"] == "refine" and result.get("ok"):
                if self.case is not self._click_case or self.case.session.finished:
                    messages.append(f"{result['organ']}: the answer came after the review changed; not placed.")
                    continue
                self.case.place(result["organ"], result["mask"])
                messages.append(f"{result['organ']} placed ({result['voxels']} voxels, "
                                f"{result['round_trip_s']:.2f} s); Undo placement takes it back.")
            else:
                messages.append(f"Click-to-find: {result.get('error')}")
        return messages

    def undo_click_to_find(self) -> Optional[str]:
        if self.case is None or not self.case.can_undo_place:
            return None
        return self.case.undo_place()

    def stop_click_to_find(self) -> None:
        if self.click is not None:
            self.click.close()
        self.click, self._click_case = None, None

    def close(self) -> None:
        """The module is closing or the scene is: stop the segmentation and the
        session. A pip install is left to finish (see start_install)."""
        if self.running and self.job.kind == "segment":
            self.cancel()
        self.stop_click_to_find()
        self.close_session()
        self._remove_work_dir()


def phantom_check(logic: SegmentOARsLogic, name: str = "3: CT HEAD/NECK", timeout: float = 600,
                  idle: Optional[Callable[[], None]] = None) -> dict:
    """The module's self-test, runnable in Slicer (Developer Tools > Self
    Tests) and headless alike: a synthetic phantom through the whole button
    path (segment, load, finish, export). Raises AssertionError naming what
    went wrong; returns what it made. Its review runs in a temporary session
    folder: the user's study log and checkpoints are never touched (a
    self-test is no reviewed case). ``idle`` is called while it waits (in
    Slicer: process the GUI's events, so the application stays live)."""
    import tempfile

    real_folder = logic.session_folder
    with tempfile.TemporaryDirectory(prefix="FocusNet-selftest-") as folder:
        logic.session_folder = Path(folder)
        try:
            return _phantom_check(logic, name, timeout, idle)
        finally:
            logic.close_session()
            logic.session_folder = real_folder


def _phantom_check(logic: SegmentOARsLogic, name: str, timeout: float, idle) -> dict:
    import numpy as np

    from FocusNetCore.phantom import generate_case

    from .scene import export_labels, segment_names, volume_node_from_image

    case = generate_case(2026, "small")
    volume = volume_node_from_image(logic.scene, case.image, name)
    logic.start(volume, device="cpu")
    logic.wait(timeout=timeout, idle=idle)
    node = logic.load_result(reviewer="self-test")
    names = segment_names(node)
    assert names == list(logic.session.organs.names) and len(names) == 22, f"segments: {names}"
    labels = export_labels(logic.scene, node, volume, logic.session.organs)
    assert labels.GetSize() == case.image.GetSize(), "the result is not on the CT's grid"
    assert np.allclose(labels.GetOrigin(), case.image.GetOrigin()), "the result moved"
    assert np.allclose(labels.GetDirection(), case.image.GetDirection()), "the result turned"
    record = logic.finish()
    assert record["mode"] == "ai" and record["status"] == "finished", record
    path = logic.export("seg.nrrd")
    assert path.is_file() and path.name.startswith(safe_file_name(name)), path
    return {"volume": volume, "segmentation": node, "record": record, "export": path}
