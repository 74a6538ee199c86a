"""The embedded model on scans that differ from the default phantoms the way
departments' scans do (issue 48): each held-out phantom generated again with
one change (phantom.Variation, the truth painted alike), segmented, and
scored by organ on its own grid.

    .venv/bin/python benchmarks/scan_variation.py [--seeds 8600 8601 8602] [--model bundle.pt]

Per variant: mean Dice over the organs the scan holds, the small organs'
mean, the two lowest organs, and the organs drawn that the scan does not
hold (what the field-of-view judgement should leave out).
"""
import argparse
import time

import numpy as np
import SimpleITK as sitk

from FocusNetCore.metrics import dice
from FocusNetCore.organs import ORGAN_SETS, convert_labels
from FocusNetCore.phantom import PHANTOM_SET, Variation, generate_case
from FocusNetCore.segment import Segmenter

VARIANTS = {
    "as generated": (Variation(), None),
    "head turned 8 deg, tipped 5 deg": (Variation(pose=(8.0, 5.0, 0.0)), None),
    "head turned 15, tipped -10, rolled 8": (Variation(pose=(15.0, -10.0, 8.0)), None),
    "5 mm slices": (Variation(slice_mm=5.0), None),
    "1.2 mm pixels": (Variation(pixel_mm=1.2), None),
    "noise 60 HU": (Variation(), (60.0, 60.0)),
    "dental fillings with streaks": (Variation(metal=True), None),
    "scan stops below the orbits' top": (Variation(z_range=(-170.0, 10.0)), None),
    "field of view cut to 200 mm": (Variation(fov_mm=200.0), None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[8600, 8601, 8602])
    parser.add_argument("--model", default=None)
    parser.add_argument("--only", nargs="+", help="the variants whose names contain one of these words")
    args = parser.parse_args()
    organs = ORGAN_SETS["oar22"]
    segmenter = Segmenter(args.model)
    print(f"| variant | mean Dice | small organs | lowest organs | drawn, not in the scan |\n|---|---|---|---|---|")
    for name, (variation, noise) in VARIANTS.items():
        if args.only and not any(word in name for word in args.only):
            continue
        scores, extra = {}, set()
        start = time.perf_counter()
        for seed in args.seeds:
            case = generate_case(seed, variation=variation, **({"noise": noise} if noise else {}))
            truth, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
            result = segmenter.segment(case.image)  # held: the view below reads its memory
            drawn = sitk.GetArrayViewFromImage(result.labels)
            for organ in organs.names:
                value = organs.label_of(organ)
                held, got = truth == value, drawn == value
                if held.any():
                    scores.setdefault(organ, []).append(dice(got, held))
                elif got.any():
                    extra.add(organ)
        means = {o: float(np.mean(v)) for o, v in scores.items()}
        small = [means[o] for o in organs.small_names if o in means]
        lowest = sorted(means.items(), key=lambda kv: kv[1])[:2]
        print(f"| {name} | {np.mean(list(means.values())):.3f} | {np.mean(small):.3f} | "
              + ", ".join(f"{o} {v:.2f}" for o, v in lowest) + f" | {', '.join(sorted(extra)) or '-'} |"
              + f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
