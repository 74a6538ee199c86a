"""The review of one case: per-organ status and flags, and the timing that a
department's time-savings study needs (no Qt; tested against slicer-core).

A session starts when the AI contours are loaded (mode ``"ai"``) or when an
empty segmentation with the organ set's named segments is created for
contouring from scratch (mode ``"manual"``).

Timing (the same in both front ends; the record carries the definitions in
``timing_definitions``):

- **Wall time** (``wall_s``) runs while the case is shown to the reviewer:
  from first sight (:meth:`ReviewSession.shown`: in Slicer when the result
  appears, in the browser when a page is open on the case) until Finish,
  paused while no page is open (:meth:`ReviewSession.hidden`). Inference
  time is recorded apart (``inference_seconds``).
- **Activity** is any act of reviewing: first sight, slice scroll,
  window/level, view changes (3D rotation, zoom, layout), segment
  selection and visibility, edits, accepts and Finish
  (:meth:`ReviewSession.activity`; :class:`~FocusNetSegmentLib.activity.ActivityMonitor`
  turns MRML changes into activity).
- **Active time** (``active_s``): the gap between two consecutive acts counts
  as active when it is at most ``idle_threshold_s`` seconds; a longer gap is
  idle as a whole (the reviewer was away, not thinking).
- **Edits** count only real changes of an organ's binary label map: making
  closed surfaces (3D display, conversions) is no edit, and one paint
  stroke is one edit.

The session listens to the segmentation's ``RepresentationModified`` events
for edits. Each edit and accept checkpoints the session to a JSON file
(other activity at most every ``CHECKPOINT_EVERY_S``), so after a crash it
can be resumed or recorded as incomplete; "Finish" appends one record to the
study's JSON Lines log. After Finish the session is closed: a later change
of a contour is not part of this record, and the front end says so
(``on_change_after_finish``).

The clock is injected (``clock`` for intervals, ``wall`` for timestamps), so
tests drive a session with a fake clock.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from FocusNetCore import __version__
from FocusNetCore.organs import CATALOGUE, OrganSet
from FocusNetCore.study import ACTIVITY_RULES, TIMING_DEFINITIONS, append_record, read_records, write_json_atomic

from .scene import layer_counts

UNREVIEWED, ACCEPTED, EDITED = "unreviewed", "accepted", "edited"
# Flags (review panel)
ASYMMETRY_RATIO = 1.5  # left/right volumes differing more than this
CONFIDENCE_MIN = 0.5
DEFAULT_IDLE_THRESHOLD_S = 60.0
CHECKPOINT_EVERY_S = 5.0  # activity other than edits and accepts checkpoints at most this often


def organ_flags(organs: OrganSet, results: List[dict]) -> Dict[str, List[str]]:
    """Flags per organ from the segmentation report's organ entries."""
    by_name = {r["name"]: r for r in results}
    flags: Dict[str, List[str]] = {name: [] for name in organs.names}
    for name in organs.names:
        r = by_name.get(name)
        if r is not None and r.get("outside_scan"):
            continue  # judged outside the field of view (fieldofview.py): "not in scan", no flag
        if r is None or not r.get("present"):
            flags[name].append("missing")
            continue
        low, high = CATALOGUE[name].volume_cc
        volume = float(r.get("volume_cc") or 0.0)
        if not low <= volume <= high:
            flags[name].append(f"volume {volume:.2f} cc outside {low:g}-{high:g} cc")
        mirror = CATALOGUE[name].mirror_name
        other = by_name.get(mirror) if mirror else None
        if other is not None and other.get("present"):
            a, b = volume, float(other.get("volume_cc") or 0.0)
            if min(a, b) > 0 and max(a, b) / min(a, b) > ASYMMETRY_RATIO:
                flags[name].append(f"left/right volumes differ {max(a, b) / min(a, b):.1f}x")
        # Only against the threshold the model's bundle measured for its own
        # autoencoder (segment.OrganResult.shape_threshold); none, no flag.
        threshold = r.get("shape_threshold")
        if r.get("shape_score") is not None and threshold is not None and r["shape_score"] < float(threshold):
            flags[name].append(f"implausible shape (score {r['shape_score']:.2f} < {float(threshold):.2f})")
        if r.get("confidence") is not None and r["confidence"] < CONFIDENCE_MIN:
            flags[name].append(f"low confidence ({r['confidence']:.2f})")
    return flags


