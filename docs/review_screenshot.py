"""The README's picture of the browser review station: a phantom CT segmented
by the embedded model, the organ list (flagged organs first), organ
surfaces in 3D, Parotid_L selected and the paint effect active.

    .venv/bin/python docs/review_screenshot.py [--out docs/images/review_station.png]

Starts `focusnet review` on a generated phantom (seed 2026, the demo's) on a
free loopback port, drives Debian's chromium with Playwright, and stops the
server afterwards. Output files go to a temporary folder.
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def served_url(server) -> str:
    """The URL `focusnet review` prints once it serves (its stdout a pipe)."""
    while True:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("focusnet review stopped before serving")
        match = re.search(r"open (http://\S+)", line)
        if match:
            return match.group(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "images" / "review_station.png"))
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from FocusNetCore.phantom import generate_case, write_case

    with tempfile.TemporaryDirectory() as tmp:
        write_case(generate_case(args.seed, "full", name="phantom"), tmp, "nrrd")
        server = subprocess.Popen([sys.executable, "-m", "FocusNetCore", "review", f"{tmp}/phantom_ct.nrrd", "--out",
                                   f"{tmp}/review", "--port", "0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            url = served_url(server)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1500, "height": 900})
                page.goto(url)
                page.locator(".fn-organ-row").nth(21).wait_for(timeout=180_000)
                time.sleep(3)  # let the views finish their first render
                page.locator("#fn-show3d").click()
                time.sleep(5)
                page.locator(".fn-organ-row", has_text="Parotid_L").locator(".fn-organ-name").click()
                time.sleep(2)
                page.locator("#fn-tools button:has(i.mdi-brush)").click()
                time.sleep(3)
                page.mouse.move(5, 5)  # no tooltip in the picture
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
