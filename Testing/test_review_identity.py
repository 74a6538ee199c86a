"""One patient's contours never reach another patient's CT (issue 44).

Two DICOM phantoms whose series folders are both named ``CT`` are reviewed
into one ``--out``; each case keeps its own contours through stop, restart
and resume (the last step in Chromium through Playwright, as a reviewer
would). Contours of another case are refused wherever they meet a CT:
``--seg``, an RTSTRUCT of another series, a swapped autosave, the Slicer
module's result, the DICOM node's outputs. The review's WebSocket refuses
other web sites and wslink's default secret, and a counted edit is on disk
before it is counted (a ``kill -9`` right after it loses nothing)."""
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from FocusNetCore.caseid import (CaseMismatchError, HEADER_KEY, check_references, identity_in_header,
                                 identity_of_dicom_series, identity_of_image, identity_of_input)
from FocusNetCore.organs import ORGAN_SETS
from FocusNetCore.phantom import generate_case, write_case
from FocusNetCore.study import read_records

from test_review_browser import finish_and_wait, open_case_page, start_review, stop, wait_for_line

ORGANS = ORGAN_SETS["oar22"]


def dicom_case(root: Path, seed: int) -> Path:
    """A phantom written as DICOM; its series moved to a folder named ``CT``
    (as a PACS export names every CT series folder)."""
    write_case(generate_case(seed, "small"), root / "raw", "dicom")
    series = next(p for p in (root / "raw").rglob("*") if p.is_dir() and any(p.glob("CT*.dcm")))
    target = root / "CT"
    shutil.move(str(series), str(target))
    return target


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory):
    root = tmp_path_factory.mktemp("patients")
    return dicom_case(root / "A", 101), dicom_case(root / "B", 202)


def station(ct, out, **kwargs):
    from FocusNetReview.app import ReviewOptions, ReviewStation

    st = ReviewStation(ReviewOptions(input=str(ct), out=str(out), port=0, **kwargs))
    asyncio.run(st._start_case())
    return st


def organ_volumes(labels: sitk.Image) -> np.ndarray:
    return np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(ORGANS.names) + 1)[1:]


def test_identity_is_what_the_ct_is_not_where_it_lies(two_patients, tmp_path):
    a, b = two_patients
    ia, ib = identity_of_input(a), identity_of_input(b)
    assert ia.uid != ib.uid and ia.series_uid and ia.frame_of_reference_uid
    assert ia.uid.startswith("dicom:") and ia == identity_of_dicom_series(a)
    copy = tmp_path / "elsewhere" / "another name"
    shutil.copytree(a, copy)
    assert identity_of_input(copy) == ia  # a copy of the series is the same case
    image = sitk.ReadImage(str(next(a.glob("CT*.dcm"))))  # one slice as a volume: voxels and geometry
    moved = sitk.Image(image)
    moved.SetOrigin([v + 1.0 for v in image.GetOrigin()])
    assert identity_of_image(image) == identity_of_image(sitk.Image(image))
    assert identity_of_image(image) != identity_of_image(moved)


