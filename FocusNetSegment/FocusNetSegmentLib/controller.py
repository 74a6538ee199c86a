"""The "Segment OARs" panel without Qt: every decision the widget makes.

The widget (``FocusNetSegment.py``) is bindings only (the humble-object
pattern): each Qt signal calls one method here, and after each call it
renders :meth:`PanelController.state` -- which buttons are enabled, what the
segment button, status line, progress bar, clock and log say, the review
table's rows, and whether the panel's timer should tick. What needs the
running application (dialogs, the Segment Editor, slice-view observers,
PyTorch's installer, the DICOM plugins) comes in through a
:class:`PanelView`; the tests give a recording stand-in and drive this class
button by button against a slicer-core scene with the real subprocesses.

One timer drives everything that runs in the background (the segmentation or
the pip install, the finishing thread, click-to-find's worker, the review
clock): the widget ticks :meth:`PanelController.tick` while
``state().ticking`` is true, and nothing polls once the review is finished
and no process is left.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from .logic import SegmentOARsLogic

DEVICES = ("auto", "cuda", "cpu")  # the device combo box's rows
LOG_LINES = 500  # the log area keeps the last lines of the subprocesses' output


@dataclass
class PanelState:
    """What the panel shows after a call (the widget renders it as is)."""
    segment_enabled: bool = False
    segment_text: str = "Segment OARs"
    manual_enabled: bool = False
    accept_enabled: bool = False
    finish_enabled: bool = False
    click_enabled: bool = False
    click_checked: bool = False
    undo_enabled: bool = False
    export_enabled: bool = False
    show3d_enabled: bool = False
    editor_enabled: bool = False
    status: str = ""
    progress: int = 0
    clock: str = "Review time: -"
    model_info: str = ""
    rows: List[Tuple[str, str, str, str, str]] = field(default_factory=list)
    log: List[str] = field(default_factory=list)
    ticking: bool = False


class PanelView:
    """What the controller asks of the running application. The widget
    implements it with Slicer's dialogs and views; every method here is a
    no-op or a "no" so a partial stand-in works in tests."""

    def ask(self, question: str) -> bool:  # Yes/No or OK/Cancel
        return False

    def error(self, text: str, detail: str = "") -> None:
        pass

    def jump_to(self, ras: Sequence[float]) -> None:
        pass

    def edit(self, segmentation_node, volume_node) -> None:
        """Point the Segment Editor at a segmentation (None: at nothing)."""

    def select_segment(self, segment_id: str) -> None:
        pass

    def stop_editing(self) -> None:
        """Deactivate the Segment Editor's effect (a click must not paint too)."""

    def watch_slice_clicks(self, on_click: Callable) -> None:
        """Call ``on_click(slice_node, x, y)`` on a left click in any slice view."""

    def unwatch_slice_clicks(self) -> None:
        pass

    def install_torch(self, requirement: str) -> None:
        raise RuntimeError("no PyTorch installer here")

    def remember_reviewer(self, reviewer: str) -> None:
        pass

    def show_3d(self, segmentation_node) -> None:
        pass

    def dicom_exporter(self):
        return None


def xy_to_ras(slice_node, x: float, y: float) -> List[float]:
    """A slice view's pixel (x, y) -> RAS, from the slice node's XY-to-RAS
    matrix (what the view itself uses)."""
    return list(slice_node.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3])


