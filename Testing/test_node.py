"""`focusnet node` against dcmtk's own tools, in separate processes: storescu
sends phantom CT series, echoscu verifies, storescp is the planning system
that receives the RTSTRUCT and SEG, and dciodvfy checks what arrives. The
node is killed with SIGKILL mid-segmentation and restarted; the destination
is down, then up."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import pytest
from pydicom.uid import generate_uid

from FocusNetCore.phantom import PHANTOM_SET, generate_case, write_case

RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test` installs it (Debian packages dcmtk, dicom3tools, libgdcm-tools)"
    return path


_HANDED_OUT = set()


def free_port():
    """A free loopback port never handed out before in this run: a port the
    OS gives back twice (the node's and its destination's, both closed
    until their process binds them) made the node send to itself."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Process:
    """A child whose output goes to a file (read while it runs)."""

    def __init__(self, args, log: Path):
        self.log = log
        self.handle = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=self.handle, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_line(self, pattern, timeout=120, count=1):
        def found():
            assert self.proc.poll() is None or len(re.findall(pattern, self.text())) >= count, \
                f"stopped (rc {self.proc.returncode}):\n{self.text()[-3000:]}"
            return len(re.findall(pattern, self.text())) >= count
        wait_for(found, timeout, f"{pattern!r} in {self.log.name}:\n{self.text()[-2000:]}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.handle.close()


def mount_tmpfs(mount: Path, options: str) -> Path:
    """A tmpfs the test mounts (a small or read-only spool); skipped, saying
    why, where that is not possible (CI and `make test` here run as root).
    The test unmounts it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the spool needs root (CI and `make test` here run as root)")
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    return mount


def start_node(spool: Path, destination_port: int, *extra, log_name="node.log"):
    port = free_port()
    node = Process([sys.executable, "-m", "FocusNetCore", "node", "--spool", str(spool), "--port", str(port),
                    "--destination", f"PLANNING@127.0.0.1:{destination_port}", "--settle", "1.5",
                    "--device", "cpu", *extra], spool.parent / log_name)
    node.wait_line(r"listening as FOCUSNET", timeout=120)
    node.port = port
    return node


def start_storescp(folder: Path, port: int):
    folder.mkdir(parents=True, exist_ok=True)
    scp = Process([tool("storescp"), "--aetitle", "PLANNING", "--output-directory", str(folder), str(port)],
                  folder.parent / f"storescp-{port}.log")
    wait_for(lambda: _listening(port), 20, "storescp to listen")
    return scp


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def storescu(node_port, *paths, calling="STORESCU", extra=()):
    return subprocess.Popen([tool("storescu"), "-aet", calling, "-aec", "FOCUSNET", "-nh", *extra, "+sd", "+r",
                             "127.0.0.1", str(node_port), *map(str, paths)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def received(folder: Path, sop_class: str):
    """{referenced CT SeriesInstanceUID: [files]} of what storescp wrote."""
    out = {}
    for path in sorted(folder.glob("*")):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            continue  # storescp is still writing it: seen at the next look
        if ds.SOPClassUID != sop_class:
            continue
        if sop_class == RT_STRUCT:
            series = (ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                      .RTReferencedSeriesSequence[0].SeriesInstanceUID)
        else:
            series = ds.ReferencedSeriesSequence[0].SeriesInstanceUID
        out.setdefault(str(series), []).append(path)
    return out


def status(spool: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "FocusNetCore", "node", "status", "--spool", str(spool)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Three small phantom CT series as `focusnet phantom --format dicom`
    writes them: {SeriesInstanceUID: folder}."""
    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for seed in (810, 811, 812):
        case = generate_case(seed, "small")
        write_case(case, root, "dicom")
        folder = root / case.name / "CT"
        uid = pydicom.dcmread(str(next(folder.glob("*.dcm"))), stop_before_pixels=True).SeriesInstanceUID
        out[str(uid)] = folder
    return out


def _variant(source: Path, target: Path, **changes):
    ds = pydicom.dcmread(str(source))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(target))
    return target