def test_two_patients_with_one_folder_name_keep_their_own_contours(two_patients, tmp_path):
    """Fault 1: A reviewed, stopped; B reviewed, stopped; A resumed in a
    browser. A sees and exports A's contours; each file names its case."""
    from playwright.sync_api import sync_playwright

    a, b = two_patients
    out = tmp_path / "review"
    first = station(a, out)  # unfinished: its checkpoint stays, as when the server is stopped
    ai_a = sitk.ReadImage(str(first._ai_paths()[0]))
    report_a = json.loads(first._ai_paths()[1].read_text())
    first.case.close()
    second = station(b, out)
    ai_b = sitk.ReadImage(str(second._ai_paths()[0]))
    second.case.close()
    assert first._ai_paths()[0] != second._ai_paths()[0], "two cases share an output path"
    assert first.stem.startswith("CT-") and second.stem.startswith("CT-") and first.stem != second.stem
    assert not np.array_equal(organ_volumes(ai_a), organ_volumes(ai_b)), "the phantoms differ"
    assert identity_in_header(first._ai_paths()[0]) == identity_of_input(a).uid
    assert report_a["case"]["series_uid"] == identity_of_input(a).series_uid

    proc, url = start_review(a, out)
    try:
        wait_for_line(proc, r"ready: http://")
        assert any("resuming" in line for line in proc.lines), proc.lines
        with sync_playwright() as p:
            browser, page = open_case_page(p, url)
            shown = {}
            for row in page.locator(".fn-organ-row").all():
                name = row.locator(".fn-organ-name").inner_text().strip()
                volume = row.locator(".fn-volume").inner_text().strip()
                shown[name] = float(volume.split()[0]) if volume else 0.0
            expected = {o["name"]: float(o["volume_cc"]) for o in report_a["organs"]}
            assert shown == pytest.approx(expected, abs=0.051), "patient A's page shows other contours"
            page.locator("#fn-accept-all").click()
            finish_and_wait(page)
            browser.close()
    finally:
        stop(proc)
    rtstruct = out / f"{first.stem}.rtstruct.dcm"
    assert rtstruct.exists() and not (out / "CT.rtstruct.dcm").exists()
    # The reviewed .seg.nrrd (Slicer's writer) carries its case too: it is refused on B's CT wherever it goes.
    reviewed = shutil.copy(out / f"{first.stem}.seg.nrrd", tmp_path / "moved.seg.nrrd")
    assert identity_in_header(reviewed) == identity_of_input(a).uid
    refused = station(b, tmp_path / "other", seg=str(reviewed))
    assert refused.case is None and "another case" in refused.state.fn_error, refused.state.fn_error
    ds = pydicom.dcmread(rtstruct)
    ct = pydicom.dcmread(next(a.glob("CT*.dcm")))
    assert ds.PatientID == ct.PatientID
    check_references(identity_of_input(a), rtstruct)  # A's series, A's frame
    seg = pydicom.dcmread(out / f"{first.stem}.seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    from FocusNetCore.rtstruct import read_rtstruct

    image = sitk.ReadImage(str(first._ai_paths()[0]))
    back, _, _ = read_rtstruct(rtstruct, image, a, ORGANS)
    truth_a = sitk.GetArrayViewFromImage(ai_a)
    for name in ("Brainstem", "Parotid_L", "SpinalCord"):
        value = ORGANS.label_of(name)
        inter = np.logical_and(back == value, truth_a == value).sum()
        assert 2 * inter / ((back == value).sum() + (truth_a == value).sum()) > 0.9, name


def test_contours_of_another_case_are_refused(two_patients, tmp_path):
    """--seg of B's segmentation, B's RTSTRUCT, and a resume whose AI file was
    swapped for B's are refused for A's CT, each message naming the file."""
    a, b = two_patients
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "FocusNetCore", "segment", str(b), "--out", str(out / "seg"),
                             "--format", "seg.nrrd,rtstruct", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    seg_b, rt_b = out / "seg" / "CT.seg.nrrd", out / "seg" / "CT.rtstruct.dcm"
    assert identity_in_header(seg_b) == identity_of_input(b).uid
    assert json.loads((out / "seg" / "CT.report.json").read_text())["case"]["uid"] == identity_of_input(b).uid

    for wrong in (seg_b, rt_b):
        st = station(a, out / "review", seg=str(wrong))
        assert st.case is None and not st.state.fn_ready
        assert str(wrong) in st.state.fn_error and "refusing" in st.state.fn_error, st.state.fn_error
    # B's own contours are taken for B (the identity check does not refuse the right case).
    for right in (seg_b, rt_b):
        st = station(b, out / ("review-b-" + right.suffix.strip(".")), seg=str(right))
        assert st.state.fn_ready, st.state.fn_error
        assert organ_volumes(st.case.final_labels()).sum() > 0
        st.case.close()

    # Contours without an identity (another tool's file) drawn on another grid are refused too.
    stripped = out / "stripped.seg.nrrd"
    raw = seg_b.read_bytes()
    stripped.write_bytes(re.sub(rb"FocusNet_CaseUID:=[^\n]*\n", b"", raw, count=1))
    assert identity_in_header(stripped) is None
    st = station(a, out / "review-stripped", seg=str(stripped))
    assert st.case is None and "not on this CT's grid" in st.state.fn_error, st.state.fn_error

    # A resume whose AI contours were swapped on disk (a copied folder, a script) is refused too.
    first = station(a, out / "swap")
    first.case.close()
    other = station(b, out / "swap")
    other.case.close()
    shutil.copyfile(other._ai_paths()[0], first._ai_paths()[0])
    again = station(a, out / "swap")
    assert again.case is None and "another case" in again.state.fn_error, again.state.fn_error


def test_an_autosave_of_another_case_is_not_resumed(tmp_path):
    """ReviewCase (both front ends): the autosave carries its case; a
    checkpoint whose autosave belongs to another CT is refused on resume."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FocusNetSegment"))
    from FocusNetSegmentLib import scene as bridge
    from FocusNetSegmentLib.case import ReviewCase

    case = generate_case(703, "small")
    labels = sitk.Image(case.image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(case.image)

    def open_case(uid):
        scene = bridge.new_scene()
        ct = bridge.volume_node_from_image(scene, case.image, "CT")
        return ReviewCase.open(scene, ct, labels, folder=tmp_path, log_path=tmp_path / "log.jsonl", case_uid=uid)

    first = open_case("dicom:aaaa")
    path = first.autosave()
    assert identity_in_header(path) == "dicom:aaaa"
    first.close()
    swapped = tmp_path / ReviewCase.paths(tmp_path, open_case("dicom:bbbb").session.case_id)[1].name
    shutil.copyfile(path, swapped)  # B's checkpoint now points at A's autosave
    with pytest.raises(CaseMismatchError, match="another case"):
        open_case("dicom:bbbb")


def test_the_node_sends_only_outputs_that_reference_the_series(two_patients, tmp_path):
    """The DICOM node checks each output against the job's series before it
    is sent: another series' RTSTRUCT is refused."""
    from FocusNetCore.rtstruct import write_rtstruct

    a, b = two_patients
    from FocusNetCore.imageio import read_dicom_series

    image_b = read_dicom_series(b)
    labels = sitk.Image(image_b.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image_b)
    labels[10, 10, 5] = 1
    path = write_rtstruct(labels, b, ORGANS, tmp_path / "b.dcm")
    check_references(identity_of_input(b), path)
    with pytest.raises(CaseMismatchError, match="not only this CT"):
        check_references(identity_of_input(a), path)


def websocket_handshake(port: int, origin: str, secret: str):
    """Open the review's WebSocket as a script would, say wslink's hello with
    ``secret``; returns ('refused', status) or ('hello', reply text)."""
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws", headers={"Origin": origin})
            except aiohttp.WSServerHandshakeError as error:
                return "refused", error.status
            from wslink.chunking import generate_chunks
            import msgpack

            hello = {"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello", "args": [{"secret": secret}],
                     "kwargs": {}}
            for chunk in generate_chunks(msgpack.packb(hello), 1_000_000):
                await ws.send_bytes(chunk)
            reply = await ws.receive(timeout=20)
            await asyncio.sleep(3.0)  # held open: a page that is not one must start no clock
            await ws.close()
            return "hello", bytes(reply.data)

    return asyncio.run(go())


def test_other_web_sites_and_the_default_secret_cannot_drive_a_review(tmp_path):
    """Fault 3: a foreign Origin is refused at the handshake; the page's own
    origin with wslink's default secret is not authenticated; neither starts
    the review's clock. The real page (which gets this run's secret by the
    redirect) still works."""
    from playwright.sync_api import sync_playwright

    write_case(generate_case(404, "small"), tmp_path / "ct", "nrrd")
    ct = tmp_path / "ct" / "phantom_0404_ct.nrrd"
    out = tmp_path / "review"
    proc, url = start_review(ct, out)
    try:
        wait_for_line(proc, r"ready: http://")
        port = int(re.search(r":(\d+)/", url).group(1))
        kind, status = websocket_handshake(port, "http://evil.example", "wslink-secret")
        assert (kind, status) == ("refused", 403)
        kind, reply = websocket_handshake(port, f"http://127.0.0.1:{port}", "wslink-secret")
        assert kind == "hello" and b"Authentication failed" in reply, reply
        checkpoint = json.loads(next((out / "sessions").glob("*.review.json")).read_text())
        assert checkpoint["started"] is None and checkpoint["elapsed_s"] == 0, checkpoint
        import urllib.request

        request = urllib.request.Request(url, headers={"Host": f"rebound.example:{port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403  # DNS rebinding: another name for 127.0.0.1
        with sync_playwright() as p:
            browser, page = open_case_page(p, url)
            page.reload()  # the address bar lost the secret; the reload gets it again
            page.locator(".fn-organ-row").nth(21).wait_for(timeout=60_000)
            browser.close()
        checkpoint = json.loads(next((out / "sessions").glob("*.review.json")).read_text())
        assert checkpoint["started"] is not None  # the real page started the clock
    finally:
        stop(proc)
    assert any("refused a WebSocket from origin http://evil.example" in line for line in proc.lines)


def test_a_counted_edit_survives_kill_9(tmp_path):
    """Fault 5: paint a stroke in the browser and kill -9 the server as soon
    as the page says "edited": the autosave on disk holds the stroke the
    checkpoint counted; the resumed review exports it."""
    from playwright.sync_api import sync_playwright

    from test_review_browser import paint_stroke, read_seg_nrrd_as_labels

    write_case(generate_case(405, "small"), tmp_path / "ct", "nrrd")
    ct = tmp_path / "ct" / "phantom_0405_ct.nrrd"
    out = tmp_path / "review"
    proc, url = start_review(ct, out)
    try:
        wait_for_line(proc, r"ready: http://")
        with sync_playwright() as p:
            browser, page = open_case_page(p, url)
            paint_stroke(page, "Parotid_L")
            os.kill(proc.pid, signal.SIGKILL)  # the moment the page says "edited"
            proc.wait(10)
            browser.close()
    finally:
        stop(proc)
    checkpoint_path = next((out / "sessions").glob("*.review.json"))
    counted = json.loads(checkpoint_path.read_text())["organs"]["Parotid_L"]["edits"]
    assert counted >= 1
    working = checkpoint_path.with_name(checkpoint_path.name.replace(".review.json", ".working.nrrd"))
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(working)))
    ai = sitk.GetArrayFromImage(sitk.ReadImage(str(next(out.glob("*.ai.nrrd")))))
    value = ORGANS.label_of("Parotid_L")
    assert ((saved == value) & (ai != value)).sum() > 0, "the counted stroke is not on disk"

    from FocusNetReview.app import ReviewOptions, ReviewStation  # the review resumed, then finished

    resumed = station(ct, out)
    assert resumed.case.session.states["Parotid_L"].edits == counted
    resumed.finish()
    assert resumed.state.fn_finished, resumed.state.fn_error
    final = read_seg_nrrd_as_labels(out / f"{resumed.stem}.seg.nrrd", ct)
    assert np.array_equal(final == value, saved == value), "exported is not what was counted"
    records, _ = read_records(out / "review-log.jsonl")
    assert records[-1]["organs"]["Parotid_L"]["edits"] == counted


def test_seg_contours_never_mix_with_an_unfinished_review(two_patients, tmp_path):
    """An unfinished review of A (Eye_L accepted on the model's contours),
    then ``--seg`` with other contours of A into the same --out: the
    unfinished review is recorded as incomplete and the new one starts anew
    (nothing accepted); the same --seg again resumes it. A far click-to-find
    answer waiting for Replace/Discard is dropped when another organ is
    selected."""
    from FocusNetCore.caseid import stamp
    from FocusNetCore.segfile import write_seg_nrrd

    a, _ = two_patients
    out = tmp_path / "out"
    first = station(a, out)
    first.accept("Eye_L")
    first.case.close()
    ai = sitk.ReadImage(str(first._ai_paths()[0]))
    array = sitk.GetArrayFromImage(ai)
    array[array == ORGANS.label_of("Eye_L")] = 0  # other contours of the same CT
    other = sitk.GetImageFromArray(array)
    other.CopyInformation(ai)
    seg = write_seg_nrrd(stamp(other, identity_of_input(a)), ORGANS, tmp_path / "other.seg.nrrd")
    second = station(a, out, seg=str(seg))
    assert second.state.fn_ready, second.state.fn_error
    assert "recorded as incomplete" in second.state.fn_warning
    assert second.case.session.states["Eye_L"].status == "unreviewed"
    records, _ = read_records(out / "review-log.jsonl")
    assert [r["status"] for r in records] == ["incomplete"]
    assert records[0]["organs"]["Eye_L"]["status"] == "accepted"
    second.accept("Brainstem")
    second._pending_place = ("Lens_L", None)
    second.state.fn_place_pending = True
    second.select_organ("Lens_R")
    assert second._pending_place is None and not second.state.fn_place_pending
    second.case.close()
    third = station(a, out, seg=str(seg))
    assert "Resuming" in third.state.fn_warning
    assert third.case.session.states["Brainstem"].status == "accepted"
    assert len(read_records(out / "review-log.jsonl")[0]) == 1
    third.case.close()


def test_the_page_comes_back_by_itself_after_a_server_restart(tmp_path):
    """Fault 9: the server is killed and started again on the same port;
    the open page reloads itself once the server answers and shows the
    resumed review (its accept kept), without the reviewer reloading."""
    from playwright.sync_api import sync_playwright

    from test_node import free_port

    write_case(generate_case(406, "small"), tmp_path / "ct", "nrrd")
    ct = tmp_path / "ct" / "phantom_0406_ct.nrrd"
    out, port = tmp_path / "review", free_port()
    proc, url = start_review(ct, out, "--port", str(port))
    second = None
    try:
        wait_for_line(proc, r"ready: http://")
        with sync_playwright() as p:
            browser, page = open_case_page(p, url)
            row = page.locator(".fn-organ-row", has_text="Brainstem")
            row.locator(".fn-accept").click()
            page.wait_for_function("s => s.innerText.trim() === 'accepted'",
                                   arg=row.locator(".fn-status").element_handle(), timeout=20_000)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            page.wait_for_function("document.body.innerText.includes('Connection')", timeout=30_000)
            second, _ = start_review(ct, out, "--port", str(port))
            wait_for_line(second, r"ready: http://")
            page.locator(".fn-organ-row").nth(21).wait_for(timeout=60_000)  # no reload by hand
            status = page.locator(".fn-organ-row", has_text="Brainstem").locator(".fn-status")
            assert status.inner_text().strip() == "accepted"
            browser.close()
    finally:
        stop(proc)
        if second is not None:
            stop(second)
