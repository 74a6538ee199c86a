"""How an organ's Dice follows its contrast-to-noise ratio on phantoms: per
case, the organ's Dice with the embedded model (or --model) and the CNR the
phantom drew for it: (its tissue's HU minus the surrounding tissue's) over
the noise's standard deviation (``generate_case``'s ``parameters``). Then
the least-squares line Dice = a + b CNR over the cases and its residual
standard deviation. The chiasm lies in CSF (30 and 12 HU, each drawn +/- 4
per phantom) under 10-30 HU of noise, the pair the defaults name.

    .venv/bin/python benchmarks/organ_contrast.py [--seeds 2000-2019] [--seeds 1000-1009] \
        [--organ OpticChiasm --tissue chiasm --around csf] [--model bundle.pt] [--noise 26 34]
"""
import argparse

import numpy as np
import SimpleITK as sitk

from FocusNetCore.metrics import dice
from FocusNetCore.organs import convert_labels
from FocusNetCore.phantom import NOISE_HU, PHANTOM_SET, generate_case
from FocusNetCore.segment import Segmenter


def seeds_of(text: str):
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", action="append", default=None, help="FIRST-LAST (repeat for several ranges)")
    parser.add_argument("--organ", default="OpticChiasm")
    parser.add_argument("--tissue", default="chiasm", help="the organ's tissue in phantom.TISSUE_HU")
    parser.add_argument("--around", default="csf", help="the tissue around it")
    parser.add_argument("--model", default=None)
    parser.add_argument("--noise", nargs=2, type=float, metavar=("LO", "HI"), default=list(NOISE_HU),
                        help="the phantoms' noise range (HU; `focusnet phantom --noise`)")
    args = parser.parse_args()
    segmenter = Segmenter(args.model, device="cpu")
    organs = segmenter.config.organs
    label = organs.label_of(args.organ)
    groups = []
    for text in args.seeds or ["2000-2019"]:
        rows = []
        for seed in seeds_of(text):
            case = generate_case(seed, "full", noise=tuple(args.noise))
            p = case.parameters
            contrast = p[f"hu_{args.tissue}"] - p[f"hu_{args.around}"]
            truth, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
            result = segmenter.segment(case.image)
            drawn = sitk.GetArrayViewFromImage(result.labels)
            score = dice(drawn == label, truth == label)
            rows.append((seed, score, contrast, p["noise_sigma"], contrast / p["noise_sigma"]))
            print(f"{seed}: {args.organ} Dice {score:.3f}, contrast {contrast:.1f} HU, noise {p['noise_sigma']:.1f} HU, "
                  f"CNR {contrast / p['noise_sigma']:.2f}", flush=True)
        groups.append((text, np.array(rows)))
    for text, a in groups:
        line = ""
        if len(a) > 2:
            b, c = np.polyfit(a[:, 4], a[:, 1], 1)
            residual = a[:, 1] - (c + b * a[:, 4])
            line = (f"; Dice = {c:.3f} + {b:.3f} CNR (residual s.d. {residual.std(ddof=2):.3f}); correlation with "
                    f"CNR {np.corrcoef(a[:, 1], a[:, 4])[0, 1]:.2f}, with the noise {np.corrcoef(a[:, 1], a[:, 3])[0, 1]:.2f}")
        low = int(np.argmin(a[:, 4]))
        print(f"seeds {text}: {args.organ} mean Dice {a[:, 1].mean():.3f}, lowest {a[:, 1].min():.3f}; lowest CNR "
              f"{a[low, 4]:.2f} (phantom {int(a[low, 0])}, Dice {a[low, 1]:.3f}){line}")


if __name__ == "__main__":
    main()