def test_node_receives_segments_and_delivers_with_dcmtk(series, tmp_path):
    """echoscu; a caller outside --allow rejected; three series sent at once
    (one with a corrupt slice) all delivered as an RTSTRUCT referencing the
    series that passes dciodvfy, and a SEG; an MR instance stored but never
    segmented; `node status` counts it all."""
    dest_port = free_port()
    scp = start_storescp(tmp_path / "planning", dest_port)
    node = start_node(tmp_path / "spool", dest_port, "--allow", "STORESCU", "ECHOSCU")
    try:
        echo = subprocess.run([tool("echoscu"), "-aet", "ECHOSCU", "-aec", "FOCUSNET", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        intruder = subprocess.run([tool("echoscu"), "-aet", "INTRUDER", "-aec", "FOCUSNET", "127.0.0.1",
                                   str(node.port)], capture_output=True, text=True, timeout=30)
        assert intruder.returncode != 0 and "rejected" in (intruder.stdout + intruder.stderr).lower()

        uids = list(series)
        # The first series travels with one corrupt slice of its own: pixel data cut in half.
        first = tmp_path / "first"
        shutil.copytree(series[uids[0]], first)
        some = sorted(first.glob("*.dcm"))[5]
        ds = pydicom.dcmread(str(some))
        _variant(some, first / "corrupt.dcm", SOPInstanceUID=generate_uid(), PixelData=ds.PixelData[: len(ds.PixelData) // 2])
        # An MR instance (another series of the same study): stored, not segmented.
        mr_series = generate_uid()
        mr = _variant(some, tmp_path / "mr" / "mr.dcm", SOPClassUID=MR_IMAGE, Modality="MR",
                      SOPInstanceUID=generate_uid(), SeriesInstanceUID=mr_series)
        senders = [storescu(node.port, first, extra=("-v",)), storescu(node.port, series[uids[1]]),
                   storescu(node.port, series[uids[2]]), storescu(node.port, mr)]
        outputs = [s.communicate(timeout=120)[0] for s in senders]
        # the corrupt slice is refused with a failure status, and storescu goes on with the rest
        assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in outputs[0], outputs[0][-3000:]
        for s, text in zip(senders, outputs):
            assert s.returncode == 0, text[-1500:]

        wait_for(lambda: len(received(tmp_path / "planning", RT_STRUCT)) == 3, 300, "three RTSTRUCTs")
        wait_for(lambda: len(received(tmp_path / "planning", SEGMENTATION)) == 3, 60, "three SEGs")
    finally:
        node.stop()
        scp.stop()
    rtstructs = received(tmp_path / "planning", RT_STRUCT)
    assert set(rtstructs) == set(uids), "each RTSTRUCT references the series it was made from"
    for files in rtstructs.values():
        assert len(files) == 1
        check = subprocess.run([tool("dciodvfy"), str(files[0])], capture_output=True, text=True, timeout=120)
        errors = [l for l in (check.stdout + check.stderr).splitlines() if l.startswith("Error")]
        assert not errors, errors
        names = {r.ROIName for r in pydicom.dcmread(str(files[0])).StructureSetROISequence}
        assert {"Brainstem", "Parotid_L", "Parotid_R"} <= names
    state = status(tmp_path / "spool")
    assert state["done"] == 3 and state["failed"] == 0 and state["queued"] == 0 and state["in_progress"] == 0
    assert state["not_segmented"] == 1
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "spool" / "jobs" / "done").glob("*.json")]
    assert mr_series not in {j["series"] for j in jobs}
    good = len(list(series[uids[0]].glob("*.dcm")))
    assert {j["series"]: j["instances"] for j in jobs}[uids[0]] == good, "the rest of the series was stored"
    log = node.text()
    assert "refused CT instance" in log and "pixel data has" in log
    assert "stored in other/, not segmented" in log
    assert len(re.findall(r"segmented in [\d.]+ s", log)) == 3 and len(re.findall(r"sent rtstruct", log)) == 3


def test_kill_during_segmentation_then_restart_delivers_exactly_once(series, tmp_path):
    uid, folder = next(iter(series.items()))
    dest_port = free_port()
    scp = start_storescp(tmp_path / "planning", dest_port)
    spool = tmp_path / "spool"
    node = start_node(spool, dest_port)
    try:
        sent = storescu(node.port, folder)
        assert sent.wait(120) == 0, sent.communicate()[0]
        node.wait_line(r"complete: series", timeout=60)
        time.sleep(1.0)
        assert "segmented in" not in node.text(), "the phantom segmented too fast to be killed mid-way"
        node.stop(signal.SIGKILL)
        assert status(spool)["in_progress"] == 1
        assert not received(tmp_path / "planning", RT_STRUCT)
        node = start_node(spool, dest_port, log_name="node-restarted.log")
        node.wait_line(r"sent dicomseg", timeout=180)
        time.sleep(3.0)  # nothing else may come
    finally:
        node.stop()
        scp.stop()
    assert "was interrupted: queued again" in node.text()
    assert {k: len(v) for k, v in received(tmp_path / "planning", RT_STRUCT).items()} == {uid: 1}
    assert {k: len(v) for k, v in received(tmp_path / "planning", SEGMENTATION).items()} == {uid: 1}
    done = [json.loads(p.read_text()) for p in (spool / "jobs" / "done").glob("*.json")]
    assert len(done) == 1 and done[0]["attempts"] == 2
    assert status(spool)["in_progress"] == 0


def test_destination_down_then_up_and_failed_jobs_retry(series, tmp_path):
    """Down, then up within the retry window: delivered. Down for longer
    than the window: failed/ with the reason; `node retry` sends it once the
    destination is back, without segmenting again."""
    (a, folder_a), (b, folder_b) = list(series.items())[:2]
    dest_port = free_port()
    spool = tmp_path / "spool"
    node = start_node(spool, dest_port, "--retry-window", "12", "--format", "rtstruct")
    scp = None
    try:
        assert storescu(node.port, folder_a).wait(120) == 0
        node.wait_line(r"retrying in", timeout=120)
        scp = start_storescp(tmp_path / "planning", dest_port)
        node.wait_line(r"sent rtstruct", timeout=60)
        scp.stop()
        scp = None

        assert storescu(node.port, folder_b).wait(120) == 0
        node.wait_line(r"failed: job", timeout=120)
        state = status(spool)
        assert state["failed"] == 1 and state["done"] == 1
        assert f"PLANNING@127.0.0.1:{dest_port}" in state["failed_jobs"][0]["reason"]
        scp = start_storescp(tmp_path / "planning", dest_port)
        retry = subprocess.run([sys.executable, "-m", "FocusNetCore", "node", "retry", "--spool", str(spool),
                                "--job", b],
                               capture_output=True, text=True, timeout=60)
        assert retry.returncode == 0, retry.stderr
        node.wait_line(r"sent rtstruct", timeout=120, count=2)
    finally:
        node.stop()
        if scp is not None:
            scp.stop()
    assert {k: len(v) for k, v in received(tmp_path / "planning", RT_STRUCT).items()} == {a: 1, b: 1}
    assert len(re.findall(r"segmented in", node.text())) == 2, "a retry sends the result it has"
    assert status(spool)["done"] == 2


def test_node_over_tls_only(series, tmp_path):
    """--tls: an association with a certificate the CA signed works, a plain one does not."""
    import ssl

    from pynetdicom import AE

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout",
                    str(key), "-out", str(cert), "-days", "1"], check=True, capture_output=True)
    node = start_node(tmp_path / "spool", free_port(), "--tls", str(cert), str(key), str(cert))
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        context.check_hostname = False
        context.load_cert_chain(str(cert), str(key))
        ae = AE(ae_title="TLSCLIENT")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="FOCUSNET", tls_args=(context, None))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        plain = subprocess.run([tool("echoscu"), "-aec", "FOCUSNET", "127.0.0.1", str(node.port)],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0
    finally:
        node.stop()


def test_node_refuses_unsafe_or_wrong_settings(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "FocusNetCore", "node", "--spool", str(tmp_path / "s"), *args],
                              capture_output=True, text=True, timeout=60)

    open_host = run("--destination", "P@127.0.0.1:104", "--host", "0.0.0.0")
    assert open_host.returncode == 2 and "--allow" in open_host.stderr
    bad = run("--destination", "PLANNING-10.0.0.5")
    assert bad.returncode == 2 and "AE_TITLE@HOST:PORT" in bad.stderr
    missing = run()
    assert missing.returncode == 2 and "--destination" in missing.stderr
    wrong = run("--destination", "P@127.0.0.1:104", "--format", "pdf")
    assert wrong.returncode == 2 and "--format" in wrong.stderr
    # Issue 45, fault 13: every bad argument is exit 2 with a message naming it, never a traceback.
    for args, named in ((("--port", "99999"), "--port"), (("--port", "-5"), "--port"),
                        (("--host", "999.1.1.1"), "--host"), (("--keep-days", "-1"), "--keep-days")):
        result = run("--destination", "P@127.0.0.1:104", *args)
        assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr
    ae = run("--destination", "PLAN\\NING@127.0.0.1:104")
    assert ae.returncode == 2 and "AE title" in ae.stderr and "Traceback" not in ae.stderr, ae.stderr
    (tmp_path / "a-file").write_text("not a folder")
    as_file = subprocess.run([sys.executable, "-m", "FocusNetCore", "node", "--spool", str(tmp_path / "a-file"),
                              "--destination", "P@127.0.0.1:104"], capture_output=True, text=True, timeout=60)
    assert as_file.returncode == 2 and "a-file" in as_file.stderr and "Traceback" not in as_file.stderr
    typo = subprocess.run([sys.executable, "-m", "FocusNetCore", "node", "status", "--spool", str(tmp_path / "spoool")],
                          capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2 and "spoool" in typo.stderr and not (tmp_path / "spoool").exists()


def test_untrusted_uids_never_become_paths_and_the_spool_is_private(series, tmp_path):
    """Issue 45, faults 11, 12 and 4: a slice whose Study and Series UIDs are
    ".." is refused (0xC210) and nothing is written outside the spool; what
    the node stores is its user's alone (files 0600, folders 0700); a second
    node on the same spool refuses to start, naming the first; retention
    deletes a finished job's images and results."""
    from FocusNetCore.node import Spool

    uid, folder = next(iter(series.items()))
    dest_port = free_port()
    scp = start_storescp(tmp_path / "planning", dest_port)
    spool = tmp_path / "box" / "spool"
    spool.parent.mkdir()
    node = start_node(spool, dest_port, "--format", "rtstruct")
    try:
        second = subprocess.run([sys.executable, "-m", "FocusNetCore", "node", "--spool", str(spool), "--port", "0",
                                 "--destination", f"PLANNING@127.0.0.1:{dest_port}", "--device", "cpu"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"pid {node.proc.pid}" in second.stderr, second.stderr
        evil = _variant(sorted(folder.glob("*.dcm"))[0], tmp_path / "evil" / "evil.dcm", StudyInstanceUID="..",
                        SeriesInstanceUID="..", SOPInstanceUID=generate_uid())
        out = storescu(node.port, evil, extra=("-v",)).communicate(timeout=60)[0]
        assert "Error" in out and "Success" not in out.split("Received Store Response")[-1], out[-2000:]
        node.wait_line(r"is not a DICOM UID", timeout=30)
        assert storescu(node.port, folder).wait(120) == 0
        node.wait_line(r"sent rtstruct", timeout=300)
    finally:
        node.stop()
        scp.stop()
    outside = [p.name for p in (tmp_path / "box").rglob("*") if spool not in p.parents and p != spool]
    assert outside == ["node.log"], outside  # the test's own log of the node's output; nothing of the node
    stored = [p for p in spool.rglob("*") if p.name != "node.lock"]
    assert stored and all(p.stat().st_mode & 0o077 == 0 for p in stored), \
        sorted({oct(p.stat().st_mode & 0o777) for p in stored})
    assert spool.stat().st_mode & 0o777 == 0o700
    job = json.loads(next((spool / "jobs" / "done").glob("*.json")).read_text())
    assert (spool / job["folder"]).is_dir() and (spool / "results" / job["id"]).is_dir()
    assert Spool(spool).purge_finished(7, now=time.time() + 6 * 86400) == []  # kept for a week
    assert Spool(spool).purge_finished(7, now=time.time() + 8 * 86400) == [job["id"]]
    assert not (spool / job["folder"]).exists() and not (spool / "results" / job["id"]).exists()
    assert status(spool)["done"] == 1


def test_scouts_are_not_failed_jobs_and_a_stop_keeps_work_queued(series, tmp_path):
    """Issue 45, faults 6 and 10: a 1-image scout (ImageType LOCALIZER) and a
    2-image topogram are recognised, logged once at INFO, and done, never
    failed; SIGTERM while a job waits to retry delivery leaves it queued
    for the next start, not failed."""
    uid, folder = next(iter(series.items()))
    files = sorted(folder.glob("*.dcm"))
    scout = _variant(files[0], tmp_path / "scout" / "1.dcm", SeriesInstanceUID=generate_uid(),
                     SOPInstanceUID=generate_uid(), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    topogram_series = generate_uid()
    for k in (0, 1):
        _variant(files[k], tmp_path / "topogram" / f"{k}.dcm", SeriesInstanceUID=topogram_series,
                 SOPInstanceUID=generate_uid())
    spool = tmp_path / "spool"
    node = start_node(spool, free_port(), "--format", "rtstruct")  # nobody listens at the destination
    try:
        assert storescu(node.port, scout.parent).wait(60) == 0
        assert storescu(node.port, tmp_path / "topogram").wait(60) == 0
        node.wait_line(r"not segmented: series .* is a localizer", timeout=60)
        node.wait_line(r"not segmented: series .* is 2 image\(s\), no volume", timeout=60)
        assert storescu(node.port, folder).wait(120) == 0
        node.wait_line(r"retrying in", timeout=300)
    finally:
        node.stop()  # SIGTERM while the job waits to retry
    log = node.text()
    assert "ERROR" not in log, log[-3000:]
    assert "queued again for the next start" in log
    state = status(spool)
    assert state["failed"] == 0 and state["not_a_volume"] == 2 and state["queued"] == 1, state


def test_compressed_series_are_accepted_and_lossy_refused_with_a_log_line(series, tmp_path):
    """Issue 45, fault 5: a series compressed by dcmtk as JPEG Lossless SV1
    (dcmcjpeg), JPEG-LS lossless (dcmcjpls) and RLE (dcmcrle), and by GDCM
    as JPEG 2000 lossless (gdcmconv --j2k), is accepted, decoded and
    segmented: one RTSTRUCT each, referencing its series. A lossy JPEG
    baseline series is refused at association, and the node says so."""
    uid, folder = next(iter(series.items()))
    coders = {"jpeg": [tool("dcmcjpeg"), "+e1"], "jls": [tool("dcmcjpls")], "rle": [tool("dcmcrle")],
              "j2k": [tool("gdcmconv"), "--j2k"], "lossy": [tool("dcmcjpeg"), "+eb"]}
    made = {}
    for kind, command in coders.items():
        series_uid = generate_uid()
        target = tmp_path / kind
        target.mkdir()
        for k, source in enumerate(sorted(folder.glob("*.dcm"))):
            plain = _variant(source, tmp_path / f"{kind}-plain" / source.name, SeriesInstanceUID=series_uid,
                             SOPInstanceUID=generate_uid())
            subprocess.run([*command, str(plain), str(target / source.name)], check=True, capture_output=True)
        made[kind] = series_uid
    assert "JPEG-LS" in subprocess.run([tool("dcmdump"), str(next((tmp_path / "jls").glob("*.dcm")))],
                                       capture_output=True, text=True).stdout
    assert "JPEG2000LosslessOnly" in subprocess.run([tool("dcmdump"), str(next((tmp_path / "j2k").glob("*.dcm")))],
                                                    capture_output=True, text=True).stdout
    dest_port = free_port()
    scp = start_storescp(tmp_path / "planning", dest_port)
    node = start_node(tmp_path / "spool", dest_port, "--format", "rtstruct")
    try:
        # Each as a PACS that stores it compressed proposes it: that transfer syntax only (-R: CT only).
        for kind, propose in (("jpeg", "-xs"), ("jls", "-xt"), ("rle", "-xr"), ("j2k", "-xv")):
            sent = storescu(node.port, tmp_path / kind, extra=(propose, "-R"))
            text = sent.communicate(timeout=120)[0]
            assert sent.returncode == 0 and "Failed" not in text, text[-2000:]
        # A sender that has the series only as lossy JPEG proposes just that (storescu always adds an
        # uncompressed fallback, so pynetdicom's AE plays that sender).
        from pynetdicom import AE

        sender = AE(ae_title="STORESCU")
        sender.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.4.50"])
        assoc = sender.associate("127.0.0.1", node.port, ae_title="FOCUSNET")
        assert not assoc.is_established, "the only context, lossy, is refused (the sender then aborts)"
        node.wait_line(r"refused at association from STORESCU: CT Image Storage in JPEG Baseline", timeout=30)
        # storescu's way: the lossy syntax and an uncompressed fallback; the fallback is taken, the lossy said.
        both = AE(ae_title="STORESCU")
        both.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.4.91"])  # JPEG 2000 (lossy)
        both.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
        assoc = both.associate("127.0.0.1", node.port, ae_title="FOCUSNET")
        assert assoc.is_established
        assoc.release()
        node.wait_line(r"refused at association from STORESCU: CT Image Storage in JPEG 2000 .*another syntax",
                       timeout=30)
        wait_for(lambda: len(received(tmp_path / "planning", RT_STRUCT)) == 4, 500, "four RTSTRUCTs")
    finally:
        node.stop()
        scp.stop()
    assert set(received(tmp_path / "planning", RT_STRUCT)) == {made["jpeg"], made["jls"], made["rle"], made["j2k"]}
    assert len(re.findall(r"refused at association", node.text())) == 2, "said once per lossy association"
    assert status(tmp_path / "spool")["failed"] == 0


def test_a_series_is_one_job_however_it_arrives(series, tmp_path):
    """Issue 45, faults 2 and 3: the first 20 slices, a pause longer than
    --settle (segmented and delivered), then the rest: the late instances
    join the same job, which is segmented again from the whole series and its
    result replaces the first one by the standard's rules (the same
    SeriesInstanceUID, a new SOPInstanceUID, "version 2"); the whole series
    sent once more, unchanged, is not segmented or sent again."""
    uid, folder = next(iter(series.items()))
    files = sorted(folder.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(str(p)).ImagePositionPatient[2]))
    for name, part in (("first", files[:20]), ("rest", files[20:])):
        (tmp_path / name).mkdir()
        for f in part:
            shutil.copy(f, tmp_path / name / f.name)
    dest_port = free_port()
    scp = start_storescp(tmp_path / "planning", dest_port)
    spool = tmp_path / "spool"
    node = start_node(spool, dest_port, "--format", "rtstruct")
    try:
        assert storescu(node.port, tmp_path / "first").wait(60) == 0
        node.wait_line(r"sent rtstruct", timeout=300)  # the pause: a result for the first part went out
        assert storescu(node.port, tmp_path / "rest").wait(60) == 0
        node.wait_line(r"segmented again as version 2", timeout=60)
        node.wait_line(r"sent rtstruct", timeout=300, count=2)
        assert storescu(node.port, folder).wait(60) == 0  # a re-send of the whole, unchanged series
        node.wait_line(r"arrived again unchanged", timeout=60)
        time.sleep(3.0)
    finally:
        node.stop()
        scp.stop()
    results = received(tmp_path / "planning", RT_STRUCT)
    assert list(results) == [uid] and len(results[uid]) == 2, "two versions, no third"
    first, second = sorted((pydicom.dcmread(str(p)) for p in results[uid]), key=lambda d: int(d.InstanceNumber))
    assert first.SeriesInstanceUID == second.SeriesInstanceUID and first.SOPInstanceUID != second.SOPInstanceUID
    assert int(second.InstanceNumber) == 2 and "version 2" in second.SeriesDescription
    referenced = second.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].ContourImageSequence
    assert len(referenced) == len(files), "version 2 is made from the whole series"
    assert len(first.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
               .RTReferencedSeriesSequence[0].ContourImageSequence) == 20
    state = status(spool)
    assert state["done"] == 1 and state["failed"] == 0 and state["queued"] == 0
    assert len(re.findall(r"segmented in", node.text())) == 2


def test_a_full_disk_loses_no_acknowledged_slice(series, tmp_path):
    """Issue 45, fault 1: the spool on a 1.5 MB tmpfs; a 48-slice series
    (2.5 MB) is sent: every slice answered Success is on disk, the others are
    refused with 0xA700, the node keeps running and does not make a job of
    the partial series. Space comes back (the tmpfs grows), the sender sends
    again: the series is segmented and delivered once."""
    uid, folder = next(iter(series.items()))
    count = len(list(folder.glob("*.dcm")))  # 48-49 slices of 52 kB
    mount = mount_tmpfs(tmp_path / "small", "size=1500k")
    dest_port = free_port()
    scp = start_storescp(tmp_path / "planning", dest_port)
    node = None
    try:
        node = start_node(mount / "spool", dest_port, "--format", "rtstruct", log_name="../node.log")
        first = storescu(node.port, folder, extra=("-v",))
        text = first.communicate(timeout=120)[0]
        stored = list((mount / "spool" / "incoming").rglob("*.dcm"))
        accepted = text.count("Received Store Response (Success)")
        refused = len(re.findall(r"Received Store Response \(.*(Out of Resources|A700|Refused)", text, re.I))
        assert 0 < accepted < count and accepted == len(stored), (accepted, len(stored), text[-1500:])
        for path in stored:
            assert pydicom.dcmread(str(path)).PixelData, path  # whole, readable
        assert refused == count - accepted, text[-1500:]
        time.sleep(4.0)  # past --settle: the partial series must not become a job
        assert node.proc.poll() is None, "the node keeps running"
        assert status(mount / "spool")["queued"] + status(mount / "spool")["done"] == 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        again = storescu(node.port, folder)
        assert again.wait(120) == 0
        wait_for(lambda: len(received(tmp_path / "planning", RT_STRUCT)) == 1, 300, "the RTSTRUCT")
        time.sleep(3.0)
    finally:
        if node is not None:
            node.stop()
        scp.stop()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    results = received(tmp_path / "planning", RT_STRUCT)
    assert {k: len(v) for k, v in results.items()} == {uid: 1}
    rois = pydicom.dcmread(str(results[uid][0])).ReferencedFrameOfReferenceSequence[0] \
        .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert len(rois) == count


def test_orthanc_sends_a_study_and_gets_exactly_one_rtstruct_and_seg(series, tmp_path):
    """Issue 45: a real PACS. Debian's Orthanc on a loopback port, with the
    node as a modality: a phantom series uploaded through its REST API,
    Orthanc sends the study to the node, exactly one RTSTRUCT and one SEG
    arrive in that study in Orthanc; Orthanc sending the study again (which
    now holds our results too) leaves it with still one of each."""
    import urllib.request

    orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    assert Path(orthanc).exists(), "Orthanc is missing: `make test` installs it (Debian package orthanc)"
    uid, folder = next(iter(series.items()))
    http_port, dicom_port = free_port(), free_port()
    node_spool = tmp_path / "spool"
    node = start_node(node_spool, dicom_port, "--allow", "ORTHANC")
    config = {"Name": "FocusNetTest", "StorageDirectory": str(tmp_path / "orthanc-db"),
              "IndexDirectory": str(tmp_path / "orthanc-db"), "HttpPort": http_port, "DicomPort": dicom_port,
              "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "HttpServerEnabled": True, "DicomServerEnabled": True, "Plugins": [],
              "DicomModalities": {"focusnet": ["FOCUSNET", "127.0.0.1", node.port]}}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    pacs = Process([orthanc, str(tmp_path / "orthanc.json")], tmp_path / "orthanc.log")
    base = f"http://127.0.0.1:{http_port}"

    def rest(path, data=None):
        request = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read() or b"null")

    def series_by_modality():
        out = {}
        for item in rest("/series?expand"):
            out.setdefault(item["MainDicomTags"].get("Modality"), []).append(item)
        return out

    try:
        wait_for(lambda: _listening(http_port) and _listening(dicom_port), 60, "Orthanc to listen")
        for path in sorted(folder.glob("*.dcm")):
            rest("/instances", path.read_bytes())
        study = rest("/studies")[0]
        rest("/modalities/focusnet/store", json.dumps({"Resources": [study], "Synchronous": True}).encode())
        wait_for(lambda: {"RTSTRUCT", "SEG"} <= set(series_by_modality()), 300, "the RTSTRUCT and SEG in Orthanc")
        found = series_by_modality()
        assert len(found["RTSTRUCT"]) == 1 and len(found["SEG"]) == 1
        assert found["RTSTRUCT"][0]["ParentStudy"] == study and found["SEG"][0]["ParentStudy"] == study
        assert len(found["RTSTRUCT"][0]["Instances"]) == 1 and len(found["SEG"][0]["Instances"]) == 1

        rest("/modalities/focusnet/store", json.dumps({"Resources": [study], "Synchronous": True}).encode())
        node.wait_line(r"arrived again unchanged", timeout=120)
        time.sleep(5.0)
        found = series_by_modality()
        assert len(found["RTSTRUCT"]) == 1 and len(found["SEG"]) == 1
        assert len(found["RTSTRUCT"][0]["Instances"]) == 1 and len(found["SEG"][0]["Instances"]) == 1
    finally:
        pacs.stop()
        node.stop()
    assert len(re.findall(r"segmented in", node.text())) == 1


def test_a_delivery_retry_does_not_hold_up_the_next_series(series, tmp_path):
    """Issue 45, fault 9: while one job retries delivery (the destination
    is down), the next series is received, completed and segmented; when
    the destination comes up both are delivered, once each."""
    (a, folder_a), (b, folder_b) = list(series.items())[:2]
    dest_port = free_port()
    spool = tmp_path / "spool"
    node = start_node(spool, dest_port, "--format", "rtstruct", "--retry-window", "300")
    scp = None
    try:
        assert storescu(node.port, folder_a).wait(120) == 0
        node.wait_line(r"retrying in", timeout=300)
        assert storescu(node.port, folder_b).wait(120) == 0
        node.wait_line(rf"segmented in [\d.]+ s: series {re.escape(b)}", timeout=300)
        assert "sent rtstruct" not in node.text(), "A is still waiting for its destination"
        scp = start_storescp(tmp_path / "planning", dest_port)
        node.wait_line(r"sent rtstruct", timeout=200, count=2)
    finally:
        node.stop()
        if scp is not None:
            scp.stop()
    assert {k: len(v) for k, v in received(tmp_path / "planning", RT_STRUCT).items()} == {a: 1, b: 1}
    assert status(spool)["done"] == 2


def test_a_warning_status_is_delivered_and_an_unaccepted_class_is_not_retried(series, tmp_path):
    """A planning system that stores RTSTRUCTs with a warning status (0xB000,
    coercion) and does not take Segmentation Storage at all: the RTSTRUCT is
    sent once (a warning is a stored instance), the SEG is not retried for
    the retry window but named in one log line, and the job is done."""
    from pynetdicom import AE, evt

    uid, folder = next(iter(series.items()))
    stored = []

    def on_store(event):
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0xB000

    planning = AE(ae_title="PLANNING")
    planning.add_supported_context(RT_STRUCT)
    dest_port = free_port()
    server = planning.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    spool = tmp_path / "spool"
    node = start_node(spool, dest_port, "--retry-window", "600")
    try:
        assert storescu(node.port, folder).wait(120) == 0
        node.wait_line(r"not sending dicomseg of series .* does not accept Segmentation Storage", timeout=300)
        wait_for(lambda: status(spool)["done"] == 1, 60, "the job done")
    finally:
        node.stop()
        server.shutdown()
    assert len(stored) == 1, "the RTSTRUCT stored with a warning is not sent again"
    assert "retrying" not in node.text()
    assert "stored rtstruct.dcm with warning status 0xb000" in node.text()
    job = json.loads(next((spool / "jobs" / "done").glob("*.json")).read_text())
    assert job["not_accepted"] == ["dicomseg"]


def test_retention_works_with_a_relative_spool_path(series, tmp_path, monkeypatch):
    """`--spool spool` (relative): retention deletes what it says it deletes."""
    from FocusNetCore.node import Spool

    monkeypatch.chdir(tmp_path)
    spool = Spool("spool")
    (tmp_path / "spool" / "series" / "j1").mkdir()
    (tmp_path / "spool" / "series" / "j1" / "a.dcm").write_bytes(b"x")
    (tmp_path / "spool" / "results" / "j1").mkdir()
    old = "2026-01-01T00:00:00+00:00"
    spool.save({"id": "j1", "series": "1.2", "folder": "series/j1", "done": old}, "done")
    assert spool.purge_finished(7) == ["j1"]
    assert not (tmp_path / "spool" / "series" / "j1").exists() and not (tmp_path / "spool" / "results" / "j1").exists()


def test_a_short_series_gets_no_organ_it_does_not_hold(series, tmp_path):
    """Issue 45 fault 8: five slices through the mandible sent to the node
    come back without the eyes, lenses and optic nerves (which are not in
    those slices); the node logs which organs it judged outside the scan."""
    uid, folder = next(iter(series.items()))
    files = sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(
        str(f), stop_before_pixels=True).ImagePositionPatient[2]))
    case = generate_case(810, "small")
    truth = sitk.GetArrayViewFromImage(case.labels)
    mandible = [PHANTOM_SET.label_of(n) for n in ("Bone_Mandible_L", "Bone_Mandible_R")]
    middle = int(np.nonzero(np.isin(truth, mandible).any(axis=(1, 2)))[0].mean())
    assert not np.isin(truth[middle - 2: middle + 3], [PHANTOM_SET.label_of(n) for n in ("Eye_L", "Eye_R")]).any()
    short_series = generate_uid()
    for k, f in enumerate(files[middle - 2: middle + 3]):
        _variant(f, tmp_path / "short" / f"{k}.dcm", SeriesInstanceUID=short_series, SOPInstanceUID=generate_uid())
    dest_port = free_port()
    scp = start_storescp(tmp_path / "planning", dest_port)
    node = start_node(tmp_path / "spool", dest_port, "--format", "rtstruct")
    try:
        assert storescu(node.port, tmp_path / "short").wait(60) == 0
        wait_for(lambda: len(received(tmp_path / "planning", RT_STRUCT)) == 1, 300, "the RTSTRUCT")
    finally:
        node.stop()
        scp.stop()
    (rtstruct,) = received(tmp_path / "planning", RT_STRUCT)[short_series]
    ds = pydicom.dcmread(str(rtstruct))
    roi_names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    names = {roi_names[c.ReferencedROINumber] for c in ds.ROIContourSequence if "ContourSequence" in c}
    assert not names & {"Eye_L", "Eye_R", "Lens_L", "Lens_R", "OpticNrv_L", "OpticNrv_R", "OpticChiasm"}, names
    assert "Bone_Mandible_L" in names or "Bone_Mandible_R" in names, names
    assert re.search(r"not in the scan .*: series .*Eye_L", node.text()), node.text()[-2000:]


def test_a_read_only_spool_is_refused_naming_it(tmp_path):
    """Issue 45, fault 13: a spool on a read-only file system (a tmpfs the
    test mounts read-only) is exit 2 with a message naming it, never a
    traceback; so is one inside it that does not exist yet."""
    mount = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        for spool in (mount, mount / "spool"):
            result = subprocess.run([sys.executable, "-m", "FocusNetCore", "node", "--spool", str(spool),
                                     "--destination", "P@127.0.0.1:104", "--port", "0"],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, result.stderr
            assert str(spool) in result.stderr and "Traceback" not in result.stderr, result.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=False)
