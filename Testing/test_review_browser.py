"""`focusnet review` end to end: a real server, Debian's Chromium driven by
Playwright (no browser download), a reviewer's clicks, the files on disk."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FocusNetCore.organs import ORGAN_SETS
from FocusNetCore.phantom import generate_case, write_case
from FocusNetCore.study import read_records

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ORGANS = ORGAN_SETS["oar22"]


def start_review(ct, out, *extra):
    """Start `focusnet review`; returns (process, URL) once it prints its URL."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "FocusNetCore", "review", str(ct), "--out", str(out), "--port", "0",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"focusnet review exited with {proc.returncode} before serving")
        match = re.search(r"open (http://\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise AssertionError("focusnet review printed no URL within 120 s")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def read_seg_nrrd_as_labels(path, ct_path):
    """The exported .seg.nrrd as a label image on the CT's grid, read back by Slicer's own reader."""
    from FocusNetSegmentLib import scene as bridge

    scene = bridge.new_scene()
    ct = bridge.volume_node_from_image(scene, sitk.ReadImage(str(ct_path)), "CT")
    node = bridge.load_segmentation(scene, str(path))
    return sitk.GetArrayFromImage(bridge.export_labels(scene, node, ct, ORGANS))


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("review-case")
    write_case(generate_case(400, "small"), folder, "nrrd")
    return folder / "phantom_0400_ct.nrrd"


def test_browser_review_paint_accept_finish_export(phantom_ct, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (make test installs it)"
    out = tmp_path / "review"
    proc, url = start_review(phantom_ct, out)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(url)
            # The model runs inside the app; the 22 OARs appear when it is done.
            page.locator(".fn-organ-row").nth(21).wait_for(timeout=120_000)
            names = page.locator(".fn-organ-name").all_inner_texts()
            assert sorted(names) == sorted(ORGANS.names)

            # Select Parotid_L in the review panel (the slices jump to it), paint a stroke
            # down the left edge of the axial view, in the air beside the head.
            page.locator(".fn-organ-row", has_text="Parotid_L").locator(".fn-organ-name").click()
            page.locator("button:has(i.mdi-brush)").last.click()  # the toolbar's paint button
            time.sleep(1.0)
            views = [page.locator("img").nth(i).bounding_box() for i in range(page.locator("img").count())]
            axial = max((b for b in views if b), key=lambda b: b["width"] * b["height"])
            x = axial["x"] + 0.06 * axial["width"]
            page.mouse.move(x, axial["y"] + 0.40 * axial["height"])
            page.mouse.down()
            for k in range(1, 21):
                page.mouse.move(x, axial["y"] + (0.40 + 0.01 * k) * axial["height"])
                time.sleep(0.05)
            page.mouse.up()
            parotid = page.locator(".fn-organ-row", has_text="Parotid_L").locator(".fn-status")
            page.wait_for_function("s => s.innerText.trim() === 'edited'", arg=parotid.element_handle(),
                                   timeout=20_000)

            # Closing the page keeps the session: a new page shows the same review.
            page.close()
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(url)
            page.locator(".fn-organ-row").nth(21).wait_for(timeout=60_000)
            assert page.locator(".fn-organ-row", has_text="Parotid_L").locator(".fn-status").inner_text() == "edited"

            brainstem = page.locator(".fn-organ-row", has_text="Brainstem")
            brainstem.locator(".fn-accept").click()
            page.wait_for_function("s => s.innerText.trim() === 'accepted'",
                                   arg=brainstem.locator(".fn-status").element_handle(), timeout=10_000)
            page.locator("#fn-finish").click()
            page.wait_for_function("document.querySelector('#fn-message').innerText.includes('Exported')",
                                   timeout=60_000)
            browser.close()
    finally:
        stop(proc)

    exported = out / "phantom_0400_ct.seg.nrrd"
    final = read_seg_nrrd_as_labels(exported, phantom_ct)
    ai = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantom_0400_ct.ai.nrrd")))
    changed = final != ai
    parotid_label = ORGANS.label_of("Parotid_L")
    assert changed.sum() > 50, "the stroke left no trace in the export"
    # Only the painted segment differs, and only where the AI had background.
    assert set(np.unique(final[changed])) == {parotid_label}
    assert set(np.unique(ai[changed])) == {0}
    # Near the stroke: a few slices thick (the brush), long in the stroke's direction.
    z, y, x = np.nonzero(changed)
    assert z.max() - z.min() <= 8
    assert (y.max() - y.min()) > 2 * (x.max() - x.min())

    records, problems = read_records(out / "review-log.jsonl")
    assert len(records) == 1 and not problems
    record = records[0]
    assert record["mode"] == "ai" and record["status"] == "finished" and record["client"] == "browser"
    assert record["organs"]["Parotid_L"]["status"] == "edited" and record["organs"]["Parotid_L"]["edits"] >= 1
    assert record["organs"]["Brainstem"]["status"] == "accepted"
    assert record["active_s"] > 0 and record["wall_s"] >= record["active_s"]
    assert record["metrics"]["Parotid_L"]["edited"] and not record["metrics"]["Eye_L"]["edited"]
    assert not list((out / "sessions").glob("*.review.json")), "a finished session leaves no checkpoint"


def test_review_refuses_bad_input_with_the_file_name(tmp_path):
    bad = tmp_path / "not_a_ct.nrrd"
    bad.write_text("hello")
    result = subprocess.run([sys.executable, "-m", "FocusNetCore", "review", str(bad), "--out", str(tmp_path / "o"),
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "not_a_ct.nrrd" in result.stderr


def test_token_is_required_off_loopback():
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from FocusNetReview.access import COOKIE, is_loopback, token_middleware

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")

    async def scenario():
        async def page(request):
            return web.Response(text="page")

        app = web.Application(middlewares=[token_middleware("s3cret")])
        app.router.add_get("/index.html", page)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            assert (await client.get("/index.html")).status == 403
            assert (await client.get("/index.html?token=wrong")).status == 403
            ok = await client.get("/index.html?token=s3cret")
            assert ok.status == 200 and COOKIE in ok.cookies
            # the page's later requests carry the cookie instead of the URL token
            assert (await client.get("/index.html")).status == 200

    asyncio.run(scenario())


def test_dicom_input_exports_seg_nrrd_rtstruct_and_dicom_seg(tmp_path):
    """The station's own logic without a browser: a DICOM series in, the AI
    contours reviewed as they are, "Finish & export" writes both files and a
    second station on the same case never replaces them."""
    import asyncio

    import pydicom

    from FocusNetReview.app import ReviewOptions, ReviewStation

    write_case(generate_case(401, "small"), tmp_path / "dicom", "dicom")
    series = next(p for p in (tmp_path / "dicom").rglob("*") if p.is_dir() and any(p.glob("CT*.dcm")))
    for attempt in (1, 2):
        station = ReviewStation(ReviewOptions(input=str(series), out=str(tmp_path / "out"), port=0))
        asyncio.run(station._start_case())
        assert station.state.fn_ready and len(station.state.fn_rows) == 22
        station.accept_all()
        station.finish()
        assert station.state.fn_finished, station.state.fn_error
    stem = series.name
    assert (tmp_path / "out" / f"{stem}.seg.nrrd").exists() and (tmp_path / "out" / f"{stem} (2).seg.nrrd").exists()
    rtstruct = pydicom.dcmread(tmp_path / "out" / f"{stem}.rtstruct.dcm")
    assert rtstruct.Modality == "RTSTRUCT"
    seg = pydicom.dcmread(tmp_path / "out" / f"{stem}.seg.dcm")  # DICOM SEG through FocusNetCore's writer
    assert seg.Modality == "SEG" and (tmp_path / "out" / f"{stem} (2).seg.dcm").exists()
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}  # accepted as they were
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == rtstruct.ReferencedFrameOfReferenceSequence[0] \
        .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    records, _ = read_records(tmp_path / "out" / "review-log.jsonl")
    assert len(records) == 2 and all(r["mode"] == "ai" for r in records)
