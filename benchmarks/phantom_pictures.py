"""The README's phantom pictures: axial, coronal and sagittal slices of one
512 x 512 case with ground-truth contours.

    .venv/bin/python benchmarks/phantom_pictures.py --out docs/images
"""
import argparse
from pathlib import Path

import numpy as np

from FocusNetCore.phantom import PHANTOM_SET, generate_case
from FocusNetCore.preview import save_overlay


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    case = generate_case(args.seed, "full")
    out = Path(args.out)
    save_overlay(case.image, case.labels, PHANTOM_SET, out / "phantom_small_organs.png",
                 point=case.landmarks["chiasm"], title=f"{case.name}: through the chiasm", overwrite=True)
    # Through the parotids, mandible and ears: 28 mm below the chiasm.
    point = np.asarray(case.landmarks["chiasm"]) + (30.0, 25.0, -28.0)
    save_overlay(case.image, case.labels, PHANTOM_SET, out / "phantom_large_organs.png",
                 point=point, title=f"{case.name}: ears, parotids, mandible", overwrite=True)
    print(f"wrote {out / 'phantom_small_organs.png'} and {out / 'phantom_large_organs.png'}")


if __name__ == "__main__":
    main()
