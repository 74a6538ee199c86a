"""What the field-of-view judgement (FocusNetCore/fieldofview.py) does on
scans cut the way real ones are: each phantom whole, cut to 5 slices through
the mandible, cut at the middle of the eyes (keeping what is below, or
above), and cut 3 slices below the orbits. For each: the organs judged
outside, those drawn that the cut scan does not hold, and those removed
although the network had drawn some of them right (must stay empty).

    .venv/bin/python benchmarks/field_of_view.py [SEED ...]   (default 1000 1001 1002 1003 8500)
"""
import sys
import time

import numpy as np
import SimpleITK as sitk

from FocusNetCore import fieldofview
from FocusNetCore.organs import ORGAN_SETS, convert_labels
from FocusNetCore.phantom import PHANTOM_SET, generate_case
from FocusNetCore.segment import Segmenter


def main():
    seeds = [int(a) for a in sys.argv[1:]] or [1000, 1001, 1002, 1003, 8500]
    organs = ORGAN_SETS["oar22"]
    segmenter = Segmenter()
    wrongly_removed = 0
    for seed in seeds:
        case = generate_case(seed)
        truth, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)

        def slices(name):
            return np.nonzero((truth == organs.label_of(name)).any(axis=(1, 2)))[0]

        n, jaw, eye = truth.shape[0], int(slices("Bone_Mandible_L").mean()), slices("Eye_L")
        cuts = {"whole": (0, n), "5 slices through the mandible": (jaw - 2, jaw + 3),
                "top cut mid-eye": (0, int(eye.mean()) + 1), "bottom cut mid-eye": (int(eye.mean()), n),
                "top cut 3 slices below the orbits": (0, int(eye.min()) - 3)}
        for name, (a, b) in cuts.items():
            start = time.perf_counter()
            unjudged = segmenter.segment(case.image[:, :, a:b], judge_field_of_view=False)
            judged = fieldofview.judge(unjudged.labels, organs, segmenter.anatomy)  # as segment() does
            held = [o for o in organs.names if (truth[a:b] == organs.label_of(o)).any()]
            drawn = [o.name for o in unjudged.organs if o.present and o.name not in judged.removed]
            # what the judgement removed that was right: the network's voxels of it that the truth has
            raw = sitk.GetArrayFromImage(unjudged.labels)
            lost = [o for o in judged.removed if ((raw == organs.label_of(o)) & (truth[a:b] == organs.label_of(o))).any()]
            wrongly_removed += len(lost)
            print(f"phantom {seed} {name:34s} {b - a:3d} slices: outside {judged.outside or '-'}; "
                  f"drawn, not in the scan: {[o for o in drawn if o not in held] or '-'}; "
                  f"removed, some of it right: {lost or '-'} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"organs removed although some of what was drawn was right: {wrongly_removed}")
    return 1 if wrongly_removed else 0


if __name__ == "__main__":
    sys.exit(main())
