"""Click to find, the front ends' side (no Qt, no torch): the long-lived
``focusnet worker`` process and what a click does to the case.

Both front ends drive :class:`ClickToFind`: the Slicer module from a QTimer
(``poll`` never blocks), the browser station from its server. The worker
opens the case's CT once (the whole segmentation, its S-Net features kept);
each click is one ``refine`` request whose mask, on the CT's grid over the
ROI, replaces the organ's contour inside the ROI only
(:meth:`FocusNetSegmentLib.case.ReviewCase.place`), recorded as an assisted
edit and undoable.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import SimpleITK as sitk

from .process import end_process_tree


def ras_to_lps(point: Sequence[float]) -> List[float]:
    """Slicer's RAS world point -> LPS (DICOM's patient coordinates, what the worker takes)."""
    return [-float(point[0]), -float(point[1]), float(point[2])]


def worker_command(python: str, model: Optional[str] = None, device: str = "auto") -> List[str]:
    command = [python, "-m", "FocusNetCore", "worker", "--device", device]
    if model:
        command += ["--model", str(model)]
    return command


class WorkerProcess:
    """``focusnet worker`` in the background: requests go in as JSON lines,
    answers are collected by a reader thread and handed out by :meth:`poll`."""

    def __init__(self, command: Sequence[str], env: Optional[dict] = None):
        self.command, self.env = list(command), env
        self.process: Optional[subprocess.Popen] = None
        self._answers: "queue.Queue[dict]" = queue.Queue()
        self._ids = itertools.count(1)
        self.stderr_lines: List[str] = []

    def start(self) -> "WorkerProcess":
        kwargs = {"start_new_session": True} if os.name != "nt" else \
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, bufsize=1, env=self.env, **kwargs)
        threading.Thread(target=self._read_answers, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        return self

    def _read_answers(self):
        for line in iter(self.process.stdout.readline, ""):
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            if isinstance(answer, dict):
                self._answers.put(answer)
        self.process.stdout.close()

    def _read_stderr(self):
        for line in iter(self.process.stderr.readline, ""):
            self.stderr_lines.append(line.rstrip("\n"))
        self.process.stderr.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, op: str, **fields) -> int:
        """Send one request; returns its id (its answer carries it)."""
        if not self.running:
            raise RuntimeError("the FocusNet worker is not running" +
                               (f": {self.stderr_lines[-1]}" if self.stderr_lines else ""))
        request_id = next(self._ids)
        self.process.stdin.write(json.dumps({"id": request_id, "op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return request_id

    def poll(self) -> List[dict]:
        """Answers that arrived since the last poll (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._answers.get_nowait())
            except queue.Empty:
                return out

    def wait_for(self, request_id: int, timeout: float) -> dict:
        """Block until the answer to ``request_id`` (other answers are dropped:
        for callers that send one request at a time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = self._answers.get(timeout=0.05)
            except queue.Empty:
                if not self.running:
                    raise RuntimeError("the FocusNet worker ended: " + "\n".join(self.stderr_lines[-5:]))
                continue
            if answer.get("id") == request_id:
                return answer
        raise TimeoutError(f"the FocusNet worker did not answer within {timeout:.0f} s")

    def stop(self, timeout: float = 3.0) -> None:
        """End the worker and everything it started. Inside Slicer the command
        is PythonSlicer, a launcher whose child is the real Python: killing
        the launcher's PID alone would leave that child computing, so the
        whole process group (its own session) is ended. An idle worker quits
        when asked (``timeout`` seconds); the caller passes 0 for a busy one,
        which reads no request before its work is done (the GUI must not
        freeze waiting)."""
        if self.process is None:
            return
        if self.running:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        end_process_tree(self.process, grace=2.0)


class ClickToFind:
    """One case's click-to-find: start the worker and open the CT once, then
    one refine request per click. States: "idle" (not started), "opening"
    (the worker segments the CT once), "ready", "busy" (a click is being
    answered), "failed" (``error`` says why)."""

    def __init__(self, command: Sequence[str], env: Optional[dict] = None):
        self.worker = WorkerProcess(command, env)
        self.folder = Path(tempfile.mkdtemp(prefix="FocusNet-click-"))
        self.state = "idle"
        self.error = ""
        self._pending: Dict[int, dict] = {}  # request id -> what it was for
        self.opened_s: Optional[float] = None

    def open(self, image: sitk.Image) -> None:
        """Start the worker on the case's CT (written to a private folder as it
        is in the scene: voxels and geometry)."""
        ct = self.folder / "ct.nrrd"
        sitk.WriteImage(image, str(ct))
        if not self.worker.running:
            self.worker.start()
        self._pending[self.worker.send("open", ct=str(ct))] = {"op": "open", "sent": time.monotonic()}
        self.state = "opening"

    def click(self, organ: str, point_lps: Sequence[float]) -> int:
        """Ask for ``organ`` at ``point_lps``; the answer comes from :meth:`poll`."""
        if self.state not in ("ready",):
            raise RuntimeError({"idle": "click-to-find is not started", "opening": "click-to-find is still getting "
                                "ready (the worker segments the CT once)", "busy": "the previous click is being "
                                "answered", "failed": f"click-to-find failed: {self.error}"}.get(self.state, self.state))
        out = self.folder / f"click-{len(list(self.folder.glob('click-*')))}.nrrd"
        request_id = self.worker.send("refine", organ=organ, point=[float(v) for v in point_lps], out=str(out))
        self._pending[request_id] = {"op": "refine", "organ": organ, "sent": time.monotonic()}
        self.state = "busy"
        return request_id

    def poll(self) -> List[dict]:
        """Finished requests: for a refine that succeeded, ``{"op": "refine",
        "organ", "mask" (a SimpleITK image on the CT's grid), "region",
        "seconds", ...}``; a failure has ``error``."""
        done = []
        for answer in self.worker.poll():
            asked = self._pending.pop(answer.get("id"), None)
            if asked is None:
                continue
            result = {**asked, **answer, "round_trip_s": round(time.monotonic() - asked["sent"], 3)}
            if asked["op"] == "open":
                self.state = "ready" if answer.get("ok") else "failed"
                self.error = "" if answer.get("ok") else str(answer.get("error"))
                self.opened_s = result["round_trip_s"]
            elif asked["op"] == "refine":
                self.state = "ready"
                if answer.get("ok"):
                    result["mask"] = sitk.ReadImage(answer["mask"])
            done.append(result)
        if not self.worker.running and self.state in ("opening", "busy"):
            self.state = "failed"
            self.error = "\n".join(self.worker.stderr_lines[-5:]) or "the worker ended"
            done.append({"op": "error", "ok": False, "error": self.error})
        return done

    def wait(self, timeout: float, interval: float = 0.05) -> List[dict]:
        """Poll until nothing is pending (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        done = []
        while time.monotonic() < deadline:
            done += self.poll()
            if self.state not in ("opening", "busy"):
                return done
            time.sleep(interval)
        raise TimeoutError(f"click-to-find did not answer within {timeout:.0f} s (state {self.state})")

    def close(self) -> None:
        self.worker.stop(timeout=0.0 if self.state in ("opening", "busy") else 3.0)
        self.state = "idle"
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
