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
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import SimpleITK as sitk

from FocusNetCore.imageio import case_name, read_image, write_image
from FocusNetCore.organs import CATALOGUE

from .access import is_loopback, new_token, token_middleware

AUTOSAVE_DELAY_S = 3.0


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
        self.stem = case_name(self.input)
        # Read the CT first: a bad input fails here, before any server starts.
        self.image = read_image(self.input)
        self.is_dicom = self.input.is_dir()

        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        # The views first: trame-slicer 2.0 creates each effect's pipeline per
        # view when the editor registers the effect, and a pipeline made for a
        # view that does not exist yet has no view (painting then fails).
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.case = None
        self._autosave_handle = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.token = None if is_loopback(options.host) else new_token()

        self.state.trame__title = f"FocusNet review — {self.stem}"
        self.state.update({"fn_progress": 0.0, "fn_progress_text": "starting", "fn_ready": False,
                           "fn_rows": [], "fn_clock": "0:00:00", "fn_active": "0:00:00", "fn_finished": False,
                           "fn_message": "", "fn_error": "", "fn_model": ""})
        self._build_ui()
        self.ctrl.on_server_bind.add(self._on_bind)
        self.ctrl.on_server_ready.add(self._on_ready)

    # -- server ------------------------------------------------------------------
    def _on_bind(self, wslink_server):
        if self.token is not None:
            wslink_server.app.middlewares.append(token_middleware(self.token))

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
        return self.out / f"{self.stem}.ai.nrrd", self.out / f"{self.stem}.report.json"

    def _progress(self, stage: str, fraction: float, message: str):
        def update():
            with self.state:
                self.state.fn_progress = round(100 * fraction, 1)
                self.state.fn_progress_text = message
        if self._loop is not None:
            self._loop.call_soon_threadsafe(update)

    def _contours(self):
        """(labels, report) of the AI: from --seg, from an earlier run of this
        review (an unfinished session resumes on the same contours), or from
        the model now (in a worker thread; the page shows its progress)."""
        from FocusNetSegmentLib.case import ReviewCase
        from FocusNetCore.study import case_id

        ai_path, report_path = self._ai_paths()
        checkpoint, _ = ReviewCase.paths(self.out / "sessions", case_id(self.case_uid))
        if self.options.seg:
            return self._labels_from_seg(Path(self.options.seg)), self._report_beside(Path(self.options.seg))
        if checkpoint.exists() and ai_path.exists() and report_path.exists():
            self._progress("resume", 1.0, "resuming the unfinished review")
            return sitk.ReadImage(str(ai_path)), json.loads(report_path.read_text())
        from FocusNetCore.segment import Segmenter
        from FocusNetCore.study import write_json_atomic

        segmenter = Segmenter(self.options.model, device=self.options.device)
        result = segmenter.segment(self.image, progress=self._progress)
        write_image(result.labels, ai_path, overwrite=True)
        report = result.report()
        write_json_atomic(report_path, report)
        return result.labels, report

    @property
    def case_uid(self) -> str:
        return str(self.input.resolve())

    def _labels_from_seg(self, path: Path) -> sitk.Image:
        from FocusNetCore.organs import get_organ_set
        from FocusNetSegmentLib.scene import export_labels, load_segmentation, segment_names, volume_node_from_image

        scene = self.slicer_app.scene
        reference = volume_node_from_image(scene, self.image, "reference")
        node = load_segmentation(scene, str(path))
        organs = get_organ_set("oar22")
        unknown = [n for n in segment_names(node) if n not in organs.names]
        if unknown:
            scene.RemoveNode(node)
            scene.RemoveNode(reference)
            raise ValueError(f"{path}: segments {unknown} are not FocusNet organ names (TG-263)")
        labels = export_labels(scene, node, reference, organs)
        scene.RemoveNode(node)
        scene.RemoveNode(reference)
        return labels

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
            labels, report = await asyncio.to_thread(self._contours)
            self.case = ReviewCase.open(self.slicer_app.scene, volume, labels, folder=self.out / "sessions",
                                        log_path=self.out / "review-log.jsonl", case_uid=self.case_uid,
                                        reviewer=self.options.reviewer, report=report, name=f"{self.stem} OARs",
                                        client="browser")
            self.editor_logic.on_volume_changed(volume)
            self.case.session.listeners.append(self._on_session_changed)
            model = (report or {}).get("model", {})
            with self.state:
                self.state.fn_model = f"{model.get('name', 'contours from ' + str(self.options.seg))}" + (
                    f" — {model['intended_use']}" if model.get("intended_use") else "")
                self.state.fn_ready = True
                self.state.fn_progress = 100
                self.state.fn_progress_text = "ready"
                self._refresh_rows()
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
        """After each edit or accept: refresh the panel, autosave soon."""
        if self._loop is None:
            return
        if threading.current_thread() is threading.main_thread():
            self._refresh_rows()
            self.state.flush()
        if self._autosave_handle is not None:
            self._autosave_handle.cancel()
        self._autosave_handle = self._loop.call_later(AUTOSAVE_DELAY_S, self._autosave)

    def _autosave(self):
        if self.case is not None and not self.case.session.finished:
            self.case.autosave()

    def _refresh_rows(self):
        session = self.case.session
        rows = []
        for name in session.organs.names:
            st = session.states[name]
            r, g, b = CATALOGUE[name].color
            rows.append({"name": name, "color": f"#{r:02x}{g:02x}{b:02x}", "status": st.status, "edits": st.edits,
                         "flags": "; ".join(st.flags)})
        self.state.fn_rows = rows

    # -- panel actions ------------------------------------------------------------
    def select_organ(self, name: str):
        if self.case is None:
            return
        self.editor_logic.segmentation_editor.set_active_segment_id(name)
        self._jump_to(name)

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

    def accept(self, name: str):
        if self.case is not None and not self.case.session.finished:
            self.case.session.accept(name)

    def accept_all(self):
        if self.case is not None and not self.case.session.finished:
            accepted = self.case.session.accept_all_unflagged()
            self.state.fn_message = f"accepted {len(accepted)} unflagged organ(s)"

    def finish(self):
        if self.case is None or self.case.session.finished:
            return
        try:
            written: List[Path] = [self.case.export("seg.nrrd", self.out, self.stem)]
            if self.is_dicom:
                for kind in ("rtstruct", "dicomseg"):
                    written.append(self.case.export(kind, self.out, self.stem, ct_series_folder=self.input))
            record = self.case.finish()
        except Exception as error:
            self.state.fn_error = f"export failed: {error}"
            return
        if self._autosave_handle is not None:
            self._autosave_handle.cancel()
        self.state.fn_finished = True
        self.state.fn_clock = _clock_text(record["wall_s"])
        self.state.fn_active = _clock_text(record["active_s"])
        self.state.fn_message = ("Exported " + ", ".join(str(p) for p in written)
                                 + f"; timing record appended to {self.case.session.log_path}")
        self._refresh_rows()
        print(f"FocusNet review: {self.state.fn_message}", flush=True)

    # -- page ------------------------------------------------------------------------
    def _build_ui(self):
        from trame.widgets import html
        from trame.widgets import vuetify3 as v
        from trame_slicer.app.ui import LayoutButton, SegmentEditorToolbarUI, SegmentEditorUI, SegmentEditorUndoRedoUI
        from trame_slicer.app.ui.viewer_layout import ViewerLayout

        with ViewerLayout(self.server, is_drawer_visible=True) as layout:
            self.layout = layout
            layout.title.set_text("FocusNet review")
            with layout.appbar:
                html.Span("{{ fn_model }}", classes="text-caption mx-4", style="opacity: 0.7")
                v.VChip("Review {{ fn_clock }} · active {{ fn_active }}", classes="mx-2", id="fn-clock",
                        prepend_icon="mdi-timer-outline")
            with layout.drawer:
                with v.VCard(flat=True, classes="pa-2", id="fn-review-panel"):
                    v.VProgressLinear(v_if="!fn_ready && !fn_error", model_value=("fn_progress",), height=18,
                                      color="primary", children=["{{ fn_progress_text }}"], id="fn-progress")
                    v.VAlert(v_if="fn_error", type="error", density="compact", text=("fn_error",), id="fn-error")
                    html.Div("Organs at risk", classes="text-subtitle-2 mt-1")
                    with v.VTable(density="compact", v_if="fn_ready", id="fn-organs",
                                  style="max-height: 40vh; overflow-y: auto;"):
                        with html.Tbody():
                            with html.Tr(v_for="row in fn_rows", key="row.name", classes="fn-organ-row"):
                                with html.Td(style="cursor: pointer;", click=(self.select_organ, "[row.name]")):
                                    html.Span(style=("{background: row.color, display: 'inline-block', width: '10px', "
                                                     "height: '10px', 'margin-right': '6px'}",))
                                    html.Span("{{ row.name }}", classes="fn-organ-name")
                                with html.Td():
                                    v.VChip("{{ row.status }}", size="x-small", classes="fn-status",
                                            color=("row.status === 'accepted' ? 'green' : "
                                                   "(row.status === 'edited' ? 'orange' : 'grey')",))
                                    v.VIcon("mdi-flag", v_if="row.flags", size="small", color="red",
                                            title=("row.flags",))
                                with html.Td():
                                    v.VBtn("Accept", size="x-small", variant="tonal", classes="fn-accept",
                                           disabled=("fn_finished || row.status !== 'unreviewed'",),
                                           click=(self.accept, "[row.name]"))
                    with html.Div(classes="d-flex mt-2", style="gap: 6px;"):
                        v.VBtn("Accept all unflagged", size="small", id="fn-accept-all",
                               disabled=("!fn_ready || fn_finished",), click=self.accept_all)
                        v.VBtn("Finish & export", size="small", color="primary", id="fn-finish",
                               disabled=("!fn_ready || fn_finished",), click=self.finish)
                    html.Div("{{ fn_message }}", classes="text-caption mt-1", id="fn-message")
                v.VDivider()
                self.editor_ui = SegmentEditorUI()
            with layout.toolbar:
                self.layout_button = LayoutButton(classes="mt-1")
                SegmentEditorToolbarUI(editor_ui=self.editor_ui)
            with layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.editor_ui)
            with layout.content:
                self.layout_logic.layout_manager.initialize_layout_grid(layout)
        self.editor_logic.set_ui(self.editor_ui)
        self.layout_logic.set_ui(self.layout_button)

