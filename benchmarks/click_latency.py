"""Click to find's latency: ``focusnet worker`` (the real subprocess and
protocol) with the embedded model (or --model) on held-out phantoms; per
click, the worker's own time for ``refine`` and the round trip the front end
sees (request written -> answer read), clicks at each small organ's true
centre and 3 mm beside it. The peer measured in the same run is the whole
segmentation the worker ran at ``open`` (what re-running the model would
cost instead of a click). Target (issue 22): a refine answer in at most 1 s
on 2 CPU cores.

    .venv/bin/python benchmarks/click_latency.py [--n 2] [--first-seed 1000] [--model runs/x/model.pt] [--device cpu]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from FocusNetCore.metrics import dice
from FocusNetCore.organs import ORGAN_SETS, convert_labels
from FocusNetCore.phantom import PHANTOM_SET, generate_case, write_case


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2, help="held-out phantoms (seeds --first-seed...)")
    parser.add_argument("--first-seed", type=int, default=1000, help="default 1000: never used in training or choosing")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    organs = ORGAN_SETS["oar22"]
    command = [sys.executable, "-m", "FocusNetCore", "worker", "--device", args.device]
    if args.model:
        command += ["--model", args.model]
    worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(**request):
        start = time.perf_counter()
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
        answer = json.loads(worker.stdout.readline())
        return answer, time.perf_counter() - start

    work = Path(tempfile.mkdtemp(prefix="focusnet-click-"))
    rows, opens = [], []
    for k in range(args.n):
        case = generate_case(args.first_seed + k, "full")
        write_case(case, work, "nrrd")
        truth, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
        answer, seconds = ask(op="open", ct=str(work / f"{case.name}_ct.nrrd"))
        assert answer["ok"], answer
        opens.append(seconds)
        for name in organs.small_names:
            label = organs.label_of(name)
            centre = np.argwhere(truth == label).mean(axis=0)[::-1]
            lps = np.asarray(case.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre]))
            for offset in (np.zeros(3), np.array([3.0, 0.0, 0.0]), np.array([0.0, -3.0, 0.0])):
                answer, seconds = ask(op="refine", organ=name, point=(lps + offset).tolist(),
                                      out=str(work / "mask.nrrd"))
                assert answer["ok"], answer
                mask = sitk.ReadImage(answer["mask"])
                i0, j0, k0, i1, j1, k1 = answer["region"]
                full = np.zeros(truth.shape, bool)
                full[k0:k1, j0:j1, i0:i1] = sitk.GetArrayViewFromImage(mask) > 0
                rows.append({"case": case.name, "organ": name, "offset_mm": float(np.linalg.norm(offset)),
                             "head": answer.get("head", "pipeline"),
                             "worker_s": answer["seconds"], "round_trip_s": seconds,
                             "dice": dice(full, truth == label)})
        print(f"{case.name}: open {opens[-1]:.1f} s, {len(organs.small_names) * 3} clicks", flush=True)
    worker.stdin.close()
    worker.wait()

    worker_s = np.array([r["worker_s"] for r in rows])
    trip = np.array([r["round_trip_s"] for r in rows])
    print(f"\nrefine on {len(rows)} clicks: worker median {np.median(worker_s):.3f} s, max {worker_s.max():.3f} s; "
          f"round trip median {np.median(trip):.3f} s, max {trip.max():.3f} s (target <= 1 s)")
    print(f"peer: the whole segmentation at open, median {np.median(opens):.1f} s; "
          f"ratio click / segmentation {np.median(trip) / np.median(opens):.3f}")
    print(f"\n{'organ':<12} {'head':>8} {'Dice at centre':>15} {'lowest':>7} {'>= 0.7':>7} {'Dice 3 mm off':>14}")
    for name in organs.small_names:
        at = [r["dice"] for r in rows if r["organ"] == name and r["offset_mm"] == 0]
        off = [r["dice"] for r in rows if r["organ"] == name and r["offset_mm"] > 0]
        head = next(r["head"] for r in rows if r["organ"] == name)
        print(f"{name:<12} {head:>8} {np.mean(at):>15.3f} {min(at):>7.3f} {sum(d >= 0.7 for d in at):>3d}/{len(at):<3d} "
              f"{np.mean(off):>14.3f}")


if __name__ == "__main__":
    main()
