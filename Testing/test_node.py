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

import pydicom
import pytest
from pydicom.uid import generate_uid

from FocusNetCore.phantom import generate_case, write_case

RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test` installs it (Debian packages dcmtk, dicom3tools)"
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
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
