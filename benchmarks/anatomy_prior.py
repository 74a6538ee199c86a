"""The embedded model's anatomy prior (FocusNetCore/fieldofview.py): where
each organ lies relative to the others, over phantoms drawn as the embedded
model's training phantoms were (default size and pose ranges).

    .venv/bin/python benchmarks/anatomy_prior.py [--n 40] [--first-seed 0]
        [--out FocusNetCore/models/focusnet-phantom-cpu.anatomy.json]

A model trained by ``focusnet train`` carries its own prior, from its
training cases' contours, in its bundle.
"""
import argparse
import json
from pathlib import Path

import SimpleITK as sitk

from FocusNetCore.fieldofview import PHANTOM_PRIOR, prior_from_cases
from FocusNetCore.organs import ORGAN_SETS, convert_labels
from FocusNetCore.phantom import PHANTOM_SET, generate_case


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", default=str(PHANTOM_PRIOR))
    args = parser.parse_args()
    organs = ORGAN_SETS["oar22"]

    def cases():
        for seed in range(args.first_seed, args.first_seed + args.n):
            case = generate_case(seed)
            array, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
            labels = sitk.GetImageFromArray(array)
            labels.CopyInformation(case.labels)
            yield labels

    prior = prior_from_cases(cases(), organs)
    prior["source"] = f"phantoms {args.first_seed}-{args.first_seed + args.n - 1} (benchmarks/anatomy_prior.py)"
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(prior, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}: {prior['cases']} cases")


if __name__ == "__main__":
    main()
