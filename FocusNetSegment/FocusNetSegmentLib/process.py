"""Running ``focusnet segment`` in a background process and reading its
progress (no Qt: the widget polls :meth:`SegmentationProcess.poll` from a
QTimer).

The child prints one JSON object per line (``--progress json``); anything
else it prints is kept for the error message. Cancel ends the whole process
tree (the child runs in its own process group / session).
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence

STAGE_LABELS = {"read": "Reading CT", "preprocess": "Preprocessing", "inference": "Segmenting",
                "postprocess": "Resampling", "write": "Writing", "done": "Done", "error": "Failed"}


@dataclass
class ProgressEvent:
    stage: str
    fraction: float
    message: str
    case: str = ""

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage)


def parse_progress_line(line: str) -> Optional[ProgressEvent]:
    """A progress event from one output line, or None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "stage" not in data:
        return None
    try:
        fraction = min(max(float(data.get("fraction", 0.0)), 0.0), 1.0)
    except (TypeError, ValueError):
        return None
    return ProgressEvent(str(data["stage"]), fraction, str(data.get("message", "")), str(data.get("case", "")))


def segment_command(python: str, inputs: Sequence[str], out_dir: str, model: Optional[str] = None,
                    device: str = "auto", output_format: str = "seg.nrrd", overwrite: bool = False) -> List[str]:
    """The command line: ``<python> -m FocusNetCore segment ... --progress json``
    (inside Slicer ``python`` is PythonSlicer)."""
    command = [python, "-m", "FocusNetCore", "segment", *map(str, inputs), "--out", str(out_dir),
               "--device", device, "--format", output_format, "--progress", "json"]
    if model:
        command += ["--model", str(model)]
    if overwrite:
        command.append("--overwrite")
    return command


class SegmentationProcess:
    def __init__(self, command: Sequence[str], env: Optional[dict] = None):
        self.command = list(command)
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[tuple]" = queue.Queue()
        self.stderr_lines: List[str] = []
        self.other_output: List[str] = []
        self.events: List[ProgressEvent] = []
        self.cancelled = False
        self.kind = "segment"  # or "install": what the panel says while it runs

    def start(self) -> "SegmentationProcess":
        kwargs = {}
        if os.name == "nt":
            # Its own group (for the tree kill), and no console window popping up.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        bufsize=1, env=self.env, **kwargs)
        for stream, name in ((self.process.stdout, "out"), (self.process.stderr, "err")):
            threading.Thread(target=self._pump, args=(stream, name), daemon=True).start()
        return self

    def _pump(self, stream, name):
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\n")))
        stream.close()

    def poll(self) -> List[ProgressEvent]:
        """New progress events since the last poll (never blocks)."""
        new = []
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if name == "err":
                self.stderr_lines.append(line)
                continue
            event = parse_progress_line(line)
            if event is None:
                self.other_output.append(line)
            else:
                new.append(event)
        self.events.extend(new)
        return new

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def error_text(self) -> str:
        """What the CLI said about a failure, for the error dialog."""
        errors = [e.message for e in self.events if e.stage == "error"]
        return "\n".join(errors + [line for line in self.stderr_lines if line.strip()][-20:])

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the child and everything it started."""
        if not self.running:
            return
        self.cancelled = True
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def wait(self, timeout: Optional[float] = None) -> int:
        code = self.process.wait(timeout)
        return code


def default_python() -> str:
    return sys.executable
