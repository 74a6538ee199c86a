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
    """A background command polled for its output. With ``log_path`` its
    output goes to that file (read from there by :meth:`poll`) instead of
    pipes, so it survives the end of the process that started it (the pip
    install when Slicer quits)."""

    def __init__(self, command: Sequence[str], env: Optional[dict] = None, log_path=None):
        self.command = list(command)
        self.env = env
        self.log_path = log_path
        self._log_offset = 0
        self._log_rest = ""
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
        if self.log_path is not None:
            with open(self.log_path, "ab") as log:  # the child keeps its own handle
                self._log_offset = log.tell()
                self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env, **kwargs)
            return self
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        bufsize=1, env=self.env, **kwargs)
        for stream, name in ((self.process.stdout, "out"), (self.process.stderr, "err")):
            threading.Thread(target=self._pump, args=(stream, name), daemon=True).start()
        return self

    def _read_log(self, final: bool) -> None:
        """New whole lines of the log file, as output and as error text."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except OSError:
            return
        self._log_offset += len(data)
        text = self._log_rest + data.decode("utf-8", "replace")
        lines = text.split("\n")
        self._log_rest = "" if final else lines.pop()
        for line in lines:
            if line or not final:
                self._lines.put(("out", line.rstrip("\r")))
                self.stderr_lines.append(line.rstrip("\r"))

    def _pump(self, stream, name):
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\n")))
        stream.close()

    def poll(self) -> List[ProgressEvent]:
        """New progress events since the last poll (never blocks)."""
        if self.log_path is not None and self.process is not None:
            self._read_log(final=self.process.poll() is not None)
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
        end_process_tree(self.process, timeout)

    def wait(self, timeout: Optional[float] = None) -> int:
        code = self.process.wait(timeout)
        return code


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = "/proc"
    if not os.path.isdir(proc):
        return True
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "stat")) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def end_process_tree(process: subprocess.Popen, grace: float = 5.0) -> None:
    """End ``process`` (started in its own session / process group) and
    everything under it: SIGTERM to the group, SIGKILL to whatever is left
    after ``grace`` seconds. The group, not the PID: inside Slicer the
    command is PythonSlicer, a launcher whose child is the real Python, and
    the launcher ends long before that child would (Windows: taskkill /T)."""
    if os.name == "nt":
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)
        process.wait()
        return
    import time

    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process.poll() is not None and not _group_alive(process.pid):
            break
        time.sleep(0.05)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()


def default_python() -> str:
    return sys.executable