class PanelController:
    """The panel's behaviour; ``logic`` is the module's logic (Slicer's scene
    or a slicer-core one), ``view`` the application side."""

    def __init__(self, logic: SegmentOARsLogic, view: Optional[PanelView] = None):
        self.logic = logic
        self.view = view or PanelView()
        self.volume = None
        self.model_path = ""
        self.device = "auto"
        self.reviewer = ""
        self.output_folder = ""
        self.manual = False
        self.selected = None  # the organ selected in the review table
        self.status = ""
        self.log: List[str] = []
        self.clicking = False  # "Click to place" is on (slice clicks watched)
        self._after_install = None  # what to do once the background pip install has succeeded
        self._restart_needed: List[str] = []
        self._results = {}  # volume node ID -> the segmentation node of its last result (re-run replaces it)
        self._job_logged = 0
        self._offered = False  # the interrupted reviews, offered on the first enter
        self.broken = ""  # an unexpected error in tick: shown once, then the timer stops

    # -- the form ----------------------------------------------------------------------
    def on_input_changed(self, volume_node) -> PanelState:
        self.volume = volume_node
        return self.state()

    def on_model_changed(self, path: str) -> PanelState:
        self.model_path = path or ""
        return self.state()

    def on_device_changed(self, index: int) -> PanelState:
        self.device = DEVICES[int(index)] if 0 <= int(index) < len(DEVICES) else "auto"
        return self.state()

    def on_reviewer_changed(self, text: str) -> PanelState:
        self.reviewer = text or ""
        self.view.remember_reviewer(self.reviewer)
        return self.state()

    def on_output_folder_changed(self, folder: str) -> PanelState:
        self.output_folder = folder or ""
        return self.state()

    def on_manual_toggled(self, checked: bool) -> PanelState:
        self.manual = bool(checked)
        return self.state()

    def output_folder_shown(self) -> str:
        """The export folder the panel shows (created when missing)."""
        return str(self.logic.export_folder(self.output_folder or None))

    def default_volume(self):
        """The volume the selector starts on: the one chosen before, else the
        scene's first scalar volume."""
        scene = self.logic.scene
        if self.volume is None or scene.GetNodeByID(self.volume.GetID() or "") is not self.volume:
            volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                       for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
            self.volume = next((v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode")), None)  # no label map
        return self.volume

    # -- state -------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.logic.running or self.logic.busy_finishing

    def state(self) -> PanelState:
        logic = self.logic
        busy = self.busy
        running = logic.running
        review_open = logic.can_finish
        click = logic.click
        clicking_live = click is not None and click.state in ("opening", "busy", "ready")
        return PanelState(
            segment_enabled=(running and logic.job.kind == "segment") or
                            (self.volume is not None and not busy),
            segment_text="Cancel" if running and logic.job.kind == "segment" else "Segment OARs",
            manual_enabled=self.volume is not None and self.manual and not busy,
            accept_enabled=review_open and not busy,
            finish_enabled=review_open and not busy,
            click_enabled=review_open and not busy,
            click_checked=self.clicking,
            undo_enabled=logic.case is not None and logic.case.can_undo_place and review_open and not busy,
            export_enabled=logic.can_export and not busy,
            show3d_enabled=logic.segmentation_node is not None,
            editor_enabled=review_open,
            status=self.status,
            progress=logic.progress,
            clock=self._clock_text(),
            model_info=logic.describe_model(self.model_path or None)[0],
            rows=logic.review_rows(),
            log=list(self.log),
            ticking=not self.broken and (running or logic.finishing is not None or clicking_live or review_open or
                     (logic.job is not None and self._job_logged is not None)))  # an end not yet handled

    def _clock_text(self) -> str:
        session = self.logic.session
        if session is None:
            return "Review time: -"
        if session.finished or session.closing:
            return "Review time: finished"
        return f"Review time: {session.now_s() / 60:.1f} min (active {session.active_s / 60:.1f} min)"

    def _say(self, text: str) -> None:
        self.status = text

    def _log(self, lines: Sequence[str]) -> None:
        self.log.extend(line for line in lines if line.strip())
        del self.log[:-LOG_LINES]

    def _fail(self, what: str, error: Exception, detail: str = "") -> None:
        self._say(f"{what} {error}")
        self.view.error(f"{what}\n{error}", detail)

    # -- Segment / Cancel ----------------------------------------------------------------------
    def on_segment(self) -> PanelState:
        """The Segment OARs button; while a segmentation runs it is Cancel."""
        if self.logic.running and self.logic.job.kind == "segment":
            self.logic.cancel()
            self._after_install = None
            self._say("Cancelled.")
            return self.state()
        if self.logic.running:  # the pip install: the button is disabled meanwhile
            return self.state()
        try:
            volume = self.volume
            if volume is None or volume.GetImageData() is None:
                raise ValueError("Select a CT volume with image data to segment.")
            if not self._may_replace(volume):
                return self.state()
            ready = self.ensure_requirements(lambda: self._start(volume))
            if ready:
                self._start(volume)
        except Exception as error:
            self._fail("Could not start the segmentation:", error)
        return self.state()

    def _may_replace(self, volume) -> bool:
        """Segmenting a CT under an open review with edits replaces those
        contours: only after asking (the review stays resumable)."""
        session = self.logic.session
        if session is None or session.finished or self.logic.volume_node is not volume:
            return True
        from .review import EDITED

        edited = [name for name, s in session.states.items() if s.status == EDITED]
        if not edited:
            return True
        return self.view.ask(f"{volume.GetName()} is under review and {', '.join(edited)} "
                             f"{'was' if len(edited) == 1 else 'were'} edited. Segment it again? The new result "
                             "replaces these contours in the scene (the unfinished review can be resumed or "
                             "recorded as incomplete when the result comes).")

    def _start(self, volume) -> None:
        self.logic.start(volume, self.model_path or None, self.device)
        self._job_logged = 0
        self._say("Segmenting...")

    def ensure_requirements(self, then: Callable[[], None]) -> bool:
        """True when everything FocusNet needs is installed. Otherwise asks
        once, listing every package; PyTorch comes from the PyTorch extension
        (blocking, as its installer is), the rest from a background pip install
        after which ``then`` runs. False while installing or when declined."""
        from . import dependencies

        plan = dependencies.install_plan()
        if plan.ready:
            return True
        if plan.torch_action and not dependencies.pytorch_extension_available():
            raise RuntimeError(dependencies.NO_PYTORCH_EXTENSION)
        if not self.view.ask(plan.question()):
            self._say("Not installed: FocusNet cannot segment without " + ", ".join(plan.names()) + ".")
            return False
        if plan.torch_action:
            self._say(f"Installing PyTorch {dependencies.TORCH_REQUIREMENT} (this can take minutes)...")
            try:
                self.view.install_torch(dependencies.TORCH_REQUIREMENT)
            except Exception as error:
                raise RuntimeError(f"{dependencies.TORCH_FAILED} ({error})") from None
            if plan.torch_action == "upgrade" and "torch" in sys.modules:
                self._restart_needed.append("torch")
        if not plan.packages:
            return self._restart_check()
        self.logic.start_install(plan.packages)
        self._job_logged = 0
        self._after_install = then
        self._say("Installing " + ", ".join(plan.packages) + "...")
        return False

    def _restart_check(self) -> bool:
        if not self._restart_needed:
            return True
        names, self._restart_needed = ", ".join(self._restart_needed), []
        self._say(f"Restart Slicer: {names} {'was' if ',' not in names else 'were'} updated while loaded.")
        self.view.error(f"Installed. Restart 3D Slicer before segmenting: {names} "
                        f"{'was' if ',' not in names else 'were'} already loaded in this session.")
        return False

    # -- the timer ------------------------------------------------------------------------------
    def tick(self) -> PanelState:
        """One tick of the panel's timer: the background job's progress and
        end, the finishing thread, click-to-find's answers, the clock. An
        unexpected error is shown once with its traceback in the log, and
        the timer stops (not a traceback every 100 ms)."""
        try:
            self._tick()
        except Exception as error:  # noqa: BLE001  (whatever it is, the user must see it once)
            import traceback

            self.broken = f"{type(error).__name__}: {error}"
            self._log(traceback.format_exc().splitlines())
            self._fail("FocusNet stopped polling after an unexpected error (details in the log):", error)
        return self.state()

    def _tick(self) -> None:
        logic = self.logic
        if logic.job is not None and (logic.running or self._job_logged is not None):
            self._poll_job()
        if logic.finishing is not None and logic.finishing.done:
            self._finished()
        if logic.click is not None:
            for message in logic.poll_click_to_find():
                self._say(message)
            if logic.click is not None and logic.click.state == "failed":
                self.stop_click_to_place()

    def _poll_job(self) -> None:
        logic, job = self.logic, self.logic.job
        events = logic.poll()
        text = logic.status_text(events)
        self._log([f"{event.label}: {event.message}" for event in events])
        output = job.other_output + job.stderr_lines
        self._log(output[self._job_logged or 0:])
        self._job_logged = len(output)
        if text:
            self._say(text)
        if logic.running:
            return
        self._job_logged = None  # ended: handled once
        if job.cancelled:
            return
        if job.kind == "install":
            then, self._after_install = self._after_install, None
            if job.returncode != 0:
                self._say("Installing the requirements failed.")
                self.view.error("Installing the requirements failed (offline?).", job.error_text()[-3000:])
            elif self._restart_check() and then is not None:
                try:
                    then()
                except Exception as error:
                    self._fail("Could not start the segmentation:", error)
            return
        self._load_result()

    def _load_result(self) -> None:
        logic, job = self.logic, self.logic.job
        if job.returncode != 0:  # the error first: no question about resuming a review of a failed run
            try:
                logic.load_result()
            except Exception as error:
                self._fail("Segmentation failed:", error, job.error_text()[-3000:])
            return
        resume = False
        if logic.pending_checkpoint(logic.volume_node) is not None:
            resume = self.view.ask("This CT has an unfinished review. Resume it (its times and statuses; the "
                                   "contours are the new result)? No starts a new review and records the old one "
                                   "as incomplete.")
        previous = self._results.get(logic.volume_node.GetID())
        try:
            node = logic.load_result(reviewer=self.reviewer, resume=resume, replace=previous)
        except Exception as error:
            self._fail("Segmentation failed:", error)
            return
        self._results[logic.volume_node.GetID()] = node
        self._open_review()
        self._say("Review the contours: select an organ to edit it; Finish when done.")

    def _open_review(self) -> None:
        self.selected = None
        self.view.edit(self.logic.segmentation_node, self.logic.volume_node)
        self.logic.session.on_change_after_finish = self._changed_after_finish

    def _changed_after_finish(self, name: str) -> None:
        self._say(f"{name} was changed after Finish: the change is not in the review's timing record (exports "
                  "take the contours as they are now). Segment again for a new timed review.")

    # -- manual baseline ------------------------------------------------------------------------
    def on_start_manual(self) -> PanelState:
        try:
            self.logic.start_manual(self.volume, reviewer=self.reviewer)
        except Exception as error:
            self._fail("Could not start the manual session:", error)
            return self.state()
        self._open_review()
        self._say("Contour the organs from scratch; Finish when done.")
        return self.state()

    # -- the review table ---------------------------------------------------------------------------
    def on_row_selected(self, name: Optional[str]) -> PanelState:
        """A row of the review table: centre the views on the organ and edit it."""
        self.selected = name
        if name is None or self.logic.segmentation_node is None:
            return self.state()
        center = self.logic.organ_center_ras(name)
        if center is not None:
            self.view.jump_to(center)
        self.view.select_segment(name)
        if self.clicking and name not in self.logic.case.organs.small_names:
            self._say(f"Click to place works on the small organs; {name} is edited with the Segment Editor.")
        return self.state()

    def on_accept(self) -> PanelState:
        try:
            self.logic.accept(self.selected)
        except Exception as error:
            self._fail("Could not accept the organ:", error)
        return self.state()

    def on_accept_all(self) -> PanelState:
        try:
            accepted = self.logic.accept_all_unflagged()
            self._say(f"Accepted {len(accepted)} unflagged organ(s).")
        except Exception as error:
            self._fail("Could not accept the organs:", error)
        return self.state()

    # -- click to find --------------------------------------------------------------------------------
    def on_click_to_place(self, checked: bool) -> PanelState:
        if not checked:
            self.stop_click_to_place()
            return self.state()
        try:
            case = self.logic.case
            if case is None:
                raise ValueError("Segment the CT first: click-to-find works on a review.")
            if self.selected not in case.organs.small_names:
                raise ValueError("Select a small organ in the table first (" + ", ".join(case.organs.small_names) +
                                 "); the others are edited with the Segment Editor's tools.")
            self.view.stop_editing()
            click = self.logic.start_click_to_find(self.model_path or None, self.device)
        except Exception as error:
            self.clicking = False
            self._fail("Could not start click-to-find:", error)
            return self.state()
        if not self.clicking:
            self.view.watch_slice_clicks(self.on_slice_click)
        self.clicking = True
        self._say(f"Click on {self.selected} in a slice view." if click.state == "ready" else
                  "Click-to-find is getting ready (the CT is segmented once more, in the background)...")
        return self.state()

    def stop_click_to_place(self) -> None:
        """Slice clicks are no longer taken (the worker stays for the case)."""
        if self.clicking:
            self.view.unwatch_slice_clicks()
        self.clicking = False

    def on_slice_click(self, slice_node, x: float, y: float) -> PanelState:
        """A left click at pixel (x, y) of a slice view while Click to place is on."""
        if not self.clicking:
            return self.state()
        try:
            self.logic.click_to_find(self.selected, xy_to_ras(slice_node, x, y))
            self._say(f"Placing {self.selected}...")
        except Exception as error:
            self._say(f"Click-to-find: {error}")
        return self.state()

    def on_undo_place(self) -> PanelState:
        try:
            organ = self.logic.undo_click_to_find()
            self._say(f"{organ}: placement undone." if organ else "Nothing to undo.")
        except Exception as error:
            self._fail("Could not undo the placement:", error)
        return self.state()

    # -- Finish and export -------------------------------------------------------------------------------
    def on_finish(self) -> PanelState:
        """Finish: the review becomes read-only here; click-to-find's worker
        ends (it is not needed after Finish); the record is computed in the
        background (tick reports it)."""
        self.stop_click_to_place()
        self.logic.stop_click_to_find()
        self.view.stop_editing()
        try:
            self.logic.start_finish()
        except Exception as error:
            self._fail("Could not finish the review:", error)
            return self.state()
        self._say("Finishing: comparing the contours with the AI's...")
        return self.state()

    def _finished(self) -> None:
        call, self.logic.finishing = self.logic.finishing, None
        if call.error is not None:
            self._fail("Could not finish the review:", call.error)
            return
        self._say(f"Finished: {call.result['wall_s'] / 60:.1f} min recorded in {self.logic.log_path()}")

    def on_export(self, kind: str) -> PanelState:
        try:
            path = self.logic.export(kind, self.output_folder or None, dicom=self.view.dicom_exporter())
            self._say(f"Exported {path}")
        except Exception as error:
            self._fail("Export failed:", error)
        return self.state()

    def on_show_3d(self) -> PanelState:
        if self.logic.segmentation_node is not None:
            self.view.show_3d(self.logic.segmentation_node)
        return self.state()

    # -- the module's life ------------------------------------------------------------------------------
    def on_enter(self) -> PanelState:
        """The module is shown: the CT selector's default; the first time,
        the reviews an earlier session left unfinished are offered."""
        self.default_volume()
        if not self._offered:
            self._offered = True
            return self.offer_pending_sessions()
        return self.state()

    def on_exit(self) -> PanelState:
        """Leaving the module: a click in another module's view must not place
        an organ, nor paint with this panel's effect."""
        self.stop_click_to_place()
        self.view.stop_editing()
        return self.state()

    def on_scene_start_close(self) -> PanelState:
        """The scene closes: the segmentation and the review stop (the review's
        checkpoint stays resumable); a pip install goes on (it is Slicer's, not
        the scene's)."""
        self.stop_click_to_place()
        self.view.edit(None, None)
        self.logic.close()
        self._results.clear()
        self.volume = None
        self.selected = None
        self._say("")
        return self.state()

    def on_scene_end_close(self) -> PanelState:
        self.default_volume()
        return self.state()

    def on_cleanup(self) -> PanelState:
        """Slicer quits or the module is reloaded: nothing of FocusNet's keeps
        running, except a pip install (it finishes on its own, its output in
        the session folder's pip-install.log: killing pip half way can break
        Slicer's Python)."""
        self.stop_click_to_place()
        self._after_install = None
        self.logic.close()
        return self.state()

    def pending_sessions(self) -> List:
        from .review import pending_sessions

        return pending_sessions(self.logic.session_folder)

    def offer_pending_sessions(self) -> PanelState:
        """Interrupted reviews found at start: record each as incomplete, or keep
        it to resume when that CT is segmented again."""
        from .review import ReviewSession

        for checkpoint in self.pending_sessions():
            if self.view.ask(f"A review session was interrupted ({checkpoint.name}). Record it as incomplete? "
                             "(No keeps it: segmenting that CT again offers to resume it.)"):
                ReviewSession.mark_incomplete(checkpoint, self.logic.log_path())
        return self.state()
