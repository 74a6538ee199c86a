"""``focusnet node``: FocusNet as a DICOM node.

The scanner or PACS sends the planning CT here (C-STORE); each complete
series is segmented once and its RTSTRUCT (and DICOM SEG) are sent by
C-STORE to the planning system. Networking is pynetdicom's.

The spool folder is the node's whole state, so a crash or restart loses
nothing and segments each series once:

- ``incoming/<study>/<series>/``: CT instances as they arrive, each written
  atomically (a temporary file, fsynced, renamed) before the C-STORE
  response is sent;
- ``series/<job>/``: a complete series (no new instance for ``--settle``
  seconds), moved here when its job is queued;
- ``jobs/queue/``, ``jobs/active/``, ``jobs/done/``, ``jobs/failed/``: one
  JSON file per job, moved between the folders by ``os.replace`` (atomic);
  a job found in ``active/`` at start (the node was killed while working on
  it) goes back to the queue;
- ``results/<job>/``: the RTSTRUCT and SEG; the job records which of them
  were delivered, so a retry sends only what is missing;
- ``other/<modality>/``: instances that are not CT (MR, RTSTRUCT, SR, ...):
  stored, logged, never segmented.

One log line per event goes to standard error (``received``, ``complete``,
``segmented in N s``, ``sent``, ``failed``).
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .study import write_json_atomic

LOG = logging.getLogger("focusnet.node")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FORMATS = ("rtstruct", "dicomseg")
# C-STORE statuses (PS3.4 B.2.3 and pynetdicom's own use of them)
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC210
DOES_NOT_MATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
# The attributes without which a CT slice cannot be placed in a volume
CT_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient",
               "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated", "PixelData")
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
# Lossless compressed transfer syntaxes CT senders use, accepted for CT Image
# Storage: the series is read by SimpleITK's GDCM, which decodes each of them
# (the same reader Slicer uses). Lossy ones (JPEG baseline, JPEG-LS
# near-lossless, JPEG 2000 lossy) are refused: a planning CT is not contoured
# on a lossy copy.
LOSSLESS_COMPRESSED = {
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, first-order prediction (process 14, SV1)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (process 14)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
# A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters, no empty component.
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
# An AE title (PS3.5 6.2, AE): 1-16 characters of the default repertoire, no backslash, not only spaces.
AE_PATTERN = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
# A series this short is no volume FocusNet can segment (a scout, a topogram).
MIN_VOLUME_SLICES = 3
DEFAULT_KEEP_DAYS = 7.0
DISK_RETRY_S = 10.0  # after a write failed (a full disk), the loop waits this long before it tries again


def is_uid(value: str) -> bool:
    return len(value) <= 64 and UID_PATTERN.fullmatch(value) is not None


def check_ae_title(value: str, what: str) -> None:
    if not AE_PATTERN.fullmatch(value) or not value.strip():
        raise NodeError(f"{what} \"{value}\": an AE title is 1-16 printable ASCII characters, no backslash, "
                        "not only spaces")


class NodeError(ValueError):
    """A setting the node cannot run with (reported in words, exit 2)."""


@dataclass
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AE_TITLE@HOST:PORT``."""
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            port_number = int(port)
        except ValueError:
            raise NodeError(f"--destination {text!r}: expected AE_TITLE@HOST:PORT, e.g. PLANNING@10.0.0.5:104") from None
        if not ae_title or len(ae_title) > 16 or not host or not 0 < port_number < 65536:
            raise NodeError(f"--destination {text!r}: the AE title is 1-16 characters, the port 1-65535")
        check_ae_title(ae_title, "--destination's AE title")
        return cls(ae_title, host, port_number)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class NodeOptions:
    spool: Path
    destination: Destination
    port: int = 11112
    ae_title: str = "FOCUSNET"
    host: str = "127.0.0.1"
    allow: Sequence[str] = ()
    settle_s: float = 10.0
    model: Optional[str] = None
    device: str = "auto"
    formats: Sequence[str] = FORMATS
    tls: Optional[Tuple[str, str, str]] = None
    retry_window_s: float = 600.0
    first_retry_s: float = 2.0
    max_retry_wait_s: float = 60.0
    keep_days: float = DEFAULT_KEEP_DAYS

    def check(self) -> None:
        if not 0 <= int(self.port) <= 65535:
            raise NodeError(f"--port {self.port}: a TCP port is 0-65535 (0: any free one)")
        try:
            socket.getaddrinfo(self.host, None)
        except (socket.gaierror, UnicodeError):
            raise NodeError(f"--host {self.host!r}: not an address or a name this machine resolves") from None
        if self.keep_days < 0:
            raise NodeError(f"--keep-days {self.keep_days:g}: days, not negative")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise NodeError(f"--format {','.join(self.formats)}: choose from {','.join(FORMATS)}")
        if not is_loopback(self.host) and not self.allow:
            raise NodeError(f"--host {self.host} is reachable from other machines: give the calling AE titles "
                            "that may send with --allow (others are rejected at association)")
        check_ae_title(self.ae_title, "--ae-title")
        if self.settle_s < 0 or self.retry_window_s < 0:
            raise NodeError("--settle and --retry-window are seconds, not negative")
        if self.tls:
            for path in self.tls:
                if not Path(path).is_file():
                    raise NodeError(f"--tls: {path} is not a file (CERT KEY CA)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _safe(uid: str) -> str:
    """A UID as a folder name: only a valid DICOM UID (checked on receipt:
    Receiver.on_store) is used as it is; anything else (".." included) is
    replaced by a hash, so no value from the network leaves the spool."""
    import hashlib

    uid = str(uid)
    return uid if is_uid(uid) else "x" + hashlib.sha1(uid.encode()).hexdigest()[:24]


def _safe_name(text: str) -> str:
    """A modality as a folder name: letters and digits only."""
    return re.sub(r"[^A-Za-z0-9]", "_", str(text))[:16].strip("_") or "unknown"


# --------------------------------------------------------------------------
# The spool
# --------------------------------------------------------------------------

class Spool:
    STATES = ("queue", "active", "done", "failed")

    SUBFOLDERS = ("incoming", "series", "results", "other", "tmp", *(f"jobs/{s}" for s in STATES))

    def __init__(self, root, create: bool = True):
        """``create``: make the tree (the node itself); else the spool must
        exist (``node status`` / ``retry`` on a mistyped path create nothing).
        Patient data: folders 0700, files 0600 (the node runs with umask 077)."""
        self.root = Path(root).absolute()  # retention compares resolved paths with it
        self.lock = threading.Lock()  # receiving vs queueing a series
        self._lock_handle = None
        if self.root.exists() and not self.root.is_dir():
            raise NodeError(f"--spool {self.root}: is a file, not a folder")
        if not create:
            if not (self.root / "jobs").is_dir():
                raise NodeError(f"--spool {self.root}: no node spool there (no jobs/ folder); check the path")
            return
        try:
            for sub in self.SUBFOLDERS:
                (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
            # a spool made by an earlier version, or under another umask: everything made private
            os.chmod(self.root, 0o700)
            for top, folders, files in os.walk(self.root):
                for name in folders:
                    os.chmod(os.path.join(top, name), 0o700)
                for name in files:
                    os.chmod(os.path.join(top, name), 0o600)
            probe = self.root / "tmp" / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise NodeError(f"--spool {self.root}: cannot write there ({error.strerror or error})") from None

    def acquire(self) -> None:
        """One node per spool: an exclusive lock on ``node.lock`` for as long
        as this process lives (the kernel drops it when the process dies, so
        a killed node never leaves a stale lock)."""
        import fcntl

        handle = open(self.root / "node.lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            other = handle.read().strip() or "unknown"
            handle.close()
            raise NodeError(f"--spool {self.root}: another node (pid {other}) is using this spool; stop it first, "
                            "or give this node a spool of its own") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def purge_finished(self, keep_days: float, now: Optional[float] = None) -> List[str]:
        """Retention: the images and results of jobs done more than
        ``keep_days`` ago are deleted (the job's JSON stays, marked
        ``purged``); returns the job ids purged."""
        now = time.time() if now is None else now
        purged = []
        for path in self.jobs("done"):
            job = json.loads(path.read_text())
            if job.get("purged") or not job.get("done"):
                continue
            done = datetime.datetime.fromisoformat(job["done"]).timestamp()
            if now - done < keep_days * 86400:
                continue
            for folder in (self.root / job.get("folder", f"series/{job['id']}"), self.root / "results" / job["id"]):
                if folder.exists() and self.root.resolve() in folder.resolve().parents:
                    shutil.rmtree(folder)
            job["purged"] = _now()
            self.save(job, "done")
            purged.append(job["id"])
        return purged

    def jobs(self, state: str) -> List[Path]:
        return sorted((self.root / "jobs" / state).glob("*.json"))

    def _write_atomic(self, data: bytes, path: Path) -> None:
        """On disk (fsynced) before it returns, or an OSError and nothing
        left behind (a full disk): only then is a C-STORE answered Success."""
        tmp = self.root / "tmp" / f"{path.name}.{threading.get_ident()}.part"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise

    def store_ct(self, data: bytes, study: str, series: str, sop: str) -> Path:
        with self.lock:
            folder = self.root / "incoming" / _safe(study) / _safe(series)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{_safe(sop)}.dcm"
            self._write_atomic(data, path)
            return path

    def store_other(self, data: bytes, modality: str, sop: str) -> Path:
        folder = self.root / "other" / _safe_name(modality or "unknown")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_safe(sop)}.dcm"
        self._write_atomic(data, path)
        return path

    def receiving(self) -> List[Path]:
        return sorted(p for p in (self.root / "incoming").glob("*/*") if p.is_dir())

    def find_job(self, series: str) -> Optional[Tuple[str, dict]]:
        """(state, job) of the job made for ``series``, if any: one job per
        series, however its instances arrive."""
        for state in self.STATES:
            for path in self.jobs(state):
                job = json.loads(path.read_text())
                if job.get("series") == series:
                    return state, job
        return None

    def queue_settled(self, settle_s: float, now: Optional[float] = None, held: Sequence[str] = ()
                      ) -> List[Tuple[str, dict]]:
        """Series with no new instance for ``settle_s`` seconds become jobs,
        or join the job already made for them: a series is one job however
        its instances arrive (a pause longer than ``settle_s``, a restart, a
        re-send). Returns (what happened, job): "queued" (a new job),
        "merged" (into a queued job), "again" (new instances for a job that
        was done or failed: queued again, its result to be replaced),
        "unchanged" (a re-send of what was already delivered: dropped).
        ``held``: series some of whose instances were refused for lack of
        space, kept back until the sender sends again. A job with a job
        being segmented waits for it."""
        now = time.time() if now is None else now
        events = []
        with self.lock:
            for folder in self.receiving():
                files = sorted(folder.glob("*.dcm"))
                if not files or folder.name in held:
                    continue
                if now - max(f.stat().st_mtime for f in files) < settle_s:
                    continue
                existing = self.find_job(folder.name)
                if existing is not None and existing[0] == "active":
                    continue  # merged when that run is over
                if existing is None:
                    events.append(("queued", self._new_job(folder, files, now)))
                else:
                    events.append(self._merge(folder, files, *existing))
                try:
                    folder.parent.rmdir()  # the study folder, when this was its last series
                except OSError:
                    pass
        return events

    def _new_job(self, folder: Path, files: List[Path], now: float) -> dict:
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{folder.name}"[:120]
        if (self.root / "series" / job_id).exists():
            job_id += f"-{os.getpid()}-{int(now * 1000) % 100000}"
        target = self.root / "series" / job_id
        job = {"id": job_id, "study": folder.parent.name, "series": folder.name, "instances": len(files),
               "folder": str(target.relative_to(self.root)), "queued": _now(), "attempts": 0,
               "outputs": {}, "sent": [], "version": 1}
        # The job first, then the rename (which needs no space): on a full disk nothing moves and the series
        # waits in incoming/; after a crash between the two, recover() finds the series where the job says.
        write_json_atomic(self.root / "jobs" / "queue" / f"{job_id}.json", job)
        os.replace(folder, target)
        return job

    def _merge(self, folder: Path, files: List[Path], state: str, job: dict) -> Tuple[str, dict]:
        target = self.root / job["folder"]
        target.mkdir(parents=True, exist_ok=True)  # retention may have deleted it
        new = [f for f in files if not (target / f.name).exists()]
        for f in files:  # a re-sent instance replaces its earlier copy (the same SOP Instance UID)
            os.replace(f, target / f.name)
        folder.rmdir()
        if not new:
            return ("unchanged" if state == "done" else "merged"), job
        job["instances"] = len(list(target.glob("*.dcm")))
        if state == "queue":
            self.save(job, "queue")
            return "merged", job
        job.update(version=int(job.get("version", 1)) + 1, outputs={}, sent=[], attempts=0, requeued=_now())
        job.pop("reason", None)
        job.pop("purged", None)
        self.move(job, state, "queue")
        return "again", job
    def move(self, job: dict, source: str, target: str) -> None:
        path = self.root / "jobs" / target / f"{job['id']}.json"
        write_json_atomic(path, job)
        old = self.root / "jobs" / source / f"{job['id']}.json"
        if old != path and old.exists():
            old.unlink()

    def save(self, job: dict, state: str) -> None:
        write_json_atomic(self.root / "jobs" / state / f"{job['id']}.json", job)

    def claim(self) -> Optional[dict]:
        """The oldest queued job, now active; None when the queue is empty."""
        for path in self.jobs("queue"):
            target = self.root / "jobs" / "active" / path.name
            try:
                os.replace(path, target)
            except FileNotFoundError:
                continue
            return json.loads(target.read_text())
        return None

    def recover(self) -> List[dict]:
        """Jobs left active by a node that was killed go back to the queue; a
        queued job whose series is still in incoming/ (a crash between writing
        the job and moving its series) gets it; a series folder no job names
        (made by an earlier version that crashed there) gets a job; partial
        files of an interrupted write are removed."""
        recovered = []
        for path in self.jobs("active"):
            job = json.loads(path.read_text())
            os.replace(path, self.root / "jobs" / "queue" / path.name)
            recovered.append(job)
        named = set()
        for state in self.STATES:
            for path in self.jobs(state):
                job = json.loads(path.read_text())
                named.add(job.get("folder"))
                target = self.root / job.get("folder", "")
                source = self.root / "incoming" / _safe(job.get("study", "")) / _safe(job.get("series", ""))
                if state == "queue" and not target.exists() and source.is_dir():
                    os.replace(source, target)
        for folder in sorted(p for p in (self.root / "series").iterdir() if p.is_dir()):
            if str(folder.relative_to(self.root)) not in named:
                files = list(folder.glob("*.dcm"))
                if not files:
                    continue
                import pydicom

                ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
                job = {"id": folder.name, "study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
                       "instances": len(files), "folder": str(folder.relative_to(self.root)), "queued": _now(),
                       "attempts": 0, "outputs": {}, "sent": [], "version": 1}
                write_json_atomic(self.root / "jobs" / "queue" / f"{folder.name}.json", job)
                recovered.append(job)
        for part in (self.root / "tmp").glob("*.part"):
            part.unlink()
        return recovered

    def retry(self, ids: Sequence[str] = ()) -> List[str]:
        """Failed jobs (all, or those named) back to the queue."""
        moved = []
        for path in self.jobs("failed"):
            job = json.loads(path.read_text())
            if ids and job["id"] not in ids and job["series"] not in ids:
                continue
            job.pop("reason", None)
            job["retried"] = _now()
            self.move(job, "failed", "queue")
            moved.append(job["id"])
        missing = [i for i in ids if not any(i in (m, m.split("-", 2)[-1]) for m in moved)]
        if missing:
            raise NodeError(f"{self.root}: no failed job {', '.join(missing)}")
        return moved

    def status(self) -> dict:
        failed = [json.loads(p.read_text()) for p in self.jobs("failed")]
        return {"spool": str(self.root), "receiving": len(self.receiving()), "queued": len(self.jobs("queue")),
                "in_progress": len(self.jobs("active")), "done": len(self.jobs("done")), "failed": len(failed),
                "failed_jobs": [{"id": j["id"], "series": j["series"], "reason": j.get("reason", "")}
                                for j in failed],
                "not_segmented": sum(1 for _ in (self.root / "other").glob("*/*.dcm")),
                "not_a_volume": sum(1 for p in self.jobs("done") if json.loads(p.read_text()).get("skipped"))}


# --------------------------------------------------------------------------
# Receiving (the Storage SCP)
# --------------------------------------------------------------------------

def _check_ct(ds, transfer_syntax: str) -> str:
    """"" for a CT slice FocusNet can place in a volume, else the problem."""
    missing = [k for k in CT_REQUIRED if k not in ds]
    if missing:
        return f"missing {', '.join(missing)}"
    if str(transfer_syntax) in UNCOMPRESSED:
        expected = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        got = len(ds.PixelData)
        if got not in (expected, expected + 1):
            return f"pixel data has {got} bytes, {ds.Rows} x {ds.Columns} x {ds.BitsAllocated} bits needs {expected}"
    return ""


class Receiver:
    """The C-STORE and C-ECHO handlers: every instance is on disk before
    its response; CT goes to the series spool, anything else to other/."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.counts: Dict[int, Dict[str, int]] = {}
        self._lock = threading.Lock()
        # series -> time an instance of it was refused for lack of space: held back
        # from settling until an instance of it is stored after that (the sender sends again)
        self._refused: Dict[str, float] = {}
        self._open: Dict[int, set] = {}  # association -> series it has sent instances of (until it ends)

    def held(self) -> List[str]:
        """Series not to make a job of yet: some of their instances were
        refused for lack of space, or an association is still sending them
        (a sender that pauses inside one association)."""
        with self._lock:
            return list(self._refused) + [s for series in self._open.values() for s in series]

    def handlers(self):
        from pynetdicom import evt

        return [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, self.on_echo),
                (evt.EVT_RELEASED, self.on_end), (evt.EVT_ABORTED, self.on_end),
                (evt.EVT_ACCEPTED, self.on_accepted)]

    def on_accepted(self, event) -> None:
        """Say once per association what was refused at negotiation (a
        sender whose every proposal was refused would otherwise see
        "Transfer Syntaxes Not Supported" and the node say nothing)."""
        from pydicom.uid import UID

        accepted = {str(c.abstract_syntax) for c in event.assoc.accepted_contexts}
        # Only what cannot be received at all: a class also proposed in another, accepted transfer syntax is fine.
        lost = [c for c in event.assoc.rejected_contexts if str(c.abstract_syntax) not in accepted]
        ct = sorted({UID(ts).name for c in lost if str(c.abstract_syntax) == CT_IMAGE_STORAGE
                     for ts in c.transfer_syntax})
        caller = event.assoc.requestor.ae_title
        if ct:
            LOG.warning("refused at association from %s: CT Image Storage in %s (accepted for CT: uncompressed, "
                        "deflated, %s)", caller, ", ".join(ct), ", ".join(LOSSLESS_COMPRESSED.values()))
        elif CT_IMAGE_STORAGE in accepted:
            # CT also proposed in a syntax the node takes: said all the same (dcmtk's storescu always adds
            # an uncompressed fallback and then fails, in the sender, to convert a lossy file to it)
            refused = sorted({UID(ts).name for c in event.assoc.rejected_contexts
                              if str(c.abstract_syntax) == CT_IMAGE_STORAGE for ts in c.transfer_syntax})
            if refused:
                LOG.info("refused at association from %s: CT Image Storage in %s (the sender was offered another "
                         "syntax; images it holds only in the refused one cannot be sent)", caller, ", ".join(refused))
        others = sorted({UID(c.abstract_syntax).name for c in lost if str(c.abstract_syntax) != CT_IMAGE_STORAGE})
        if others:
            LOG.info("refused at association from %s: %d other SOP class(es) in the transfer syntaxes proposed "
                     "(%s%s)", caller, len(others), ", ".join(others[:3]), ", ..." if len(others) > 3 else "")

    def on_echo(self, event) -> int:
        LOG.info("echo from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def _count(self, event, key: str) -> None:
        with self._lock:
            counts = self.counts.setdefault(id(event.assoc), {})
            counts[key] = counts.get(key, 0) + 1

    def on_store(self, event) -> int:
        caller = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop = str(ds.SOPInstanceUID)
            sop_class = str(ds.SOPClassUID)
        except Exception as error:  # undecodable: refused, the association goes on
            LOG.warning("refused an instance from %s: it cannot be decoded (%s)", caller, error)
            self._count(event, "refused")
            return CANNOT_UNDERSTAND
        try:
            data = event.encoded_dataset()
        except Exception as error:
            LOG.warning("refused %s from %s: %s", sop, caller, error)
            self._count(event, "refused")
            return CANNOT_UNDERSTAND
        uids = {"SOPInstanceUID": sop}
        if sop_class == CT_IMAGE_STORAGE:
            uids.update(StudyInstanceUID=str(getattr(ds, "StudyInstanceUID", "")),
                        SeriesInstanceUID=str(getattr(ds, "SeriesInstanceUID", "")))
        bad = {k: v for k, v in uids.items() if not is_uid(v)}
        if bad:  # these become folder and file names: only real UIDs do
            LOG.warning("refused an instance from %s: %s", caller,
                        "; ".join(f"{k} {v[:80]!r} is not a DICOM UID (digits and dots, at most 64)"
                                  for k, v in bad.items()))
            self._count(event, "refused")
            return CANNOT_UNDERSTAND
        try:
            if sop_class != CT_IMAGE_STORAGE or getattr(ds, "Modality", "CT") != "CT":
                modality = str(getattr(ds, "Modality", "") or "unknown")
                self.spool.store_other(data, modality, sop)
                LOG.info("received %s instance %s from %s: stored in other/, not segmented (FocusNet segments CT)",
                         modality, sop, caller)
                self._count(event, f"other {modality}")
                return SUCCESS
            problem = _check_ct(ds, event.context.transfer_syntax)
            if problem:
                LOG.warning("refused CT instance %s from %s: %s", sop, caller, problem)
                self._count(event, "refused")
                return DOES_NOT_MATCH
            self.spool.store_ct(data, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop)
            with self._lock:
                self._open.setdefault(id(event.assoc), set()).add(uids["SeriesInstanceUID"])
            if uids.get("SeriesInstanceUID") in self._refused:
                with self._lock:
                    self._refused.pop(uids["SeriesInstanceUID"], None)  # the sender sends again: space is back
        except OSError as error:
            LOG.error("could not store %s from %s: %s (refused with 0xA700: out of resources)", sop, caller, error)
            if "SeriesInstanceUID" in uids:
                with self._lock:
                    self._refused[uids["SeriesInstanceUID"]] = time.time()
            self._count(event, "refused")
            return OUT_OF_RESOURCES
        self._count(event, "CT")
        return SUCCESS

    def on_end(self, event) -> None:
        with self._lock:
            counts = self.counts.pop(id(event.assoc), None)
            self._open.pop(id(event.assoc), None)
        if counts:
            summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
            LOG.info("received from %s: %s", event.assoc.requestor.ae_title, summary)


def _tls_context(tls: Tuple[str, str, str]) -> ssl.SSLContext:
    cert, key, ca = tls
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED  # callers show a certificate the CA signed
    return context


# --------------------------------------------------------------------------
# Sending (the Storage SCU)
# --------------------------------------------------------------------------

class DeliveryError(RuntimeError):
    pass


class DeliveryRefused(DeliveryError):
    """The destination answers but does not take this kind of object (its
    SOP class): retrying cannot help."""


class Stopped(Exception):
    """The node was asked to stop while a job waited to retry delivery."""


def send_file(path: Path, destination: Destination, calling_ae: str, timeout_s: float = 30.0) -> None:
    """One C-STORE of one file; raises DeliveryError unless it succeeded."""
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(str(path))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:  # it answered, and does not take this class
            from pydicom.uid import UID

            raise DeliveryRefused(f"{destination} does not accept {UID(ds.SOPClassUID).name} in "
                                  f"{UID(ds.file_meta.TransferSyntaxUID).name}")
        raise DeliveryError(f"no association with {destination} (refused, aborted or not listening)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is not None and code & 0xF000 == 0xB000:  # PS3.4 B.2.3: a warning, the instance is stored
        LOG.warning("%s stored %s with warning status %s", destination, path.name, hex(code))
        return
    if code != SUCCESS:
        raise DeliveryError(f"{destination} answered C-STORE of {path.name} with status "
                            f"{'none' if code is None else hex(code)}")


# --------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------

@dataclass
class Node:
    options: NodeOptions
    spool: Spool = field(init=False)
    segmenter: object = field(init=False, default=None)
    server: object = field(init=False, default=None)
    stopping: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self):
        self.options.check()
        self.spool = Spool(self.options.spool)
        self.spool.acquire()
        self.receiver = Receiver(self.spool)
        self._delivery = None  # queue.Queue of segmented jobs while run() serves
        self._started = 0.0
        self._purged_at = 0.0

    # -- service -----------------------------------------------------------
    def start_server(self) -> int:
        from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts

        ae = AE(ae_title=self.options.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts + VerificationPresentationContexts
        ct = next(c for c in ae.supported_contexts if c.abstract_syntax == CT_IMAGE_STORAGE)
        ae.add_supported_context(CT_IMAGE_STORAGE, list(ct.transfer_syntax) + list(LOSSLESS_COMPRESSED))
        ae.require_called_aet = True
        if self.options.allow:
            ae.require_calling_aet = list(self.options.allow)
        ssl_context = _tls_context(self.options.tls) if self.options.tls else None
        try:
            self.server = ae.start_server((self.options.host, self.options.port), block=False,
                                          evt_handlers=self.receiver.handlers(), ssl_context=ssl_context)
        except OSError as error:
            raise NodeError(f"--port {self.options.port} on {self.options.host}: "
                            f"{error.strerror or error} (another program listens there?)") from None
        port = self.server.server_address[1]
        LOG.info("listening as %s on %s:%d%s%s; results to %s", self.options.ae_title, self.options.host, port,
                 " (TLS)" if ssl_context else "",
                 f"; accepting {', '.join(self.options.allow)}" if self.options.allow else "",
                 self.options.destination)
        return port

    def load_model(self) -> None:
        from .segment import Segmenter

        start = time.perf_counter()
        self.segmenter = Segmenter(self.options.model, device=self.options.device)
        LOG.info("model %s loaded on %s in %.1f s", self.segmenter.model_info["name"], self.segmenter.device,
                 time.perf_counter() - start)

    def run(self) -> None:
        """Serve until stop(): receive, queue settled series, segment, send."""
        for job in self.spool.recover():
            LOG.info("job %s was interrupted: queued again", job["id"])
        import queue

        self.start_server()  # first: a taken port is said before the model loads
        self.load_model()
        self._started = time.monotonic()
        self._delivery = queue.Queue()
        sender = threading.Thread(target=self._deliver_forever, name="focusnet-delivery", daemon=True)
        sender.start()
        try:
            while not self.stopping.is_set():
                try:
                    self.step()
                except OSError as error:  # a full disk: say so, keep receiving what fits, try again
                    LOG.error("spool %s: %s; retrying in %g s", self.spool.root, error, DISK_RETRY_S)
                    self.stopping.wait(DISK_RETRY_S)
        finally:
            if self.server is not None:
                self.server.shutdown()
            self.stopping.set()
            sender.join(timeout=60)

    def step(self) -> None:
        """One turn of the loop: retention, settled series, one job."""
        self.purge()
        # After a start, a series that was arriving before it gets --settle seconds to go on arriving.
        settling = time.monotonic() - self._started < self.options.settle_s
        for what, job in ([] if settling else
                          self.spool.queue_settled(self.options.settle_s, held=self.receiver.held())):
            if what == "queued":
                LOG.info("complete: series %s (%d instances), job %s queued", job["series"], job["instances"],
                         job["id"])
            elif what == "merged":
                LOG.info("series %s: more instances for its queued job %s (%d in all)", job["series"], job["id"],
                         job["instances"])
            elif what == "again":
                LOG.info("series %s: new instances after its job %s was made (%d in all): segmented again as "
                         "version %d, replacing the earlier result", job["series"], job["id"], job["instances"],
                         job["version"])
            else:
                LOG.info("series %s arrived again unchanged: its result was delivered already, not sent again",
                         job["series"])
        job = self.spool.claim()
        if job is None:
            self.stopping.wait(0.5)
            return
        try:
            self.process(job)
        except OSError:
            self.spool.move(job, "active", "queue")  # nothing lost: the job waits for space
            raise

    def stop(self) -> None:
        if not self.stopping.is_set():
            LOG.info("stopping: unfinished work stays in the spool for the next start")
        self.stopping.set()

    def purge(self, every_s: float = 60.0) -> None:
        """Retention (``--keep-days``), at most once an ``every_s``."""
        if time.monotonic() - self._purged_at < every_s and self._purged_at:
            return
        self._purged_at = time.monotonic()
        for job_id in self.spool.purge_finished(self.options.keep_days):
            LOG.info("retention: deleted the images and results of job %s (done more than %g day(s) ago)", job_id,
                     self.options.keep_days)

    def not_a_volume(self, folder: Path) -> str:
        """Why a received series is no CT volume to segment ("" when it is
        one): a localizer (ImageType LOCALIZER: a scout, a topogram) or too
        few slices."""
        import pydicom

        files = sorted(folder.glob("*.dcm"))
        for file in files:
            image_type = [str(v).upper() for v in getattr(pydicom.dcmread(str(file), stop_before_pixels=True),
                                                          "ImageType", [])]
            if "LOCALIZER" in image_type:
                return "a localizer (ImageType LOCALIZER)"
        if len(files) < MIN_VOLUME_SLICES:
            return f"{len(files)} image(s), no volume"
        return ""

    # -- one job -------------------------------------------------------------
    def process(self, job: dict) -> None:
        job["attempts"] = job.get("attempts", 0) + 1
        job["started"] = _now()
        self.spool.save(job, "active")
        try:
            skip = "" if self._outputs_ready(job) else self.not_a_volume(self.spool.root / job["folder"])
            if skip:
                job.update(skipped=skip, done=_now())
                self.spool.move(job, "active", "done")
                LOG.info("not segmented: series %s is %s", job["series"], skip)
                return
            if not self._outputs_ready(job):
                self.segment(job)
        except Exception as error:  # the job fails, the node goes on
            self._failed(job, error)
            return
        if self._delivery is not None:
            self._delivery.put(job)  # sent by the delivery thread: retries there never hold up the next series
        else:
            self.deliver_job(job)

    def deliver_job(self, job: dict) -> None:
        """Send a segmented job's results, then done/ (or failed/, or back
        to the queue on a clean stop)."""
        try:
            self.deliver(job)
        except Stopped:  # a clean stop: the job waits in the queue for the next start
            job["attempts"] = max(0, job.get("attempts", 1) - 1)
            self.spool.move(job, "active", "queue")
            LOG.info("stopping: job %s (series %s) queued again for the next start", job["id"], job["series"])
            return
        except Exception as error:
            self._failed(job, error)
            return
        job["done"] = _now()
        self.spool.move(job, "active", "done")

    def _failed(self, job: dict, error: Exception) -> None:
        job["reason"] = f"{type(error).__name__}: {error}" if not isinstance(error, (DeliveryError, ValueError)) \
            else str(error)
        job["failed"] = _now()
        self.spool.move(job, "active", "failed")
        LOG.error("failed: job %s (series %s): %s", job["id"], job["series"], job["reason"])

    def _deliver_forever(self) -> None:
        """The delivery thread: one job at a time, in the order segmented."""
        import queue

        while True:
            try:
                job = self._delivery.get(timeout=0.5)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            try:
                self.deliver_job(job)
            except OSError as error:  # a full disk while moving the job: it waits in the queue
                LOG.error("spool %s: %s; job %s queued again", self.spool.root, error, job["id"])
                try:
                    self.spool.move(job, "active", "queue")
                except OSError:
                    pass  # still active on disk: the next start queues it again

    def _outputs_ready(self, job: dict) -> bool:
        outputs = job.get("outputs") or {}
        return bool(outputs) and all((self.spool.root / p).is_file() for p in outputs.values())

    def segment(self, job: dict) -> None:
        from .caseid import CaseMismatchError, check_references, identity_of_dicom_series
        from .dicomseg import write_dicom_seg
        from .imageio import read_dicom_series
        from .rtstruct import write_rtstruct

        folder = self.spool.root / job["folder"]
        identity = identity_of_dicom_series(folder)
        if identity.series_uid != job["series"]:  # the folder must hold the job's series and no other
            raise CaseMismatchError(f"{folder}: holds series {identity.series_uid}, the job is for {job['series']}")
        image = read_dicom_series(folder)
        start = time.perf_counter()
        result = self.segmenter.segment(image)
        seconds = time.perf_counter() - start
        organs = self.segmenter.config.organs
        out = self.spool.root / "results" / job["id"]
        if out.exists():  # an earlier attempt stopped mid-write: its files are not trusted
            shutil.rmtree(out)
        out.mkdir(parents=True)
        outputs = {}
        present = sum(o.present for o in result.organs)
        version = int(job.get("version", 1))
        series_of = job.setdefault("result_series", {})  # a new version replaces the old in the same series
        description = "FocusNet OARs" + (f" (version {version}, {time.strftime('%Y-%m-%d %H:%M')})"
                                         if version > 1 else "")
        for fmt in self.options.formats:
            if fmt == "rtstruct":
                path = write_rtstruct(result.labels, folder, organs, out / "rtstruct.dcm",
                                      label=f"FocusNet v{version}" if version > 1 else "FocusNet",
                                      series_description=description, series_uid=series_of.get(fmt),
                                      instance_number=version)
            else:
                model = self.segmenter.model_info
                path = write_dicom_seg(result.labels, folder, organs, out / "seg.dcm", model_name=model["name"],
                                       model_version=model["code_version"] or "", series_description=description,
                                       series_uid=series_of.get(fmt), instance_number=version)
            if fmt not in series_of:
                import pydicom

                series_of[fmt] = str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)
            check_references(identity, path)  # what goes back to the PACS is this series' and no other's
            outputs[fmt] = str(Path(path).relative_to(self.spool.root))
        job.update(outputs=outputs, sent=[], segmented_s=round(seconds, 2), organs_found=present)
        self.spool.save(job, "active")
        LOG.info("segmented in %.1f s: series %s, %d of %d organs", seconds, job["series"], present, len(organs.names))
        if result.outside_scan:
            job.update(outside_scan=result.outside_scan)
            self.spool.save(job, "active")
            LOG.info("not in the scan (judged from where the other organs lie; not drawn): series %s: %s",
                     job["series"], ", ".join(result.outside_scan))

    def deliver(self, job: dict) -> None:
        """C-STORE each output not yet delivered; retried with backoff for
        the retry window, then DeliveryError."""
        opts = self.options
        for fmt, rel in job["outputs"].items():
            if fmt in job.get("sent", []):
                continue
            deadline = time.monotonic() + opts.retry_window_s
            wait = opts.first_retry_s
            attempt = 0
            refused = False
            while True:
                attempt += 1
                try:
                    send_file(self.spool.root / rel, opts.destination, opts.ae_title)
                    break
                except DeliveryRefused as error:
                    LOG.warning("not sending %s of series %s: %s (use --format to send only what it takes)",
                                fmt, job["series"], error)
                    job.setdefault("not_accepted", []).append(fmt)
                    refused = True
                    break
                except DeliveryError as error:
                    left = deadline - time.monotonic()
                    if self.stopping.is_set():
                        raise Stopped() from None
                    if left <= 0:
                        raise DeliveryError(f"{fmt} not delivered to {opts.destination} after {attempt} attempt(s) "
                                            f"in {opts.retry_window_s:g} s: {error}") from None
                    LOG.warning("send %s of job %s: %s; retrying in %.0f s", fmt, job["id"], error, min(wait, left))
                    if self.stopping.wait(min(wait, left)):
                        raise Stopped()
                    wait = min(wait * 2, opts.max_retry_wait_s)
            job.setdefault("sent", []).append(fmt)  # (or refused for good: not tried again either)
            self.spool.save(job, "active")  # delivered once: a restart does not send it again
            if not refused:
                LOG.info("sent %s of series %s to %s", fmt, job["series"], opts.destination)
        if len(job.get("not_accepted", [])) == len(job["outputs"]):
            raise DeliveryError(f"{opts.destination} accepts none of {', '.join(job['outputs'])}")


def configure_logging() -> None:
    import warnings

    # pydicom warns (unformatted, on stderr) about values the node refuses anyway and says so in its own line.
    warnings.filterwarnings("ignore", module="pydicom")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s focusnet-node %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its own lines per PDU; ours say what happened