NOT_IN_SCAN = "not in scan"


def not_in_scan(results: List[dict]) -> List[str]:
    """The organs the segmentation judged outside the scan's field of view:
    not drawn, shown as "not in scan" rather than missing."""
    return [r["name"] for r in results or [] if r.get("outside_scan")]


@dataclass
class OrganState:
    status: str = UNREVIEWED
    edits: int = 0  # by hand (paint, erase, any Segment Editor effect)
    assisted_edits: int = 0  # click-to-find placements (SOS-Net at the reviewer's click)
    assisted_undone: int = 0  # placements the reviewer undid
    first_edit_s: Optional[float] = None  # seconds since the session started
    last_edit_s: Optional[float] = None
    flags: List[str] = field(default_factory=list)


class ReviewSession:
    def __init__(self, segmentation_node, organs: OrganSet, *, mode: str, case_id: str, reviewer: str,
                 log_path, checkpoint_path, model: Optional[dict] = None, inference_seconds: Optional[float] = None,
                 organ_results: Optional[List[dict]] = None, ai_labels: Optional[sitk.Image] = None,
                 idle_threshold_s: float = DEFAULT_IDLE_THRESHOLD_S, client: str = "slicer",
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        if mode not in ("ai", "manual"):
            raise ValueError(f"mode must be 'ai' or 'manual', got {mode!r}")
        self.node = segmentation_node
        self.organs = organs
        self.mode, self.case_id, self.reviewer = mode, case_id, reviewer
        self.client = client  # which front end: "slicer" (the module) or "browser" (focusnet review)
        self.log_path, self.checkpoint_path = Path(log_path), Path(checkpoint_path)
        self.model = model or {}
        self.inference_seconds = inference_seconds
        self.ai_labels = ai_labels
        self.idle_threshold_s = float(idle_threshold_s)
        self.clock, self.wall = clock, wall
        flags = organ_flags(organs, organ_results) if organ_results else {n: [] for n in organs.names}
        self.states: Dict[str, OrganState] = {n: OrganState(flags=flags[n]) for n in organs.names}
        self.started_wall: Optional[float] = None  # first sight (wall clock)
        self.shown_since: Optional[float] = None  # clock() when the case was last shown; None while hidden
        self.active_s = 0.0
        self.last_event: Optional[float] = None
        self.elapsed_before_s = 0.0  # shown time of earlier showings (and of earlier runs, when resumed)
        self.activity_counts: Dict[str, int] = {}
        self.activity_rules = ACTIVITY_RULES  # a resumed session keeps its checkpoint's (study.ACTIVITY_RULES)
        self._last_checkpoint: Optional[float] = None
        self.on_change_after_finish: Optional[Callable[[str], None]] = None  # called with the organ's name
        self._observer = None
        self._contours: Dict[str, tuple] = {}  # segment -> (label map MTime, voxel fingerprint) last seen
        self._counts: Dict[str, int] = {}  # segment -> voxel count last seen (changes made through another one)
        self._assisting = False  # a click-to-find placement is being written (see assisting())
        self.finished = False
        self.closing = False  # Finish has begun (it may run on a worker thread): no more edits recorded
        # Called with no argument after every change (an edit, an accept): how
        # a front end refreshes its review panel or schedules an autosave.
        self.listeners: List[Callable[[], None]] = []
        # Called before an edit is counted: writes the contours as they are now
        # (ReviewCase.autosave), so a counted edit is on disk.
        self.save_contours: Optional[Callable[[], object]] = None

    # -- events ----------------------------------------------------------------
    def start(self, shown: bool = True) -> "ReviewSession":
        """Observe the segmentation for edits; ``shown``: the reviewer sees the
        case from now on (the browser station says so when a page opens)."""
        import slicer
        import vtk

        @vtk.calldata_type(vtk.VTK_STRING)
        def on_modified(caller, event, segment_id):
            if self._contour_changed(segment_id):
                if self._assisting:
                    return  # recorded once, as an assisted edit, by record_assisted_edit
                if self.finished or self.closing:
                    name = self._organ_of(segment_id)
                    if self.on_change_after_finish is not None:
                        self.on_change_after_finish(name or segment_id)
                else:
                    self.record_edit(segment_id)
                    for other in self._others_changed(segment_id):
                        self.record_edit(other, save=False)  # the same stroke: saved with the first

        for index in range(self.node.GetSegmentation().GetNumberOfSegments()):
            self._contour_changed(self.node.GetSegmentation().GetNthSegmentID(index))  # the starting contours
        self._seed_counts()

        self._callback = on_modified  # keep a reference: VTK holds it weakly
        self._observer = self.node.GetSegmentation().AddObserver(slicer.vtkSegmentation.RepresentationModified,
                                                                 on_modified)
        if shown:
            self.shown()
        else:
            self.checkpoint()
        return self

    def record_changes(self) -> List[str]:
        """Record, as edits now, the organs whose contours changed without a
        representation-modified event: an undo or redo restores a whole
        saved segmentation (trame-slicer copies it in). Returns their names."""
        segmentation = self.node.GetSegmentation()
        changed = [sid for sid in [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
                   if self._contour_changed(sid)]
        if changed and not (self.finished or self.closing):
            for k, sid in enumerate(changed):
                self.record_edit(sid, save=k == 0)
        self._seed_counts()
        return [self._organ_of(sid) or sid for sid in changed]

    def _seed_counts(self) -> None:
        """Every segment's voxel count as it is now (see _others_changed)."""
        segmentation = self.node.GetSegmentation()
        per_map = {}
        for sid in [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]:
            segment = segmentation.GetSegment(sid)
            labelmap = segment.GetRepresentation("Binary labelmap")
            if id(labelmap) not in per_map:
                per_map[id(labelmap)] = layer_counts(labelmap)
            if per_map[id(labelmap)] is not None:
                self._counts[sid] = int(per_map[id(labelmap)][segment.GetLabelValue()])

    def stop(self) -> None:
        if self._observer is not None:
            self.node.GetSegmentation().RemoveObserver(self._observer)
            self._observer = None

    # -- the clocks -------------------------------------------------------------------
    @property
    def is_shown(self) -> bool:
        return self.shown_since is not None

    def shown(self) -> None:
        """The reviewer sees the case (first sight, or a page opened again):
        the wall clock runs, and seeing it is an act of reviewing."""
        if self.finished or self.shown_since is not None:
            return
        self.shown_since = self.clock()
        if self.started_wall is None:
            self.started_wall = self.wall()
        self.last_event = self.shown_since
        self.checkpoint()

    def hidden(self) -> None:
        """No page shows the case any more: the wall clock pauses. The time
        since the last act counts as for any act (closing the page is one)."""
        if self.shown_since is None:
            return
        self.touch()
        self.elapsed_before_s += self.clock() - self.shown_since
        self.shown_since = None
        self.last_event = None
        if not self.finished:
            self.checkpoint()

    def now_s(self) -> float:
        """Wall time so far: the seconds the case has been shown."""
        running = self.clock() - self.shown_since if self.shown_since is not None else 0.0
        return self.elapsed_before_s + running

    def touch(self) -> None:
        """An act of reviewing: the time since the previous one counts as
        active unless it exceeds the idle threshold. Acts while the case is
        not shown (a scripted change with no page open) count nothing."""
        if self.shown_since is None:
            return
        t = self.clock()
        if self.last_event is not None:
            gap = t - self.last_event
            if gap <= self.idle_threshold_s:
                self.active_s += gap
        self.last_event = t

    def activity(self, kind: str = "view") -> None:
        """An act of reviewing that changes no contour and no status: slice
        scroll, window/level, a view change, selection, visibility. Counted
        per kind in the record; checkpointed at most every CHECKPOINT_EVERY_S."""
        if self.finished or self.closing or self.shown_since is None:
            return
        self.touch()
        self.activity_counts[kind] = self.activity_counts.get(kind, 0) + 1
        if self._last_checkpoint is None or self.clock() - self._last_checkpoint >= CHECKPOINT_EVERY_S:
            self.checkpoint(notify=False)

    def _contour_changed(self, segment_id: str) -> bool:
        """Whether the segment's binary label map differs from when it was last
        seen. ``RepresentationModified`` also fires for what is no edit: making
        the closed surface ("Show 3D", SlicerRT's conversions) fires it for
        every segment, and one paint stroke fires it more than once. A segment
        whose (possibly shared) label map has not been modified since is
        unchanged; otherwise its voxels decide."""
        segment = self.node.GetSegmentation().GetSegment(segment_id)
        labelmap = segment.GetRepresentation("Binary labelmap") if segment is not None else None
        if labelmap is None:
            return segment is not None
        seen = self._contours.get(segment_id)
        if seen is not None and seen[0] == labelmap.GetMTime():
            return False
        current = (labelmap.GetMTime(), _voxel_fingerprint(labelmap, segment.GetLabelValue()))
        self._contours[segment_id] = current
        return seen is not None and seen[1] != current[1]

    def record_edit(self, segment_id: str, save: bool = True) -> None:
        name = self._organ_of(segment_id)
        self.touch()
        self.activity_counts["edit"] = self.activity_counts.get("edit", 0) + 1
        if name is None:
            self.checkpoint()
            return
        if save:
            self._save_contours()
        state = self.states[name]
        state.status = EDITED
        state.edits += 1
        state.first_edit_s = state.first_edit_s if state.first_edit_s is not None else round(self.now_s(), 3)
        state.last_edit_s = round(self.now_s(), 3)
        self.checkpoint()

    @contextlib.contextmanager
    def assisting(self, *segment_ids: str):
        """Contour changes inside this block are a click-to-find placement,
        not hand edits: the caller records it once (record_assisted_edit).
        ``segment_ids``: every segment the placement may change."""
        if self.finished or self.closing:
            raise RuntimeError("this review is finished: its contours are read-only")
        self._assisting = True
        try:
            yield
        finally:
            self._assisting = False
            for segment_id in segment_ids:
                self._contour_changed(segment_id)  # the placed contours are the ones seen from now on
            self._seed_counts()

    def record_assisted_edit(self, name: str, undo: bool = False) -> None:
        """A click-to-find placement (or its undo) changed ``name``'s contour:
        counted apart from hand edits, so a study can measure what clicking saves."""
        self._save_contours()
        self.touch()
        kind = "assisted_undo" if undo else "assisted_edit"
        self.activity_counts[kind] = self.activity_counts.get(kind, 0) + 1
        state = self.states[name]
        state.status = EDITED
        if undo:
            state.assisted_undone += 1
        else:
            state.assisted_edits += 1
        state.first_edit_s = state.first_edit_s if state.first_edit_s is not None else round(self.now_s(), 3)
        state.last_edit_s = round(self.now_s(), 3)
        self.checkpoint()

    def mark_changed(self, name: str) -> None:
        """``name``'s contour was changed by an act on another organ (a
        placement took its voxels): edited, with no edit of its own counted."""
        if name not in self.states:
            return
        state = self.states[name]
        state.status = EDITED
        state.first_edit_s = state.first_edit_s if state.first_edit_s is not None else round(self.now_s(), 3)
        state.last_edit_s = round(self.now_s(), 3)
        self.checkpoint()

    def _others_changed(self, segment_id: str) -> List[str]:
        """The other segments sharing ``segment_id``'s label map (its layer)
        whose voxels changed with it: a stroke with the editor's overwrite
        mode takes voxels from the organs it crosses, and Slicer reports the
        painted segment only. One count over the layer (a count only falls
        when voxels are taken)."""
        segmentation = self.node.GetSegmentation()
        segment = segmentation.GetSegment(segment_id)
        labelmap = segment.GetRepresentation("Binary labelmap") if segment is not None else None
        bins = layer_counts(labelmap)
        if bins is None:
            return []
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        others = [sid for sid in ids if sid != segment_id
                  and segmentation.GetSegment(sid).GetRepresentation("Binary labelmap") is labelmap]
        self._counts[segment_id] = int(bins[segment.GetLabelValue()])
        changed = []
        for sid in others:
            count = int(bins[segmentation.GetSegment(sid).GetLabelValue()])
            seen = self._counts.get(sid)
            self._counts[sid] = count
            if seen is not None and seen != count:
                changed.append(sid)
                self._contour_changed(sid)  # seen as it is now: its own event later is no second edit
        return changed

    def _save_contours(self) -> None:
        if self.save_contours is not None:
            self.save_contours()

    def _organ_of(self, segment_id: str) -> Optional[str]:
        segment = self.node.GetSegmentation().GetSegment(segment_id)
        name = segment.GetName() if segment is not None else segment_id
        return name if name in self.states else None

    # -- review panel ---------------------------------------------------------------
    def accept(self, name: str) -> None:
        self.touch()
        if self.states[name].status != EDITED:
            self.states[name].status = ACCEPTED
        self.checkpoint()

    def accept_all_unflagged(self) -> List[str]:
        self.touch()
        accepted = [n for n, s in self.states.items() if s.status == UNREVIEWED and not s.flags]
        for name in accepted:
            self.states[name].status = ACCEPTED
        self.checkpoint()
        return accepted

    def algorithm_types(self) -> Dict[str, str]:
        """DICOM's segment algorithm type of each organ as it stands: AUTOMATIC
        (the model's contour), SEMIAUTOMATIC once a reviewer edited it,
        MANUAL in a manual-baseline session."""
        if self.mode == "manual":
            return {name: "MANUAL" for name in self.states}
        return {name: "SEMIAUTOMATIC" if s.status == EDITED else "AUTOMATIC" for name, s in self.states.items()}

    # -- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"case_id": self.case_id, "reviewer": self.reviewer, "mode": self.mode, "client": self.client,
                "model": self.model,
                "inference_seconds": self.inference_seconds,
                "started": _iso(self.started_wall) if self.started_wall is not None else None,
                "elapsed_s": round(self.now_s(), 3), "active_s": round(self.active_s, 3),
                "idle_threshold_s": self.idle_threshold_s, "activity": dict(sorted(self.activity_counts.items())),
                "activity_rules": self.activity_rules,
                "timing_definitions": TIMING_DEFINITIONS,
                "organs": {n: asdict(s) for n, s in self.states.items()}, "software_version": __version__}

    def checkpoint(self, notify: bool = True) -> None:
        if not self.finished:
            write_json_atomic(self.checkpoint_path, self.state_dict())
            self._last_checkpoint = self.clock()
        if notify:
            for listener in list(self.listeners):
                listener()

    @classmethod
    def resume(cls, checkpoint_path, segmentation_node, organs: OrganSet, log_path, **kwargs) -> "ReviewSession":
        """Continue a session a crash interrupted, with its times and statuses."""
        import json

        data = json.loads(Path(checkpoint_path).read_text())
        model = kwargs.pop("model", None) or data.get("model")
        inference_seconds = kwargs.pop("inference_seconds", None) or data.get("inference_seconds")
        kwargs.setdefault("client", data.get("client", "slicer"))
        session = cls(segmentation_node, organs, mode=data["mode"], case_id=data["case_id"], reviewer=data["reviewer"],
                      log_path=log_path, checkpoint_path=checkpoint_path, model=model,
                      inference_seconds=inference_seconds, idle_threshold_s=data["idle_threshold_s"], **kwargs)
        session.elapsed_before_s = float(data["elapsed_s"])
        session.active_s = float(data["active_s"])
        session.activity_counts = dict(data.get("activity") or {})
        session.activity_rules = int(data.get("activity_rules", 1))  # its active_s so far was counted by these
        if data.get("started"):
            session.started_wall = datetime.datetime.fromisoformat(data["started"]).timestamp()
        for name, state in data["organs"].items():
            if name in session.states:
                session.states[name] = OrganState(**state)
        return session

    @staticmethod
    def mark_incomplete(checkpoint_path, log_path, wall: Callable[[], float] = time.time) -> dict:
        """Record an interrupted session that will not be resumed as incomplete."""
        import json

        data = json.loads(Path(checkpoint_path).read_text())
        record = {**data, "status": "incomplete", "finished": _iso(wall())}
        append_record(log_path, record)
        os.remove(checkpoint_path)
        return record

    # -- finish -------------------------------------------------------------------------
    def finish(self, final_labels: Optional[sitk.Image] = None) -> dict:
        """End the session: one record (times, statuses, edit metrics) appended
        to the log. The segmentation stays observed: a contour changed after
        this is reported through ``on_change_after_finish``, never silently
        dropped (call :meth:`stop` to end that too)."""
        self.closing = True
        if self.started_wall is None:  # finished without ever being shown (a script): wall time 0
            self.started_wall = self.wall()
        self.touch()
        record = {**self.state_dict(), "status": "finished", "finished": _iso(self.wall()),
                  "wall_s": round(self.now_s(), 3)}
        if final_labels is not None:
            from FocusNetCore.editmetrics import edit_metrics  # scipy: installed on first use in Slicer

            spacing = tuple(reversed(final_labels.GetSpacing()))
            final = sitk.GetArrayViewFromImage(final_labels)
            ai = (sitk.GetArrayViewFromImage(self.ai_labels) if self.ai_labels is not None
                  else np.zeros(final.shape, np.uint8))
            record["metrics"] = {name: edit_metrics(ai == self.organs.label_of(name),
                                                    final == self.organs.label_of(name), spacing)
                                 for name in self.organs.names}
            record["metrics"] = _finite(record["metrics"])
        append_record(self.log_path, record)
        self.finished = True
        if self.checkpoint_path.exists():
            os.remove(self.checkpoint_path)
        return record


def _voxel_fingerprint(labelmap, value: int) -> str:
    """The voxels holding ``value`` in a (shared) binary label map, as a digest
    of their (i, j, k) indices: independent of the map's extent, which grows
    when another segment is painted outside it."""
    import hashlib

    from vtk.util import numpy_support

    scalars = labelmap.GetPointData().GetScalars() if labelmap.GetPointData() else None
    if scalars is None:
        return ""
    extent = labelmap.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if min(shape) <= 0:
        return ""
    array = numpy_support.vtk_to_numpy(scalars).reshape(shape)
    k, j, i = np.nonzero(array == value)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4]]).astype(np.int64)
    return hashlib.sha1(ijk.tobytes()).hexdigest()


def pending_sessions(folder) -> List[Path]:
    """Checkpoints of sessions that never finished (offer: resume or mark incomplete)."""
    return sorted(Path(folder).glob("*.review.json"))


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat()


def _finite(metrics: dict) -> dict:
    """JSON has no NaN: undefined distances (an empty contour) are stored as null."""
    return {organ: {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}
            for organ, values in metrics.items()}


__all__ = ["ReviewSession", "organ_flags", "pending_sessions", "read_records", "UNREVIEWED", "ACCEPTED", "EDITED"]
