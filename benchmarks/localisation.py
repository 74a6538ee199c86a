"""Where the small-organ branch loses its Dice: SOL-Net's localisation or
SOS-Net's segmentation (issue 19, point 6). On held-out phantoms (seeds
1000 + k), on the model grid, per small organ:

- peak: SOL-Net's heat-map maximum, and whether it clears the threshold
  (the presence decision);
- error_mm: distance from the peak to the organ's true centre;
- dice: the model's Dice for the organ (its branch as shipped, before
  post-processing);
- dice_at_truth: SOS-Net's Dice with its ROI at the true centre (perfect
  localisation), what a click at the organ's centre gives.

    .venv/bin/python benchmarks/localisation.py [--n 5] [--model runs/x/model.pt] [--json out.json]
"""
import argparse
import json

import numpy as np
import torch

from FocusNetCore.metrics import dice
from FocusNetCore.networks import roi_paste, roi_pool, roi_start
from FocusNetCore.phantom import generate_case
from FocusNetCore.preprocess import labels_to_model_grid, preprocess
from FocusNetCore.segment import Segmenter


def localise(segmenter: Segmenter, image, labels_image) -> dict:
    """Per small organ: peak, error_mm, dice, dice_at_truth (see the module text)."""
    model, config = segmenter.model, segmenter.config
    pre = preprocess(image, config.preprocess)
    truth = labels_to_model_grid(labels_image, pre.grid)
    spacing = np.array(list(reversed(config.preprocess.spacing)))  # (z, y, x) mm
    parameter = next(model.parameters())
    volume = torch.as_tensor(pre.image)[None, None].to(parameter.device, parameter.dtype)
    with torch.inference_mode():
        out = model.segment(volume, keep_features=True)
        labels = out["labels"][0].cpu().numpy()
        features = out["features"]
        rows = {}
        for k, (name, label) in enumerate(zip(config.organs.small_names, config.organs.small_labels)):
            heat = out["heatmaps"][0, k]
            peak = float(heat.max())
            idx = np.argwhere(truth == label)
            row = {"peak": round(peak, 3), "found": peak >= config.heatmap_threshold,
                   "dice": round(dice(labels == label, truth == label), 3)}
            if not len(idx):
                rows[name] = {**row, "error_mm": None, "dice_at_truth": None}
                continue
            centre = idx.mean(axis=0)
            at = np.unravel_index(int(torch.argmax(heat)), tuple(heat.shape))
            row["error_mm"] = round(float(np.linalg.norm((np.array(at) - centre) * spacing)), 1)
            start = roi_start(tuple(int(round(c)) for c in centre), config.roi_size)
            prob = model.sosnet.heads[k](model.sos_roi(volume, features, start))
            mask = torch.zeros((1,) + truth.shape)
            roi_paste(mask, (prob[:, 0] > config.sos_threshold(k)).float(), start)
            row["dice_at_truth"] = round(dice(mask[0].float().cpu().numpy() > 0, truth == label), 3)
            rows[name] = row
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", default=None, help="write the per-case rows here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    segmenter = Segmenter(args.model, device="cpu", precision="float32")
    names = segmenter.config.organs.small_names
    cases = []
    for k in range(args.n):
        case = generate_case(args.first_seed + k, "full")
        rows = localise(segmenter, case.image, case.labels)
        cases.append({"case": case.name, "organs": rows})
        print(case.name, json.dumps(rows), flush=True)
    print(f"\n{'organ':<12} {'found':>6} {'peak':>6} {'err mm':>7} {'Dice':>6} {'at truth':>9}")
    for name in names:
        rows = [c["organs"][name] for c in cases]
        errors = [r["error_mm"] for r in rows if r["error_mm"] is not None]
        at_truth = [r["dice_at_truth"] for r in rows if r["dice_at_truth"] is not None]
        print(f"{name:<12} {np.mean([r['found'] for r in rows]):>6.2f} {np.mean([r['peak'] for r in rows]):>6.2f} "
              f"{np.median(errors):>7.1f} {np.mean([r['dice'] for r in rows]):>6.3f} {np.mean(at_truth):>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main()
