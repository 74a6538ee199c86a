"""``focusnet review``: check and correct the AI contours in a browser.

The page shows the CT (axial, coronal, sagittal, 3D) with the FocusNet
segmentation, trame-slicer's segment editor (paint, erase, scissors,
islands, smoothing, threshold ...), the review panel of the Slicer module
(per-OAR status, flags, "accept all unflagged"), the running review clock,
and "Finish & export". Everything below the page — the review session,
flags, timing record, autosave, exports — is FocusNetSegmentLib.ReviewCase,
the code the Slicer module runs.

Files, all under ``--out`` (default ``focusnet-review``):
  <case>.ai.nrrd, <case>.report.json   the AI contours and their report
  <case>.seg.nrrd (+ .rtstruct.dcm, .seg.dcm for DICOM input)    the reviewed export; never replaced:
                                       a second export is "<case> (2).seg.nrrd"
  review-log.jsonl                     the time-savings study's log (one record
                                       appended per finished review)
  sessions/                            checkpoint and autosave of an
                                       unfinished review: closing the page keeps
                                       the session, restarting the command
                                       resumes it
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import SimpleITK as sitk

from FocusNetCore.caseid import (check_on_grid, check_same_case, check_same_frame, check_same_grid,
                                  identity_in_header, identity_of_input, stamp)
from FocusNetCore.imageio import case_name, read_image, write_image
from FocusNetCore.organs import CATALOGUE
from FocusNetSegmentLib.review import NOT_IN_SCAN, not_in_scan

from .access import is_loopback, new_token, page_guard_middleware, token_middleware

# A click-to-find answer whose centre lies further than this from the model's
# contour of the organ is shown and asked about before it replaces the contour
# (the lens in the temporal lobe): organs move less than this between the
# model's guess and the truth, except when the model missed them entirely.
PLACEMENT_CONFIRM_MM = 20.0
# Tests set this to hold the server's thread for so many milliseconds before
# each input message (view events, button presses, state changes), as a
# loaded machine does: the page must still apply input in the order it was made.
SLOW_ENV = "FOCUSNET_REVIEW_SLOW_MS"
INPUT_METHODS = ("trame.rca.event", "trame.trigger", "trame.state.update")


@dataclass
class ReviewOptions:
    input: str
    seg: Optional[str] = None
    model: Optional[str] = None
    out: str = "focusnet-review"
    host: str = "127.0.0.1"
    port: int = 8080
    reviewer: str = ""
    device: str = "auto"
    idle_threshold_s: float = 60.0


# CT window presets (width, level in HU), as radiotherapy planning systems name them.
WINDOW_PRESETS = (("Soft tissue", 400.0, 40.0), ("Bone", 1800.0, 400.0), ("Brain", 80.0, 40.0))
# Window/level by left-drag with no editing tool: HU per pixel, relative to the current window.
WINDOW_PER_PIXEL = 1.0 / 200.0
STAGE_WORDS = {"read": "reading the CT", "preprocess": "preparing", "inference": "segmenting",
               "postprocess": "finishing the contours", "done": "loading the contours", "resume": "resuming"}


def _cc(volume) -> str:
    """A volume in words: two decimals under 10 cc (a lens is 0.2 cc), one above."""
    volume = float(volume)
    return f"{volume:.2f} cc" if volume < 10 else f"{volume:.1f} cc"


def _slow_input_for_tests(seconds: float):
    """Hold the server's one thread ``seconds`` before each input message
    (``SLOW_ENV``): wraps the RPC handlers of the view events, button presses
    and state changes, before the websocket handler reads them."""
    import functools

    from trame_rca.protocol import StreamManager
    from trame_server.protocol import CoreServer

    if seconds <= 0:
        return
    for cls in (CoreServer, StreamManager):
        for name, function in list(vars(cls).items()):
            uris = [u.get("uri") for u in getattr(function, "_wslinkuris", [])]
            if not any(uri in INPUT_METHODS for uri in uris) or getattr(function, "_slowed", False):
                continue

            def slowly(*args, _function=function, **kwargs):
                time.sleep(seconds)  # blocking: every later message waits, as on a loaded machine
                return _function(*args, **kwargs)

            functools.update_wrapper(slowly, function)  # keeps wslink's _wslinkuris
            slowly._slowed = True
            setattr(cls, name, slowly)


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ReviewStation:
    """The trame application: one CT, one review."""

    def __init__(self, options: ReviewOptions, server=None):
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.app.logic import LayoutButtonLogic
        from trame_slicer.app.logic.segmentation import SegmentEditorLogic
        from trame_slicer.core import SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.options = options
        self.input = Path(options.input)
        self.out = Path(options.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # Read the CT first: a bad input fails here, before any server starts.
        self.image = read_image(self.input)
        self.is_dicom = self.input.is_dir()
        # What the case is (its DICOM instances, else its voxels and geometry),
        # not where it lies: every file of this review carries it in its name.
        self.identity = identity_of_input(self.input, self.image)
        self.stem = f"{case_name(self.input)}-{self.identity.tag}"

        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        # The page reloads itself when the server is back after a restart
        # (www/reconnect.js), and sends the reviewer's input in the order it
        # was made, showing when the server is behind (www/ordered-input.js).
        self.server.enable_module({"serve": {"__focusnet": str(Path(__file__).parent / "www")},
                                   "scripts": ["__focusnet/reconnect.js", "__focusnet/ordered-input.js"]})
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        # The views first: trame-slicer 2.0 creates each effect's pipeline per
        # view when the editor registers the effect, and a pipeline made for a
        # view that does not exist yet has no view (painting then fails).
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.case = None
        self.volume = None
        self._clients = set()  # open pages (websocket connections)
        self._drag = None  # window/level drag in progress: (view, x, y, window, level)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # Click to find: FocusNetCore.worker.Worker in this process, holding
        # the S-Net features of the segmentation the review started from (or,
        # for contours from a file or a resumed review, of one run on demand).
        self.worker = None
        self._worker_opening = False
        self._hidden = set()  # organs the reviewer hid (the eye in the list)
        self._pending_place = None  # a far click-to-find answer waiting for the reviewer's word: (organ, mask)
        self.token = None if is_loopback(options.host) else new_token()
        self.secret = new_token()  # this run's wslink secret: wslink's default authenticates nobody
        _slow_input_for_tests(float(os.environ.get(SLOW_ENV, "0") or 0) / 1000.0)

        self.state.trame__title = f"FocusNet review — {self.stem}"
        self.state.update({"fn_progress": 0.0, "fn_progress_text": "starting", "fn_ready": False,
                           "fn_rows": [], "fn_clock": "0:00:00", "fn_active": "0:00:00", "fn_finished": False,
                           "fn_finishing": False, "fn_message": "", "fn_error": "", "fn_warning": "",
                           "fn_missing": "", "fn_model": "", "fn_show3d": False, "fn_wl": "",
                           "fn_selected": "", "fn_click_mode": False, "fn_click_text": "", "fn_can_undo": False,
                           "fn_place_pending": False,
                           "fn_small": [],
                           "fn_presets": [{"name": n, "window": w, "level": lv} for n, w, lv in WINDOW_PRESETS]})
        self._build_ui()
        self._brushes_flat()
        self.ctrl.on_server_bind.add(self._on_bind)
        self.ctrl.on_server_ready.add(self._on_ready)
        self.server.add_protocol_to_configure(self._watch_connections)

    def _brushes_flat(self):
        """Paint, erase and smoothing brushes start as a disc on the slice
        shown, as in Slicer (trame-slicer's panel starts them as a sphere, so
        one stroke on one slice changed a dozen slices); the sphere stays one
        click away in the brush panel."""
        from trame_slicer.app.logic.segmentation import BrushEffectLogic

        for logic in self.editor_logic._effect_logic:
            if isinstance(logic, BrushEffectLogic):
                logic._brush_state.data.use_sphere_brush = False

    # -- server ------------------------------------------------------------------
    def _on_bind(self, wslink_server):
        if self.token is not None:
            wslink_server.app.middlewares.append(token_middleware(self.token))
        wslink_server.app.middlewares.append(page_guard_middleware(self.secret, loopback=self.token is None))

    def _watch_connections(self, protocol):
        """A page open on the case is what runs the review's wall clock: the
        first authenticated page (one that knows this run's secret) shows the
        case, the last one closing hides it. A connection that never
        authenticates (a bare WebSocket) starts no clock and drives nothing."""
        import hmac

        async def validate_token(token, client_id):
            ok = isinstance(token, str) and hmac.compare_digest(token.encode(), self.secret.encode())
            if ok:
                self._clients.add(client_id)
                self._update_shown()
            else:
                print("FocusNet review: refused a page without this run's secret", flush=True)
            return ok

        def on_close(client_id):
            self._clients.discard(client_id)
            self._update_shown()

        protocol.validateToken, protocol.onClose = validate_token, on_close

    def _update_shown(self):
        if self.case is None:
            return
        if self._clients:
            self.case.session.shown()
        else:
            self.case.session.hidden()

    def url(self) -> str:
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "::") else self.options.host
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.server.port}/index.html{query}"

    def _on_ready(self, **_):
        self._loop = asyncio.get_event_loop()
        print(f"FocusNet review: open {self.url()}", flush=True)
        if self.token:
            print("  (bound to a non-loopback address: the URL carries the access token; share it only with "
                  "the reviewer)", flush=True)
        self._loop.create_task(self._start_case())
        self._loop.create_task(self._tick())

    def start(self, **kwargs):
        self.server.start(host=self.options.host, port=self.options.port, open_browser=False,
                          show_connection_info=False, **kwargs)

    # -- the case ------------------------------------------------------------------
    def _ai_paths(self):
        """This case's AI contours and report: the case's identity is in their
        names (two CTs whose folders share a name never share them), in the
        label map's header and in the report."""
        return self.out / f"{self.stem}.ai.nrrd", self.out / f"{self.stem}.report.json"

    def _progress(self, stage: str, fraction: float, message: str):
        text = message if message.startswith(STAGE_WORDS.get(stage, "\0")) else STAGE_WORDS.get(stage, message)
        if stage == "inference" and "out of memory" in message:
            text = message

        def update():
            with self.state:
                self.state.fn_progress = round(100 * fraction, 1)
                self.state.fn_progress_text = text
        if self._loop is not None:
            self._loop.call_soon_threadsafe(update)
        step = int(10 * fraction)  # the terminal too, in the same words, every 10 %
        if step != getattr(self, "_printed_step", None):
            self._printed_step = step
            print(f"FocusNet review: {text}", flush=True)

    def _contours(self):
        """(labels, report) of the AI: from an earlier run of this review (an
        unfinished session resumes on the same contours), or from the model
        now. Runs in a worker thread (the page shows its progress), so it
        touches no MRML: rendering must stay on the server's thread."""
        from FocusNetSegmentLib.case import ReviewCase
        from FocusNetCore.study import case_id

        ai_path, report_path = self._ai_paths()
        checkpoint, _ = ReviewCase.paths(self.out / "sessions", case_id(self.case_uid))
        if checkpoint.exists() and ai_path.exists() and report_path.exists():
            self._progress("resume", 1.0, "resuming the unfinished review")
            report = json.loads(report_path.read_text())
            check_same_case(self.identity, identity_in_header(ai_path), ai_path)
            check_same_case(self.identity, (report.get("case") or {}).get("uid"), report_path)
            labels = sitk.ReadImage(str(ai_path))
            check_same_grid(self.image, labels, ai_path)
            return labels, report
        from FocusNetCore.segment import Segmenter
        from FocusNetCore.study import write_json_atomic

        from FocusNetCore.worker import Worker

        segmenter = Segmenter(self.options.model, device=self.options.device)
        result = segmenter.segment(self.image, progress=self._progress, keep_state=True)
        self.worker = Worker(segmenter)  # click to find reuses this run's S-Net features
        self.worker.state, result.state = result.state, None
        write_image(stamp(result.labels, self.identity), ai_path, overwrite=True)
        report = {"case": self.identity.to_dict(), **result.report()}
        write_json_atomic(report_path, report)
        return result.labels, report

    @property
    def case_uid(self) -> str:
        return self.identity.uid

    def _labels_from_seg(self, path: Path, notes: List[str]) -> sitk.Image:
        """Contours from a file for this CT (``--seg``): a Slicer ``.seg.nrrd``
        (or a label map) or, for a DICOM CT, an RT Structure Set. Refused when
        they say they belong to another case: the case in the file's header or
        in the report beside it, an RTSTRUCT's referenced series and frame of
        reference."""
        from FocusNetCore.organs import get_organ_set
        from FocusNetSegmentLib.scene import export_labels, load_segmentation, segment_names, volume_node_from_image

        organs = get_organ_set("oar22")
        if self._is_rtstruct(path):
            return self._labels_from_rtstruct(path, organs)
        if not path.is_file():
            raise ValueError(f"{path}: no such segmentation file")
        stamped = identity_in_header(path)
        check_same_case(self.identity, stamped, path)
        report = self._report_beside(path)
        if report is not None:
            check_same_case(self.identity, (report.get("case") or {}).get("uid"), path.with_name(
                path.name.replace(".seg.nrrd", ".report.json")))
        check_on_grid(self.image, path)
        if stamped is None and not (report or {}).get("case"):
            notes.append(f"{path.name} does not say which CT it was drawn on (no FocusNet case identity): it lies "
                         "on this CT's grid, but check that these are this patient's contours.")
        scene = self.slicer_app.scene
        reference = volume_node_from_image(scene, self.image, "reference")
        node = load_segmentation(scene, str(path))
        unknown = [n for n in segment_names(node) if n not in organs.names]
        if unknown:
            scene.RemoveNode(node)
            scene.RemoveNode(reference)
            shown = ", ".join(repr(n) for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise ValueError(f"{path}: {len(unknown)} segment(s) are not FocusNet organ names (TG-263): {shown}. "
                             "Give --seg a segmentation whose segments are named as FocusNet's 22 organs (as "
                             "`focusnet segment --format seg.nrrd` and Slicer's export of a FocusNet review write "
                             "them), or an RTSTRUCT of this CT series")
        labels = export_labels(scene, node, reference, organs)
        scene.RemoveNode(node)
        scene.RemoveNode(reference)
        return labels

    def _start_from_seg(self, labels: sitk.Image) -> List[str]:
        """Contours from ``--seg`` start this review. An unfinished review of
        this CT in ``--out`` resumes only if it started from the same contours;
        one that started from others is recorded as incomplete (never mixed
        with these, never lost) and this review starts anew. The starting
        contours are kept as ``<case>.ai.nrrd`` (stamped) to tell next time."""
        import numpy as np

        from FocusNetCore.study import case_id
        from FocusNetSegmentLib.case import ReviewCase
        from FocusNetSegmentLib.review import ReviewSession

        ai_path, _ = self._ai_paths()
        checkpoint, working = ReviewCase.paths(self.out / "sessions", case_id(self.case_uid))
        notes = []
        if checkpoint.exists():
            same = False
            if ai_path.exists() and identity_in_header(ai_path) == self.identity.uid:
                earlier = sitk.ReadImage(str(ai_path))
                same = earlier.GetSize() == labels.GetSize() and np.array_equal(
                    sitk.GetArrayViewFromImage(earlier), sitk.GetArrayViewFromImage(labels))
            if same:
                notes.append("Resuming the unfinished review of this CT, which started from the same contours.")
            else:
                ReviewSession.mark_incomplete(checkpoint, self.out / "review-log.jsonl")
                checkpoint.unlink(missing_ok=True)
                working.unlink(missing_ok=True)
                notes.append("An unfinished review of this CT that started from other contours was recorded as "
                             "incomplete in the study log; this review starts anew from the --seg contours.")
        write_image(stamp(sitk.Image(labels), self.identity), ai_path, overwrite=True)
        return notes

    @staticmethod
    def _is_rtstruct(path: Path) -> bool:
        import pydicom

        try:
            return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), "Modality", "")) == "RTSTRUCT"
        except Exception:  # not DICOM: a .seg.nrrd or label map
            return False

    def _labels_from_rtstruct(self, path: Path, organs) -> sitk.Image:
        import pydicom

        from FocusNetCore.imageio import label_image_like
        from FocusNetCore.rtstruct import read_rtstruct

        if not self.is_dicom:
            raise ValueError(f"{path}: an RT Structure Set references a DICOM CT series; open that series "
                             "(its folder), not a volume file")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
            for study in getattr(frame, "RTReferencedStudySequence", []):
                for series in getattr(study, "RTReferencedSeriesSequence", []):
                    check_same_frame(self.identity, str(series.SeriesInstanceUID),
                                     str(frame.FrameOfReferenceUID), path)
            check_same_frame(self.identity, "", str(getattr(frame, "FrameOfReferenceUID", "")), path)
        array, _, unmatched = read_rtstruct(path, self.image, self.input, organs)
        if unmatched:
            print(f"FocusNet review: {path}: ROIs not read (no FocusNet organ of that name): "
                  + ", ".join(unmatched), flush=True)
        return label_image_like(array, self.image)

    @staticmethod
    def _report_beside(seg_path: Path) -> Optional[dict]:
        name = seg_path.name
        stem = name[: -len(".seg.nrrd")] if name.endswith(".seg.nrrd") else seg_path.stem
        report = seg_path.with_name(stem + ".report.json")
        return json.loads(report.read_text()) if report.is_file() else None

    async def _start_case(self):
        from FocusNetSegmentLib.case import ReviewCase
        from FocusNetSegmentLib.scene import volume_node_from_image

        try:
            volume = volume_node_from_image(self.slicer_app.scene, self.image, self.stem)
            volume.CreateDefaultDisplayNodes()
            self.slicer_app.display_manager.show_volume(volume, do_reset_views=True)
            self.volume = volume
            name, window, level = WINDOW_PRESETS[0]  # soft tissue, where the organs at risk are told apart
            self.set_window(window, level)
            notes = []
            if self.options.seg:  # MRML reads the file: on this thread
                seg = Path(self.options.seg)
                labels, report = self._labels_from_seg(seg, notes), self._report_beside(seg)
                notes += self._start_from_seg(labels)
            else:
                labels, report = await asyncio.to_thread(self._contours)
            self.report = report or {}
            self.case = ReviewCase.open(self.slicer_app.scene, volume, labels, folder=self.out / "sessions",
                                        log_path=self.out / "review-log.jsonl", case_uid=self.case_uid,
                                        reviewer=self.options.reviewer, report=report, name=f"{self.stem} OARs",
                                        client="browser", shown=False, idle_threshold_s=self.options.idle_threshold_s,
                                        save_each_edit=True)
            self.editor_logic.on_volume_changed(volume)
            self.case.session.listeners.append(self._on_session_changed)
            self.case.session.on_change_after_finish = self._on_change_after_finish
            self._observe_window_level(volume)
            self._install_window_level_drag()
            model = self.report.get("model", {})
            missing = [n for n, st in self.case.session.states.items() if "missing" in st.flags]
            outside = not_in_scan(self.report.get("organs"))
            with self.state:
                self.state.fn_model = f"{model.get('name', 'contours from ' + str(self.options.seg))}" + (
                    f" — {model['intended_use']}" if model.get("intended_use") else "")
                self.state.fn_missing = " ".join(
                    ([f"No contour for {', '.join(missing)}: draw it, or leave it empty if the organ is not in "
                      "the scan."] if missing else [])
                    + ([f"Not in the scan (judged from where the other organs lie): {', '.join(outside)}; draw it "
                        "if it is."] if outside else []))
                self.state.fn_small = list(self.case.organs.small_names)
                self.state.fn_ready = True
                self.state.fn_progress = 100
                self.state.fn_progress_text = "ready"
                self._refresh_rows()
            if notes:
                for note in notes:
                    print(f"FocusNet review: {note}", flush=True)
                with self.state:
                    self.state.fn_warning = " ".join(notes)
            self._update_shown()  # a page already open sees the case from now on
            print(f"FocusNet review: ready: {self.url()}", flush=True)
        except Exception as error:  # shown on the page and in the terminal
            print(f"FocusNet review: error: {error}", file=sys.stderr, flush=True)
            with self.state:
                self.state.fn_error = str(error)

    async def _tick(self):
        while True:
            if self.case is not None and not self.state.fn_finished:
                with self.state:
                    self.state.fn_clock = _clock_text(self.case.session.now_s())
                    self.state.fn_active = _clock_text(self.case.session.active_s)
            await asyncio.sleep(1.0)

    def _on_session_changed(self):
        """After each edit or accept: refresh the panel (the contours are
        already on disk: the case saves them before it counts an edit)."""
        if self._loop is None:
            return
        if threading.current_thread() is threading.main_thread():
            self._refresh_rows()
            self.state.flush()

    def _refresh_rows(self):
        """The one organ list: flagged organs first, each with its colour,
        status, volume, confidence, flags in words and visibility."""
        from FocusNetSegmentLib.scene import segment_volumes_cc

        session = self.case.session
        results = {r["name"]: r for r in (self.report.get("organs") or [])}
        display = self.case.segmentation_node.GetDisplayNode()
        now = segment_volumes_cc(self.case.segmentation_node)  # live: the contours as edited
        rows = []
        for order, name in enumerate(session.organs.names):
            st = session.states[name]
            r, g, b = CATALOGUE[name].color
            result = results.get(name, {})
            confidence = result.get("confidence")
            ai_volume = result.get("volume_cc")
            volume = now.get(name, ai_volume)
            changed = ai_volume is not None and volume is not None and abs(float(volume) - float(ai_volume)) >= 0.005
            rows.append({"name": name, "color": f"#{r:02x}{g:02x}{b:02x}", "status": st.status, "edits": st.edits,
                         "flags": "; ".join(st.flags), "flagged": bool(st.flags),
                         "note": NOT_IN_SCAN if result.get("outside_scan") and not st.flags and not volume else "",
                         "volume": "" if volume is None else _cc(volume),
                         "ai_volume": f"AI {_cc(ai_volume)}" if changed else "",
                         "confidence": "" if confidence is None else f"{float(confidence):.2f}",
                         "visible": bool(display.GetSegmentVisibility(name)) if display is not None else True,
                         "order": order})
        rows.sort(key=lambda row: (not row["flagged"], row["order"]))
        self.state.fn_rows = rows

    # -- panel actions ------------------------------------------------------------
    def select_organ(self, name: str):
        if self.case is None:
            return
        if self._pending_place is not None and self._pending_place[0] != name:
            self.discard_place()  # a far answer is asked about for its own organ only
        self.state.fn_selected = name
        self.editor_logic.segmentation_editor.set_active_segment_id(name)
        self._jump_to(name)
        if self.state.fn_click_mode:
            self.state.fn_click_text = self._click_prompt()

    # -- click to find --------------------------------------------------------------
    def _click_prompt(self) -> str:
        organ = self.state.fn_selected
        if organ not in self.case.organs.small_names:
            return ("Select a small organ (" + ", ".join(self.case.organs.small_names) + "): click-placing is for "
                    "those; edit the others with the tools.")
        if self.worker is None or self.worker.state is None:
            return "Click to find is getting ready (the CT is segmented once more)..."
        return f"Click on {organ} in a slice view."

    def toggle_click_mode(self):
        """"Click to place": a click in a slice view segments the selected
        small organ there with FocusNetv2's small-organ branch."""
        if not self._can_review():
            return
        on = not self.state.fn_click_mode
        self.state.fn_click_mode = on
        if not on:
            self._pending_place = None
            self.state.fn_place_pending = False
            self.state.fn_click_text = ""
            return
        self.editor_logic.segmentation_editor.deactivate_effect()  # a click places; it must not paint
        if (self.worker is None or self.worker.state is None) and not self._worker_opening and self._loop:
            self._worker_opening = True
            self._loop.create_task(self._open_worker())
        self.state.fn_click_text = self._click_prompt()

    async def _open_worker(self):
        from FocusNetCore.segment import Segmenter
        from FocusNetCore.worker import Worker

        def open_case():
            worker = Worker(Segmenter(self.options.model, device=self.options.device))
            worker.open(str(self.input))
            return worker

        try:
            self.worker = await asyncio.to_thread(open_case)
            text = self._click_prompt()
        except Exception as error:
            text = f"Click to find failed: {error}"
        self._worker_opening = False
        with self.state:
            if self.state.fn_click_mode:
                self.state.fn_click_text = text

    def _click(self, view, x: int, y: int):
        """A click at pixel (x, y) of a slice view while "Click to place" is on."""
        import numpy as np

        organ = self.state.fn_selected
        slice_node = view._view_node
        ras = slice_node.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3]
        lps = [-ras[0], -ras[1], ras[2]]
        print(f"FocusNet review: click to find {organ or '(no organ)'} at LPS ({lps[0]:.1f}, {lps[1]:.1f}, "
              f"{lps[2]:.1f}) mm", flush=True)
        if organ not in self.case.organs.small_names or self.worker is None or self.worker.state is None:
            self.state.fn_click_text = self._click_prompt()
            self.state.flush()
            return
        self.state.fn_click_text = f"placing {organ}..."
        self.state.flush()
        self._loop.create_task(self._place(organ, np.asarray(lps)))

    async def _place(self, organ: str, lps):
        import time

        start = time.perf_counter()
        try:
            mask, _, _ = await asyncio.to_thread(self.worker.place, organ, lps)
            if not self._can_review():
                raise RuntimeError("the review was finished meanwhile")
            voxels = int(sitk.GetArrayViewFromImage(mask).sum())
            distance = self.case.placement_distance_mm(organ, mask) if voxels else None
            if not voxels:
                text = f"{organ}: nothing found there; click on the organ itself."
            elif distance is not None and distance > PLACEMENT_CONFIRM_MM:
                self._pending_place = (organ, mask)
                text = (f"{organ} found {distance:.0f} mm from where the model put it ({voxels} voxels): is this "
                        f"{organ}? Replace its contour with it, or discard.")
            else:
                text = self._apply_place(organ, mask) + f" ({time.perf_counter() - start:.2f} s)"
        except Exception as error:
            text = f"Click to find: {error}"
        with self.state:
            self.state.fn_click_text = text
            self.state.fn_place_pending = self._pending_place is not None
            self.state.fn_can_undo = self.case.can_undo_place
            self._refresh_rows()

    def _apply_place(self, organ: str, mask) -> str:
        """Replace ``organ``'s contour with a click-to-find answer (MRML: on
        the server's thread); the words that say what changed."""
        changed = self.case.place(organ, mask)
        taken = (f"; taken from {', '.join(changed['taken_from'])}" if changed["taken_from"] else "")
        return (f"{organ} placed: {changed['before_cc']:.2f} cc -> {changed['after_cc']:.2f} cc{taken}. "
                "Undo placement takes it back.")

    def confirm_place(self):
        """The reviewer says the far placement is the organ: replace."""
        pending, self._pending_place = self._pending_place, None
        self.state.fn_place_pending = False
        if pending is None or not self._can_review():
            return
        try:
            self.state.fn_click_text = self._apply_place(*pending)
        except Exception as error:
            self.state.fn_click_text = f"Click to find: {error}"
        self.state.fn_can_undo = self.case.can_undo_place
        self._refresh_rows()

    def discard_place(self):
        pending, self._pending_place = self._pending_place, None
        self.state.fn_place_pending = False
        if pending is not None:
            self.state.fn_click_text = f"{pending[0]}: placement discarded; the contour is unchanged."

    def undo_place(self):
        if not self._can_review():
            return
        organ = self.case.undo_place()
        self.state.fn_click_text = f"{organ}: placement undone." if organ else "Nothing to undo."
        self.state.fn_can_undo = self.case.can_undo_place
        self._refresh_rows()

    def _jump_to(self, name: str):
        node = self.case.segmentation_node
        if node.GetSegmentation().GetSegment(name) is None:
            return
        center = node.GetSegmentCenterRAS(name)
        if center is None:
            return
        for view in self.slicer_app.view_manager.get_slice_views():
            slice_node = view._view_node  # trame-slicer keeps the vtkMRMLSliceNode here
            if slice_node is not None:
                slice_node.JumpSlice(center[0], center[1], center[2])

    def toggle_visibility(self, name: str):
        if self.case is None:
            return
        display = self.case.segmentation_node.GetDisplayNode()
        display.SetSegmentVisibility(name, not display.GetSegmentVisibility(name))  # activity: "display"
        self._hidden = {n for n in self.case.organs.names if not display.GetSegmentVisibility(n)}
        self._refresh_rows()

    def _after_undo_redo(self, *_):
        """An undo or redo is an edit of the organs it changed, recorded now;
        the organs the reviewer hid stay hidden, the others shown; the list
        shows the contours as they now are."""
        if self.case is None:
            return
        self.case.session.record_changes()
        display = self.case.segmentation_node.GetDisplayNode()
        if display is not None:
            for name in self.case.organs.names:
                if bool(display.GetSegmentVisibility(name)) == (name in self._hidden):
                    display.SetSegmentVisibility(name, name not in self._hidden)
        with self.state:
            self._refresh_rows()

    def accept(self, name: str):
        if self._can_review():
            self.case.session.accept(name)

    def accept_all(self):
        if self._can_review():
            accepted = self.case.session.accept_all_unflagged()
            self.state.fn_message = f"accepted {len(accepted)} unflagged organ(s)"

    def _can_review(self) -> bool:
        return self.case is not None and not self.case.session.finished and not self.state.fn_finishing

    def toggle_3d(self):
        """Organ surfaces in the 3D view (the segment editor's closed-surface
        representation; making it is no edit)."""
        show = not self.state.fn_show3d
        self.editor_logic.data.segment_display.show_3d = show
        self.state.fn_show3d = show

    def set_window(self, window: float, level: float):
        if self.volume is not None:
            display = self.volume.GetDisplayNode()
            display.AutoWindowLevelOff()
            display.SetWindowLevel(float(window), float(level))  # activity: "window_level"

    def _observe_window_level(self, volume):
        def update(*_):
            display = volume.GetDisplayNode()
            with self.state:  # flushed also when a drag in a view changed it
                self.state.fn_wl = f"W {display.GetWindow():.0f} / L {display.GetLevel():.0f}"

        volume.GetDisplayNode().AddObserver("ModifiedEvent", update)
        update()

    def _install_window_level_drag(self):
        """Left-drag in a slice view with no editing tool changes the window
        (left/right) and the level (up/down), as in Slicer."""
        import vtk

        for view in self.slicer_app.view_manager.get_slice_views():
            interactor = view.interactor()

            def press(caller, event, view=view):
                if self.segmentation_editor_tool() or self.volume is None:
                    return
                if self.state.fn_click_mode and self._can_review():
                    self._click(view, *caller.GetEventPosition())
                    return
                display = self.volume.GetDisplayNode()
                x, y = caller.GetEventPosition()
                self._drag = (view, x, y, display.GetWindow(), display.GetLevel())

            def move(caller, event, view=view):
                if self._drag is None or self._drag[0] is not view:
                    return
                _, x0, y0, window, level = self._drag
                x, y = caller.GetEventPosition()
                step = max(window, 1.0) * WINDOW_PER_PIXEL
                self.set_window(max(1.0, window + (x - x0) * step), level + (y - y0) * step)

            def release(caller, event):
                self._drag = None

            interactor.AddObserver(vtk.vtkCommand.LeftButtonPressEvent, press, 100.0)
            interactor.AddObserver(vtk.vtkCommand.MouseMoveEvent, move, 100.0)
            interactor.AddObserver(vtk.vtkCommand.LeftButtonReleaseEvent, release, 100.0)

    def _on_tool_chosen(self, **_):
        if self.case is not None:
            self.case.session.activity("selection")
        if self.state.fn_click_mode and self.segmentation_editor_tool():
            self.state.fn_click_mode = False  # an editing tool takes the clicks from here on

    def segmentation_editor_tool(self) -> str:
        """The active editing tool's name ("" for none: the arrow)."""
        from trame_slicer.segmentation import SegmentationEffectNoTool

        name = self.editor_logic.segmentation_editor.get_active_effect_name() or ""
        return "" if name == SegmentationEffectNoTool.get_effect_name() else name

    def _on_change_after_finish(self, name: str):
        with self.state:
            self.state.fn_warning = (f"{name} was changed after Finish: the review is finished and read-only, so "
                                     "this change is not saved. Start a new review of this case to change it.")

    def finish(self):
        """Export and record on a worker thread (the metrics of 22 organs take
        seconds); the page shows progress and Finish is disabled meanwhile."""
        if not self._can_review():
            return
        self.state.fn_click_mode = False
        self.state.fn_finishing = True
        self.state.fn_message = "Finishing: exporting the contours and computing the edit metrics..."
        self.editor_logic.segmentation_editor.deactivate_effect()  # read-only from here on
        self.case.session.closing = True
        try:  # the scene's part here (MRML is not thread-safe): the contours, and the .seg.nrrd by Slicer's writer
            final = self.case.final_labels()
            seg_nrrd = self.case.export("seg.nrrd", self.out, self.stem)
        except Exception as error:
            self._finish_done([], None, error)
            return
        if self._loop is not None:
            self._loop.create_task(self._finish(final, seg_nrrd))
        else:  # no server (tests of the station's logic): finish now
            self._finish_done(*self._export_and_record(final, seg_nrrd))

    async def _finish(self, final, seg_nrrd):
        result = await asyncio.to_thread(self._export_and_record, final, seg_nrrd)
        with self.state:
            self._finish_done(*result)

    def _export_and_record(self, final, seg_nrrd):
        written: List[Path] = [seg_nrrd]
        try:
            if self.is_dicom:
                for kind in ("rtstruct", "dicomseg"):
                    written.append(self.case.export(kind, self.out, self.stem, ct_series_folder=self.input,
                                                    labels=final))
            return written, self.case.finish(final), None
        except Exception as error:
            return written, None, error

    def _finish_done(self, written, record, error):
        self.state.fn_finishing = False
        if error is not None:
            self.case.session.closing = False  # the review goes on; Finish can be tried again
            self.state.fn_error = (f"Finish failed: {error}"
                                   + (f" (already written: {', '.join(str(p) for p in written)})" if written else ""))
            self.state.fn_message = ""
            return
        self.state.fn_error = ""
        self.state.fn_finished = True
        self.state.fn_clock = _clock_text(record["wall_s"])
        self.state.fn_active = _clock_text(record["active_s"])
        self.state.fn_message = ("Exported " + ", ".join(str(p) for p in written)
                                 + f"; timing record appended to {self.case.session.log_path}. "
                                 "The review is finished and read-only.")
        self._refresh_rows()
        print(f"FocusNet review: {self.state.fn_message}", flush=True)

    # -- page ------------------------------------------------------------------------
    def _build_ui(self):
        from trame.widgets import html
        from trame.widgets import vuetify3 as v
        from trame_slicer.app.ui import LayoutButton, SegmentEditorUndoRedoUI
        from trame_slicer.app.ui.viewer_layout import ViewerLayout

        with ViewerLayout(self.server, is_drawer_visible=True) as layout:
            self.layout = layout
            layout.drawer.width = 480  # the organ list's columns and the flags' words fit without wrapping
            layout.title.set_text("FocusNet review")
            layout.title.style = "user-select: none; flex: 0 0 auto;"
            with layout.appbar:
                # The display controls sit in the bar, always in sight (at 1280 x 800 the
                # drawer below the organ list is taken by the editing tool's options).
                self._build_display_controls(html, v)
                html.Span("{{ fn_model }}", classes="text-caption mx-4", title=("fn_model",), id="fn-model",
                          style="opacity: 0.7; max-width: 24vw; overflow: hidden; text-overflow: ellipsis; "
                                "white-space: nowrap;")
                v.VChip("Review {{ fn_clock }} · active {{ fn_active }}", classes="mx-2", id="fn-clock",
                        prepend_icon="mdi-timer-outline")
            with layout.drawer:
                # A column the drawer's height: the organ list takes what the panel's other
                # parts and the editing tool's options leave, and scrolls (all 22 rows fit on
                # a 900-pixel-high screen with no tool open), so nothing falls under the footer.
                with html.Div(style="display: flex; flex-direction: column; height: 100%;", id="fn-drawer",
                              classes="pa-2"):
                    with html.Div(id="fn-review-panel", style="display: contents;"):  # its parts: the column's
                        v.VProgressLinear(v_if="!fn_ready && !fn_error", model_value=("fn_progress",), height=18,
                                          color="primary", id="fn-progress",
                                          children=["{{ fn_progress_text }}"])
                        v.VAlert(v_if="fn_error", type="error", density="compact", text=("fn_error",), id="fn-error")
                        v.VAlert(v_if="fn_warning", type="warning", density="compact", text=("fn_warning",),
                                 id="fn-warning")
                        v.VAlert(v_if="fn_missing", type="info", density="compact", text=("fn_missing",),
                                 id="fn-missing", classes="text-caption py-1", icon=False)
                        html.Div(("{{ fn_selected ? 'Selected: ' + fn_selected : "
                                  "'No organ selected: click one in the list' }}"),
                                 v_if="fn_ready", id="fn-selected", classes="text-body-2 font-weight-bold mt-1")
                        self._build_organ_list(html, v)
                        with html.Div(classes="d-flex flex-wrap mt-2", style="gap: 6px;"):
                            v.VBtn("Accept all unflagged", size="small", id="fn-accept-all",
                                   disabled=("!fn_ready || fn_finished || fn_finishing",), click=self.accept_all)
                            v.VBtn("Finish & export", size="small", color="primary", id="fn-finish",
                                   loading=("fn_finishing",), disabled=("!fn_ready || fn_finished || fn_finishing",),
                                   click=self.finish)
                        with html.Div(classes="d-flex flex-wrap align-center mt-2", style="gap: 6px;", v_if="fn_ready"):
                            v.VBtn("Click to place", size="small", id="fn-click-place", prepend_icon="mdi-target",
                                   variant=("fn_click_mode ? 'flat' : 'tonal'",),
                                   color=("fn_click_mode ? 'primary' : ''",),
                                   disabled=("fn_finished || fn_finishing",), click=self.toggle_click_mode)
                            v.VBtn("Undo placement", size="small", variant="tonal", id="fn-click-undo",
                                   disabled=("!fn_can_undo || fn_finished || fn_finishing",), click=self.undo_place)
                        html.Div("{{ fn_click_text }}", classes="text-caption", id="fn-click-text", v_if="fn_click_mode")
                        with html.Div(classes="d-flex flex-wrap mt-1", style="gap: 6px;", v_if="fn_place_pending"):
                            v.VBtn("Replace", size="small", color="warning", id="fn-place-confirm",
                                   click=self.confirm_place)
                            v.VBtn("Discard", size="small", variant="tonal", id="fn-place-discard",
                                   click=self.discard_place)
                        v.VProgressLinear(v_if="fn_finishing", indeterminate=True, color="primary", classes="mt-1",
                                          id="fn-finish-progress")
                        html.Div("{{ fn_message }}", classes="text-caption mt-1", id="fn-message")
                    v.VDivider()
                    self.editor_ui = _review_editor_ui()(v_if="!fn_finished && !fn_finishing", id="fn-editor",
                                                         style="flex: 0 0 auto;")
            with layout.toolbar:
                self.layout_button = LayoutButton(classes="mt-1")
                with html.Div(v_if="fn_ready && !fn_finished && !fn_finishing", id="fn-tools",
                              classes="d-flex flex-column align-center"):
                    self.editor_ui.build_effect_buttons(all=True)  # every effect, once (not again in the panel)
            with layout.undo_redo:
                with html.Div(v_if="!fn_finished && !fn_finishing"):
                    SegmentEditorUndoRedoUI(editor_ui=self.editor_ui)
            with layout.content:
                self.layout_logic.layout_manager.initialize_layout_grid(layout)
        self.editor_logic.set_ui(self.editor_ui)
        # After trame-slicer's own handlers (connected just above): an undo or redo copies a
        # saved segmentation in, which neither fires the edit observer nor keeps visibility.
        self.editor_ui.undo_clicked.connect(self._after_undo_redo)
        self.editor_ui.redo_clicked.connect(self._after_undo_redo)
        # Choosing an editing tool is an act of reviewing (in Slicer the
        # segment editor node's change says the same).
        self.state.change(self.editor_ui._typed_state.name.active_effect_name)(self._on_tool_chosen)
        self.layout_logic.set_ui(self.layout_button)

    def _build_organ_list(self, html, v):
        """One compact row per organ, flagged organs first: colour, name,
        volume, confidence, status, visibility, Accept, and the flags' reasons
        in words under the name. All 22 fit a 900-pixel-high screen."""
        from trame.widgets import client

        html.Div("Organs at risk (flagged first)", classes="text-subtitle-2 mt-1")
        with html.Div(style="flex: 1 1 auto; min-height: 96px; overflow-y: auto;", id="fn-organs-scroll"), \
                v.VTable(density="compact", v_if="fn_ready", id="fn-organs", classes="fn-organs"):
            with html.Thead(), html.Tr():
                for title in ("", "organ", "volume", "conf.", "status", "", ""):
                    html.Th(title)
            with html.Tbody():
                with html.Tr(v_for="row in fn_rows", key="row.name", classes="fn-organ-row",
                             style=("{background: row.flagged ? 'rgba(244, 67, 54, 0.07)' : ''}",)):
                    with html.Td(style="width: 12px; padding: 0 4px;"):
                        html.Span(style=("{background: row.color, display: 'inline-block', width: '10px', "
                                         "height: '10px', 'border-radius': '2px'}",))
                    with html.Td(style="cursor: pointer; padding: 0 4px;", click=(self.select_organ, "[row.name]")):
                        html.Div("{{ row.name }}", classes="fn-organ-name", style="white-space: nowrap;")
                        html.Div("{{ row.flags }}", v_if="row.flagged", classes="fn-flags text-red",
                                 style="font-size: 11px; line-height: 1.2;")
                        html.Div("{{ row.note }}", v_if="row.note", classes="fn-note",
                                 style="font-size: 11px; line-height: 1.2; opacity: 0.7;")
                    with html.Td(style="padding: 0 4px; white-space: nowrap;"):
                        html.Div("{{ row.volume }}", classes="fn-volume")
                        html.Div("{{ row.ai_volume }}", v_if="row.ai_volume", classes="fn-ai-volume",
                                 style="font-size: 10px; opacity: 0.7;")
                    html.Td("{{ row.confidence }}", classes="fn-confidence", style="padding: 0 4px;")
                    with html.Td(style="padding: 0 4px;"):
                        v.VChip("{{ row.status }}", size="x-small", classes="fn-status",
                                color=("row.status === 'accepted' ? 'green' : "
                                       "(row.status === 'edited' ? 'orange' : 'grey')",))
                    with html.Td(style="padding: 0 2px;"):
                        v.VIcon(icon=("row.visible ? 'mdi-eye-outline' : 'mdi-eye-off-outline'",), size="small",
                                classes="fn-visibility", click=(self.toggle_visibility, "[row.name]"))
                    with html.Td(style="padding: 0 2px;"):
                        v.VBtn("Accept", size="x-small", variant="tonal", classes="fn-accept",
                               disabled=("fn_finished || fn_finishing || row.status !== 'unreviewed'",),
                               click=(self.accept, "[row.name]"))
        client.Style("#fn-editor.fill-height { height: auto !important; } "  # its options' height, not the drawer's
                     "#fn-review-panel > * { flex: 0 0 auto; } #fn-review-panel > #fn-organs-scroll { flex: 1 1 auto; } "
                     ".fn-organs td { height: 24px !important; font-size: 12px; } "
                   ".fn-organs th { height: 20px !important; font-size: 11px; padding: 0 4px !important; }")

    def _build_display_controls(self, html, v):
        with html.Div(classes="d-flex align-center mx-2", style="gap: 4px; white-space: nowrap;", v_if="fn_ready",
                      id="fn-display"):
            v.VBtn("3D surfaces", size="x-small", id="fn-show3d", prepend_icon="mdi-cube-outline",
                   variant=("fn_show3d ? 'flat' : 'tonal'",), color=("fn_show3d ? 'primary' : ''",),
                   click=self.toggle_3d)
            v.VBtn("{{ preset.name }}", v_for="preset in fn_presets", key="preset.name", size="x-small",
                   variant="tonal", classes="fn-preset",
                   click=(self.set_window, "[preset.window, preset.level]"))
            html.Span("{{ fn_wl }}", classes="text-caption", id="fn-wl",
                      title="Window/level: drag with the arrow tool (left/right: window, up/down: level).")


