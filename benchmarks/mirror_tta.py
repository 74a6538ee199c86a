"""Mirror test-time averaging for one fine head, measured on cases with
ground truth (not what inference does): the head's probability from the
scan and from the scan mirrored left-right (S-Net and the head run on each,
the ROI where each S-Net drew the organ), both linearly interpolated onto
the CT's grid and averaged there, then thresholded (largest component),
against the scan's own probability treated the same way. Per case at the
bundle's threshold, then the mean (lowest case) at each threshold and the
paired gain with its standard error. Meant for midline organs (the chiasm,
the pituitary): a mirrored left organ is a right one.

    .venv/bin/python benchmarks/mirror_tta.py --organ OpticChiasm data/phantom-choose [more folders]
"""
import argparse
import time

import numpy as np
import SimpleITK as sitk

from FocusNetCore import finesos
from FocusNetCore.data import discover_cases, load_case
from FocusNetCore.metrics import dice
from FocusNetCore.postprocess import clearly_better
from FocusNetCore.preprocess import Grid, _resample
from FocusNetCore.segment import Segmenter

THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4)


def probability_on_ct(segmenter: Segmenter, head, threshold: float, label: int, image: sitk.Image) -> np.ndarray:
    """The fine head's probability on ``image``'s grid (0 outside its ROI)."""
    kept, segmenter.fine_heads = segmenter.fine_heads, {}
    try:
        state = segmenter.segment(image, keep_state=True).state
    finally:
        segmenter.fine_heads = kept
    centre = finesos.snet_centre(state["snet_labels"], label)
    if centre is None:
        return np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.float32)
    result = finesos.draw(head, threshold, image, state["features"], state["preprocessed"].grid, centre,
                          segmenter.config.preprocess, label, segmenter.fine_roi)
    probability = sitk.GetImageFromArray(result.probability.astype(np.float32))
    result.grid.apply_to(probability)
    return sitk.GetArrayFromImage(_resample(probability, Grid.of(image), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", help="cases with ground truth, as `focusnet train` reads them")
    parser.add_argument("--organ", default="OpticChiasm")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    segmenter = Segmenter(args.model, device="cpu")
    head, threshold = segmenter.fine_heads[args.organ]
    label = segmenter.config.organs.label_of(args.organ)
    at = THRESHOLDS.index(threshold) if threshold in THRESHOLDS else None
    for folder in args.folders:
        sources, problems = discover_cases(folder)
        if not sources:
            raise SystemExit(f"{folder}: no usable case ({'; '.join(problems[:3]) or 'empty'})")
        plain, averaged = [], []
        for source in sources:
            start = time.monotonic()
            image, labels, _ = load_case(source, segmenter.config.organs)
            truth = labels == label
            one = probability_on_ct(segmenter, head, threshold, label, image)
            flipped = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)[:, :, ::-1]))
            flipped.CopyInformation(image)
            both = (one + probability_on_ct(segmenter, head, threshold, label, flipped)[:, :, ::-1]) / 2
            plain.append([dice(finesos.largest_component(one > t), truth) for t in THRESHOLDS])
            averaged.append([dice(finesos.largest_component(both > t), truth) for t in THRESHOLDS])
            if at is not None:
                print(f"{source.name}: {plain[-1][at]:.3f} -> {averaged[-1][at]:.3f} mirrored and averaged "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
        plain, averaged = np.array(plain), np.array(averaged)
        for k, t in enumerate(THRESHOLDS):
            gain = averaged[:, k] - plain[:, k]
            _, se = clearly_better(averaged[:, k], plain[:, k], 0.0)
            print(f"{folder} threshold {t}: {plain[:, k].mean():.3f} (lowest {plain[:, k].min():.3f}) -> "
                  f"{averaged[:, k].mean():.3f} (lowest {averaged[:, k].min():.3f}); gain {gain.mean():+.4f} "
                  f"(s.e. {se:.4f}), better on {int((gain > 0).sum())} of {len(gain)}", flush=True)


if __name__ == "__main__":
    main()
