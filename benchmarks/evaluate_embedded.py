"""The embedded model (or --model) on held-out phantoms (seeds never used in
training: 1000 + k), per organ, and the paper's table 6 in miniature on the
small organs: "S-Net" (the model without its small-organ branch) vs
"FocusNetv1" (--v1: a bundle trained with ``adversarial: false``, branched
from the same run after its S-Net and SOL-Net stages) vs "FocusNetv2" (the
branch for every small organ) and, for a bundle whose ``snet_small`` leaves
some small organs to S-Net, the bundle as shipped.

    .venv/bin/python benchmarks/evaluate_embedded.py [--n 10] [--model runs/x/model.pt] [--v1 runs/v1/model.pt] \
        [--out docs/phantom-cpu-evaluation.md]
"""
import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from FocusNetCore.evaluate import evaluate, summary
from FocusNetCore.phantom import generate_case, write_case
from FocusNetCore.segfile import write_seg_nrrd
from FocusNetCore.segment import Segmenter
from localisation import localise  # benchmarks/localisation.py, beside this script


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--model", default=None)
    parser.add_argument("--v1", default=None, help="FocusNetv1 bundle for the ablation column")
    parser.add_argument("--out", default="docs/phantom-cpu-evaluation.md")
    parser.add_argument("--below-threshold", choices=("absent", "snet"), default=None,
                        help="override the bundle's rule for a small organ SOL-Net does not find")
    args = parser.parse_args()
    segmenter = Segmenter(args.model, device="cpu")
    if args.below_threshold:
        segmenter.model.config = dataclasses.replace(segmenter.model.config, below_threshold=args.below_threshold)
    v1 = Segmenter(args.v1, device="cpu") if args.v1 else None
    snet_small = segmenter.config.snet_small
    organs = segmenter.config.organs
    work = Path(tempfile.mkdtemp(prefix="focusnet-eval-"))
    seconds, located = [], []
    for k in range(args.n):
        case = generate_case(args.first_seed + k, "full")
        write_case(case, work / "gt", "nrrd")
        located.append(localise(segmenter, case.image, case.labels))
        for branch, folder in ((True, "focusnetv2"), (False, "snet")):
            result = segmenter.segment(case.image, small_organ_branch=branch)
            write_seg_nrrd(result.labels, organs, work / folder / f"{case.name}.seg.nrrd")
            if branch:
                seconds.append(result.timings["total"])
        if v1 is not None:  # as the paper's FocusNetv1: its branch draws every small organ
            with v1.model.branch_for_every_small_organ():
                result = v1.segment(case.image)
            write_seg_nrrd(result.labels, organs, work / "focusnetv1" / f"{case.name}.seg.nrrd")
        if snet_small:  # the paper's FocusNetv2 as well: the branch draws every small organ
            with segmenter.model.branch_for_every_small_organ():
                result = segmenter.segment(case.image)
            write_seg_nrrd(result.labels, organs, work / "branch" / f"{case.name}.seg.nrrd")
        print(f"{case.name}: {seconds[-1]:.1f} s", flush=True)
    rows, _ = evaluate(work / "focusnetv2", work / "gt", organs.key, work / "focusnetv2")
    rows_snet, _ = evaluate(work / "snet", work / "gt", organs.key, work / "snet")
    full, snet = summary(rows, organs), summary(rows_snet, organs)
    v1_summary = summary(evaluate(work / "focusnetv1", work / "gt", organs.key, work / "focusnetv1")[0], organs) \
        if v1 is not None else None
    branch = summary(evaluate(work / "branch", work / "gt", organs.key, work / "branch")[0], organs) \
        if snet_small else None
    table = (work / "focusnetv2" / "evaluation.md").read_text()
    lines = [f"# {segmenter.model_info['name']} on {args.n} held-out phantoms", "",
             f"Model: `{segmenter.bundle_path.name}` (checksum {segmenter.model_info['checksum'][:12]}...), "
             f"{segmenter.model_info['intended_use']}", "",
             f"Command: `.venv/bin/python benchmarks/evaluate_embedded.py --n {args.n}` (phantom seeds "
             f"{args.first_seed}-{args.first_seed + args.n - 1}, full 512 x 512 size; segmentation "
             f"{np.median(seconds):.1f} s median per case on this machine's CPU"
             + (f"; FocusNetv1: `{Path(args.v1).name}`, `--v1 {args.v1}`" if v1 else "") + ").", "",
             "## Small organs: table 6 in miniature (mean Dice)", ""]
    columns = [("S-Net alone", snet)] + ([("FocusNetv1", v1_summary)] if v1 else [])
    uncovered = [name for name in snet_small if name not in segmenter.fine_heads]
    columns += [("FocusNetv2", branch), ("shipped (S-Net alone for " + ", ".join(uncovered) + ")"
                 if uncovered else "shipped", full)] if snet_small else [("FocusNetv2", full)]
    lines += ["| organ | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in organs.small_names:
        values = [s_["organs"].get(name, {}).get("dice", float("nan")) for _, s_ in columns]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["| mean | " + " | ".join(f"{s_['mean_dice_small']:.3f}" for _, s_ in columns) + " |", ""]
    lines += ["## Small organs: SOL-Net's localisation and SOS-Net at the true centre", "",
              "Per small organ over the cases (`benchmarks/localisation.py`): how often SOL-Net's heat-map peak "
              "clears the presence threshold, the median distance from the peak to the organ's centre, and the "
              "Dice SOS-Net reaches with its ROI at the true centre (what a click there gives; model grid).", "",
              "| organ | detected | peak error, median (mm) | Dice at the true centre |", "|---|---|---|---|"]
    for name in organs.small_names:
        rows = [c[name] for c in located]
        errors = [r["error_mm"] for r in rows if r["error_mm"] is not None]
        at_truth = [r["dice_at_truth"] for r in rows if r["dice_at_truth"] is not None]
        lines.append(f"| {name} | {np.mean([r['found'] for r in rows]):.0%} | {np.median(errors):.1f} | "
                     f"{np.mean(at_truth):.3f} |")
    lines.append("")
    if v1 is None:
        lines += ["FocusNetv1 (SOS-Net without the shape autoencoder) needs its own training run "
                  "(`adversarial: false`, see `--v1`); it was not run for this table.", ""]
    if snet_small:
        lines += [f"The bundle's `snet_small` ({', '.join(snet_small)}: S-Net alone beat the coarse small-organ "
                  "branch on the cases it was chosen on) leaves those organs to S-Net's own contour where no fine "
                  "head draws them; the FocusNetv2 column is the same bundle with the branch drawing every small "
                  "organ, as in the paper.", ""]
    if segmenter.fine_heads:
        voxels = {}  # each head's fine voxel (z x y x x mm): the model grid's spacing over its zoom
        model_zyx = tuple(reversed(segmenter.config.preprocess.spacing))
        for organ, (head, _) in segmenter.fine_heads.items():
            size = " x ".join(f"{s / z:g}" for s, z in zip(model_zyx, head.zoom)) + " mm"
            members = len(getattr(head, "members", ()))  # fine-sos --ensemble: heads averaged
            voxels.setdefault(size, []).append(organ + (f" ({members} heads averaged)" if members else ""))
        lines += ["SOS-Net's fine heads (`focusnet fine-sos`: S-Net's features and the CT on finer voxels around the "
                  "organ, thresholds and checksums in the report's `model.fine_heads`) draw "
                  + "; ".join(f"{', '.join(organs_)} at {size}" for size, organs_ in voxels.items())
                  + " in the FocusNetv2 and shipped columns; S-Net alone has none. "
                  "The table above is the coarse SOS-Net's (model grid).", ""]
    lines += ["## All organs (" + ("as shipped" if snet_small else "FocusNetv2") + ")", "", table.split("\n", 2)[2]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"mean Dice {full['mean_dice']:.3f} (22 OARs), small organs {full['mean_dice_small']:.3f}; "
          f"S-Net alone small organs {snet['mean_dice_small']:.3f}"
          + (f", FocusNetv2 with the branch for every small organ {branch['mean_dice']:.3f} / "
             f"{branch['mean_dice_small']:.3f}" if snet_small else "")
          + (f", FocusNetv1 small organs {v1_summary['mean_dice_small']:.3f}" if v1 else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
