"""Two runs of `focusnet fine-sos --trained-out`, organ by organ, paired
case by case: each head's Dice on the selection cases at the threshold its
run chose (read from the files), the paired gain of the second over the
first with its standard error, and, with --held, both heads scored again
on held-out cases with ground truth at those same thresholds (S-Net and
the ROI as inference places them). How the shape term was compared with
the segmentation loss alone (README, "The embedded model"):

    .venv/bin/python benchmarks/compare_heads.py runs/fine/v1-10.pt runs/fine/v2-10.pt [--held data/phantom-held]
"""
import argparse

import numpy as np
import torch

from FocusNetCore import finesos
from FocusNetCore.bundle import fine_head
from FocusNetCore.postprocess import clearly_better
from FocusNetCore.segment import EMBEDDED_MODEL, Segmenter


def at_threshold(rows, threshold: float) -> np.ndarray:
    """The per-case scores of ``rows`` (threshold -> scores, as a dict or as
    (threshold, scores) pairs) at ``threshold``."""
    pairs = rows.items() if isinstance(rows, dict) else rows
    return np.asarray(dict((round(float(t), 3), s) for t, s in pairs)[round(float(threshold), 3)], dtype=float)


def paired(first: np.ndarray, second: np.ndarray) -> str:
    _, error = clearly_better(second, first, 0.0)
    gains = second - first
    return (f"{first.mean():.3f} / {second.mean():.3f}  gain {gains.mean():+.3f} (s.e. {error:.3f}, "
            f"better on {int((gains > 0).sum())} of {len(gains)})  lowest {first.min():.3f} / {second.min():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a fine-sos --trained-out file")
    parser.add_argument("second", help="another, for the same organs")
    parser.add_argument("--held", help="held-out cases with ground truth to score both heads on")
    parser.add_argument("--model", default=str(EMBEDDED_MODEL), help="the bundle both runs trained on")
    args = parser.parse_args()
    runs = [torch.load(path, map_location="cpu", weights_only=False)["heads"] for path in (args.first, args.second)]
    organs = [organ for organ in runs[0] if organ in runs[1]]
    if not organs:
        raise SystemExit(f"{args.first}, {args.second}: no organ in common")
    print("selection cases (first / second, each at its own threshold):")
    means = []
    for organ in organs:
        rows = [at_threshold(run[organ]["scores"]["fine"], run[organ]["report"]["threshold"]) for run in runs]
        means.append([r.mean() for r in rows])
        print(f"  {organ:14s} {paired(*rows)}")
    print(f"  {'mean':14s} {np.mean(means, axis=0)[0]:.3f} / {np.mean(means, axis=0)[1]:.3f}")
    if not args.held:
        return
    segmenter = Segmenter(args.model)
    held = []
    for run in runs:
        heads = {organ: fine_head(segmenter.config, run[organ]) for organ in organs}
        scores = finesos.scores_on(segmenter, heads, args.held, log=lambda *_: None)
        held.append({organ: at_threshold(scores[organ]["fine"], run[organ]["report"]["threshold"]) for organ in organs})
    print(f"held-out cases {args.held}:")
    for organ in organs:
        print(f"  {organ:14s} {paired(held[0][organ], held[1][organ])}")
    print(f"  {'mean':14s} {np.mean([held[0][o].mean() for o in organs]):.3f} / "
          f"{np.mean([held[1][o].mean() for o in organs]):.3f}")


if __name__ == "__main__":
    main()