def _review_editor_ui():
    """trame-slicer's segment editor panel without its own segment list (which
    has delete buttons): the review panel is the one organ list."""
    from trame.widgets import html
    from trame.widgets.vuetify3 import VCard, VCardText, VDivider
    from trame_slicer.app.ui.segmentation import segment_editor_ui as editor
    from trame_slicer.segmentation import (SegmentationEffectDraw, SegmentationEffectErase,
                                           SegmentationEffectIslands, SegmentationEffectLogicalOperators,
                                           SegmentationEffectPaint, SegmentationEffectScissors,
                                           SegmentationEffectSmoothing, SegmentationEffectThreshold)

    class ReviewEditorUI(editor.SegmentEditorUI):
        def _build_ui(self):
            with self:
                self.edit_ui._build_color_dialog()
                with html.Div(v_if="false"):  # never rendered: the signals stay wired, no second list
                    self._create_segment_list()
                active = self._typed_state.name.segment_list.active_segment_id
                with VCard(v_if=(active,), variant="flat", style="display: flex; flex-direction: column;"):
                    # the effect buttons are in the toolbar (#fn-tools), once
                    with VCardText(style="display: flex; flex-direction: column; overflow-y: auto;"):
                        with html.Div(style="margin-bottom: 10px;"):
                            self._register_effect_ui(SegmentationEffectPaint, editor.PaintEffectUI)
                            self._register_effect_ui(SegmentationEffectErase, editor.PaintEffectUI)
                            self._register_effect_ui(SegmentationEffectLogicalOperators,
                                                     editor.LogicalOperatorsEffectUI)
                            self._register_effect_ui(SegmentationEffectThreshold, editor.ThresholdEffectUI)
                            self._register_effect_ui(SegmentationEffectIslands, editor.IslandsEffectUI)
                            self._register_effect_ui(SegmentationEffectDraw, editor.DrawEffectUI)
                            self._register_effect_ui(SegmentationEffectScissors, editor.ScissorsEffectUI)
                            self._register_effect_ui(SegmentationEffectSmoothing, editor.SmoothingEffectUI)
                        VDivider()
                        editor.SegmentDisplayUI(typed_state=self.sub_state(self._typed_state.name.segment_display),
                                                variant="flat")
                        VDivider()
                        editor.SegmentEditAreaUI(
                            segment_edit_area_typed_state=self.sub_state(self._typed_state.name.segment_edit_area),
                            variant="flat")

    return ReviewEditorUI
