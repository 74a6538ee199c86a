"""What the length of the scan costs: `focusnet segment` on one phantom head
(512 x 512, full size) as acquired and with neck, then thorax, slices added
below it, each run in its own process (wall time and peak resident memory
of that process). The model sees the head-and-neck band only, so the cost
should barely grow with the scan.

    .venv/bin/python benchmarks/scan_length.py [--slices 120,480,1000] [--paper]

Default model: the embedded phantom-cpu bundle. ``--paper``: a bundle of
configs/paper.yaml's network (full width, 1 x 1 x 3 mm, 240 x 240) with
random weights, the configuration the 8 GB target of the 1,000-slice scan
is stated for. Prints a line per length and the ratios to the first.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from FocusNetCore.phantom import generate_case, with_body_below  # noqa: E402

NECK_MM = 180.0  # neck slices (the head's lowest, repeated) below the phantom, then thorax


def extended(image: sitk.Image, slices: int) -> sitk.Image:
    """The phantom as an LPS volume of ``slices`` slices: neck, then thorax, added below."""
    image = sitk.DICOMOrient(image, "LPS")
    extra = slices - image.GetSize()[2]
    if extra <= 0:  # the top of the head, cut to length
        return sitk.RegionOfInterest(image, (*image.GetSize()[:2], slices), (0, 0, -extra))
    return with_body_below(image, extra, neck_slices=int(NECK_MM / image.GetSpacing()[2]))


def paper_bundle(path: Path) -> Path:
    import torch

    from FocusNetCore.bundle import save_bundle
    from FocusNetCore.networks import FocusNetV2
    from FocusNetCore.train import load_config

    torch.manual_seed(0)
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "paper.yaml")
    return save_bundle(FocusNetV2(config.network), path, {"name": "paper configuration, random weights"})


def run(ct: Path, out: Path, model) -> dict:
    """`focusnet segment` in a child process: wall seconds and its peak RSS."""
    command = [sys.executable, "-m", "FocusNetCore", "segment", str(ct), "--out", str(out), "--device", "cpu"]
    if model:
        command += ["--model", str(model)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB
    report = json.loads(next(out.glob("*.json")).read_text())
    return {"wall_s": wall, "peak_gb": peak / 2 ** 20, "timings": report.get("timings_s", {})}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="120,480,1000")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--paper", action="store_true", help="paper configuration, random weights")
    args = parser.parse_args()
    lengths = [int(v) for v in args.slices.split(",")]
    case = generate_case(args.seed, "full")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = paper_bundle(tmp / "paper.pt") if args.paper else None
        # The OpenVINO conversion (once per model, then cached) before any timed run.
        subprocess.run([sys.executable, "-c", "import sys; from FocusNetCore.segment import Segmenter; "
                        "Segmenter(sys.argv[1] or None, device='cpu')", str(model or "")], check=True)
        results = []
        # Each length from a fresh interpreter (--one), whose only child is
        # that segment run: its children's peak RSS is that run's own.
        for n in lengths:
            ct = tmp / f"ct{n}.nrrd"
            sitk.WriteImage(extended(case.image, n), str(ct), True)
            probe = subprocess.run([sys.executable, __file__, "--one", str(ct), str(tmp / f"out{n}"),
                                    str(model or "")], capture_output=True, text=True)
            if probe.returncode:
                raise SystemExit(probe.stderr[-3000:])
            result = json.loads(probe.stdout.strip().splitlines()[-1])
            results.append((n, result))
            t = result["timings"]
            print(f"{n:5d} slices ({n * case.image.GetSpacing()[2] / 10:.0f} cm): {result['wall_s']:.1f} s wall, "
                  f"peak RSS {result['peak_gb']:.2f} GB (read {t.get('read', 0):.1f} s, preprocess "
                  f"{t.get('preprocess', 0):.1f} s, network {t.get('inference', 0):.1f} s, back to the scan "
                  f"{t.get('postprocess', 0):.1f} s)", flush=True)
        base = results[0][1]
        for n, result in results[1:]:
            print(f"{n} vs {results[0][0]} slices: time x{result['wall_s'] / base['wall_s']:.2f}, "
                  f"peak RSS x{result['peak_gb'] / base['peak_gb']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        ct, out, model = sys.argv[2], Path(sys.argv[3]), sys.argv[4] or None
        print(json.dumps(run(Path(ct), out, model)))
    else:
        main()
