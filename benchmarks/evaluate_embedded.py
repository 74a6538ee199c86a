"""The embedded model (or --model) on held-out phantoms (seeds never used in
training: 1000 + k), per organ, and the small organs with and without the
small-organ branch (table 6 in miniature: "S-Net" vs "FocusNetv2").

    .venv/bin/python benchmarks/evaluate_embedded.py [--n 10] [--model runs/x/model.pt] [--out docs/phantom-cpu-evaluation.md]
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np

from FocusNetCore.evaluate import evaluate, summary
from FocusNetCore.phantom import generate_case, write_case
from FocusNetCore.segfile import write_seg_nrrd
from FocusNetCore.segment import Segmenter


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="docs/phantom-cpu-evaluation.md")
    args = parser.parse_args()
    segmenter = Segmenter(args.model, device="cpu")
    organs = segmenter.config.organs
    work = Path(tempfile.mkdtemp(prefix="focusnet-eval-"))
    seconds = []
    for k in range(args.n):
        case = generate_case(args.first_seed + k, "full")
        write_case(case, work / "gt", "nrrd")
        for branch, folder in ((True, "focusnetv2"), (False, "snet")):
            result = segmenter.segment(case.image, small_organ_branch=branch)
            write_seg_nrrd(result.labels, organs, work / folder / f"{case.name}.seg.nrrd")
            if branch:
                seconds.append(result.timings["total"])
        print(f"{case.name}: {seconds[-1]:.1f} s", flush=True)
    rows, _ = evaluate(work / "focusnetv2", work / "gt", organs.key, work / "focusnetv2")
    rows_snet, _ = evaluate(work / "snet", work / "gt", organs.key, work / "snet")
    full, snet = summary(rows, organs), summary(rows_snet, organs)
    table = (work / "focusnetv2" / "evaluation.md").read_text()
    lines = [f"# {segmenter.model_info['name']} on {args.n} held-out phantoms", "",
             f"Model: `{segmenter.bundle_path.name}` (checksum {segmenter.model_info['checksum'][:12]}...), "
             f"{segmenter.model_info['intended_use']}", "",
             f"Command: `.venv/bin/python benchmarks/evaluate_embedded.py --n {args.n}` (phantom seeds "
             f"{args.first_seed}-{args.first_seed + args.n - 1}, full 512 x 512 size; segmentation "
             f"{np.median(seconds):.1f} s median per case on this machine's CPU).", "",
             "## Small organs: S-Net alone vs FocusNetv2 (mean Dice)", "",
             "| organ | S-Net alone | FocusNetv2 |", "|---|---|---|"]
    for name in organs.small_names:
        a = snet["organs"].get(name, {}).get("dice", float("nan"))
        b = full["organs"].get(name, {}).get("dice", float("nan"))
        lines.append(f"| {name} | {a:.3f} | {b:.3f} |")
    lines += [f"| mean | {snet['mean_dice_small']:.3f} | {full['mean_dice_small']:.3f} |", "",
              "FocusNetv1 (SOS-Net without the shape autoencoder) needs its own training run "
              "(`adversarial: false`); it was not run for this table.", "", "## All organs (FocusNetv2)", "",
              table.split("\n", 2)[2]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"mean Dice {full['mean_dice']:.3f} (22 OARs), small organs {full['mean_dice_small']:.3f}; "
          f"S-Net alone small organs {snet['mean_dice_small']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
