"""The README's picture of click to find in the browser review station: a
phantom (seed 2026, the demo's) whose contours lack the left lens, the lens
selected, "Click to place" on, one click on the lens in the axial view, and
the contour it brought back.

    .venv/bin/python docs/click_screenshot.py [--out docs/images/click_to_find.png]

Where to click: two clicks with a large organ selected (no placement) give
the axial view's pixel -> LPS mapping, as the server prints each click.
"""
import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from review_screenshot import served_url  # docs/review_screenshot.py, beside this script


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "images" / "click_to_find.png"))
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--organ", default="Lens_L")
    parser.add_argument("--near", default="Eye_L", help="a large organ at the same height (its row jumps the slices)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from FocusNetCore.organs import ORGAN_SETS, convert_labels
    from FocusNetCore.phantom import PHANTOM_SET, generate_case, write_case
    from FocusNetCore.segfile import write_seg_nrrd

    organs = ORGAN_SETS["oar22"]
    case = generate_case(args.seed, "full", name="phantom")
    truth, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
    label = organs.label_of(args.organ)
    with tempfile.TemporaryDirectory() as tmp:
        write_case(case, tmp, "nrrd")
        labels = sitk.GetImageFromArray(np.where(truth == label, 0, truth).astype(np.uint8))
        labels.CopyInformation(case.labels)
        seg = write_seg_nrrd(labels, organs, f"{tmp}/contours.seg.nrrd")
        server = subprocess.Popen([sys.executable, "-m", "FocusNetCore", "review", f"{tmp}/phantom_ct.nrrd", "--seg",
                                   str(seg), "--out", f"{tmp}/review", "--port", "0"], stdout=subprocess.PIPE,
                                  stderr=open("/tmp/click_screenshot.stderr", "w"), text=True)
        lines = []
        try:
            url = served_url(server)
            threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1500, "height": 900})
                page.goto(url)
                page.locator(".fn-organ-row").nth(21).wait_for(timeout=180_000)
                time.sleep(3)
                page.locator(".fn-organ-row", has_text=args.organ).locator(".fn-organ-name").click()
                page.locator("#fn-click-place").click()
                page.wait_for_function("document.querySelector('#fn-click-text') && document.querySelector("
                                       f"'#fn-click-text').innerText.includes('Click on {args.organ}')",
                                       timeout=300_000)  # the model ran once for click to find
                page.locator(".fn-organ-row", has_text=args.near).locator(".fn-organ-name").click()
                time.sleep(1)
                boxes = [page.locator("img").nth(i).bounding_box() for i in range(page.locator("img").count())]
                view = max((b for b in boxes if b), key=lambda b: b["width"] * b["height"])
                pixels = [(view["x"] + f * view["width"], view["y"] + f * view["height"]) for f in (0.35, 0.65)]
                seen = []
                for x, y in pixels:
                    before = len(lines)
                    page.mouse.click(x, y)
                    while not any(f"click to find {args.near} at LPS" in s for s in lines[before:]):
                        time.sleep(0.1)
                    found = next(s for s in lines[before:] if f"click to find {args.near} at LPS" in s)
                    seen.append([float(v) for v in re.search(r"LPS \((.*)\) mm", found).group(1).split(",")])
                centre = np.argwhere(truth == label).mean(axis=0)[::-1]
                lps = case.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre])
                (x0, y0), (x1, y1) = pixels
                (a0, b0, _), (a1, b1, _) = seen
                page.locator(".fn-organ-row", has_text=args.organ).locator(".fn-organ-name").click()
                time.sleep(1)
                page.mouse.click(x0 + (lps[0] - a0) * (x1 - x0) / (a1 - a0), y0 + (lps[1] - b0) * (y1 - y0) / (b1 - b0))
                try:
                    page.wait_for_function("document.querySelector('#fn-click-text').innerText.includes('placed')",
                                           timeout=60_000)
                except Exception:
                    raise SystemExit(f"no placement: {page.locator('#fn-click-text').inner_text()}; {lines[-3:]}")
                time.sleep(3)
                page.mouse.move(5, 5)
                page.evaluate("document.querySelector('.v-navigation-drawer__content').scrollTop = 0")
                time.sleep(1)
                page.screenshot(path=args.out)
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
