"""The best Dice any model can reach on the original scan when it works on a
given model grid: the ground truth of held-out phantoms is taken to the model
grid and back to the scan's own grid with the very functions that
`focusnet segment` uses (preprocess.labels_to_model_grid, labels_to_original)
and compared with itself. A perfect network on that grid would score this.

    .venv/bin/python benchmarks/resolution_oracle.py [--n 10] [--spacings 2,2,3 2,2,2 1,1,3] \
        [--out docs/resolution-oracle.md]

Spacings are x,y,z in mm; the window is always 240 x 240 mm. The phantoms'
slices are 2.5-3.5 mm thick, in-plane 0.78-1.25 mm, like the paper's data;
organs one or two slices thick (optic nerves, lenses, chiasm) lose most on a
grid whose slices do not line up with the scan's.
"""
import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from FocusNetCore.metrics import dice
from FocusNetCore.organs import ORGAN_SETS
from FocusNetCore.phantom import PHANTOM_SET, generate_case
from FocusNetCore.preprocess import PreprocessConfig, labels_to_model_grid, labels_to_original, model_grid

FIELD_MM = 240.0


def oracle_dice(case, spacing) -> dict:
    """Dice per phantom organ name of the ground truth after the round trip."""
    config = PreprocessConfig(spacing=spacing, crop_size=tuple(int(round(FIELD_MM / s)) for s in spacing[:2]))
    grid = model_grid(case.image, config)
    back = sitk.GetArrayFromImage(labels_to_original(labels_to_model_grid(case.labels, grid), grid, case.labels))
    truth = sitk.GetArrayViewFromImage(case.labels)
    out = {}
    for name in PHANTOM_SET.names:
        label = PHANTOM_SET.label_of(name)
        if (truth == label).any():
            out[name] = dice(truth == label, back == label)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--spacings", nargs="+", default=["2,2,3", "2,2,2", "1,1,3", "1.5,1.5,1.5", "1,1,2"])
    parser.add_argument("--out", default="docs/resolution-oracle.md")
    args = parser.parse_args()
    organs = ORGAN_SETS["oar22"]
    spacings = [tuple(float(v) for v in s.split(",")) for s in args.spacings]
    cases = [generate_case(args.first_seed + k, "full") for k in range(args.n)]
    table = {}
    for spacing in spacings:
        per_case = [oracle_dice(case, spacing) for case in cases]
        table[spacing] = {name: float(np.mean([d[name] for d in per_case if name in d])) for name in organs.names}
        mean = np.mean(list(table[spacing].values()))
        small = np.mean([table[spacing][n] for n in organs.small_names])
        print(f"{spacing}: mean Dice {mean:.3f} (22 OARs), small organs {small:.3f}", flush=True)
    label = lambda s: " x ".join(f"{v:g}" for v in s)  # noqa: E731
    lines = ["# Resolution oracle: the best Dice on the scan's grid for a model grid", "",
             f"Command: `.venv/bin/python benchmarks/resolution_oracle.py --n {args.n} --spacings "
             f"{' '.join(args.spacings)}` (held-out phantoms, seeds {args.first_seed}-"
             f"{args.first_seed + args.n - 1}). Ground truth to the model grid and back with the functions "
             "`focusnet segment` uses; what a perfect network on that grid would score.", "",
             "| organ | " + " | ".join(f"{label(s)} mm" for s in spacings) + " |",
             "|---" * (len(spacings) + 1) + "|"]
    for name in organs.names:
        tag = " (small)" if name in organs.small_names else ""
        lines.append(f"| {name}{tag} | " + " | ".join(f"{table[s][name]:.3f}" for s in spacings) + " |")
    lines.append("| **mean (22)** | " + " | ".join(f"{np.mean(list(table[s].values())):.3f}" for s in spacings) + " |")
    lines.append("| **mean (small)** | " + " | ".join(
        f"{np.mean([table[s][n] for n in organs.small_names]):.3f}" for s in spacings) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
