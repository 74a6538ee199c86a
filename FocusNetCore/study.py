"""Time-savings study records: one JSON object per reviewed case, appended to
a JSON Lines log.

Appends are whole lines written with one ``write`` under an exclusive lock
(``fcntl.flock`` / ``msvcrt.locking``) and fsynced, so two Slicer instances
writing to the same log never interleave, and a crash can at worst leave a
damaged last line: readers report it and skip it, and every earlier record
survives. Nothing here rewrites or truncates a log.

Case ids are hashes (of the StudyInstanceUID or the file name), never
patient names.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Tuple

RECORD_VERSION = 1
# The rules the activity monitor counts acts of reviewing by (records'
# ``activity_rules``). 2 (2026-12-02): the 3D view counts only when its
# camera's pose changes. Under 1 (records without the field) every render of
# the 3D view, whose clipping-range reset modifies the camera, counted as an
# act, so a pause with renders in it was not idle and active_s can be too
# high; ``study report`` leaves such records out of the active time.
ACTIVITY_RULES = 2
MODES = ("ai", "manual")
# What a record's times and counts mean, in both front ends; every record
# carries them (``timing_definitions``) and ``study report`` prints them.
TIMING_DEFINITIONS = {
    "wall_s": "seconds the case was shown to the reviewer, from first sight to Finish, paused while no page "
              "was open on it (browser review); inference time is not included (inference_seconds)",
    "active_s": "sum of the gaps between consecutive acts of reviewing (first sight, slice scroll, window/level, "
                "view changes, selection of an organ or an editing tool, visibility, edits, accepts, Finish) that "
                "are at most idle_threshold_s; a longer gap is idle as a whole",
    "edits": "changes of an organ's binary label map by hand (not display or representation changes); "
             "click-to-find placements are counted apart",
    "assisted_edits": "click-to-find placements: the organ's contour inside SOS-Net's ROI replaced by the model's "
                      "answer at the reviewer's click (assisted_undone: placements undone)",
}


def case_id(study_instance_uid_or_name: str) -> str:
    return hashlib.sha256(study_instance_uid_or_name.encode()).hexdigest()[:16]


class _Locked:
    """An exclusive lock on an open file, released on exit."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        if os.name == "nt":
            import msvcrt

            self.handle.seek(0)
            msvcrt.locking(self.handle.fileno(), msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self.handle

    def __exit__(self, *exc):
        if os.name == "nt":
            import msvcrt

            self.handle.seek(0)
            msvcrt.locking(self.handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        return False


def append_record(log_path, record: dict) -> None:
    """Append one record as one line, atomically with respect to other writers."""
    line = json.dumps({"record_version": RECORD_VERSION, **record}, sort_keys=True, allow_nan=False) + "\n"
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle, _Locked(handle):
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            # A writer that crashed mid-line left no newline: start a fresh line
            # so this record stays readable.
            with open(path, "rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    handle.write(b"\n")
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def read_records(*log_paths) -> Tuple[List[dict], List[str]]:
    """All records of the logs, and a message per damaged line (skipped)."""
    records, problems = [], []
    for log_path in log_paths:
        path = Path(log_path)
        if not path.is_file():
            problems.append(f"{path}: no such log")
            continue
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                text = raw.decode("utf-8", errors="replace").strip()
                if not text:
                    continue
                try:
                    record = json.loads(text)
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                except ValueError as error:
                    problems.append(f"{path}:{number}: damaged record skipped ({error})")
                    continue
                records.append(record)
    return records, problems


def write_json_atomic(path, data: dict) -> None:
    """Replace ``path`` with ``data`` in one rename (fsynced): a checkpoint is
    either the old one or the new one, never half of each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
