"""The headline figures of docs/model-card.md: the embedded model (or
--model) on a test set of phantoms whose seeds were used for nothing else
(8500 + k; the development phantoms 1000-1009 and every training seed are
listed in the model card), segmented as ``focusnet segment`` does, scored
per organ. Prints a Markdown table: the mean Dice over cases with a 95 %
percentile bootstrap interval (over cases), per organ, over all organs and
over the small organs, and the lowest case per organ.

    .venv/bin/python benchmarks/model_card_figures.py [--n 20] [--first-seed 8500] [--out docs/model-card-figures.md]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from FocusNetCore.metrics import organ_metrics  # noqa: E402
from FocusNetCore.organs import convert_labels  # noqa: E402
from FocusNetCore.phantom import PHANTOM_SET, generate_case  # noqa: E402
from FocusNetCore.segment import Segmenter  # noqa: E402
from FocusNetCore.train import bootstrap_ci  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=8500)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args()
    segmenter = Segmenter(args.model, device="cpu")
    organs = segmenter.config.organs
    per_case = []  # {organ: dice}
    started = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.n):
        case = generate_case(seed)
        truth, missing = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
        labels = sitk.GetArrayFromImage(segmenter.segment(case.image).labels)
        wanted = [organs.label_of(n) for n in organs.names if n not in missing and (truth == organs.label_of(n)).any()]
        metrics = organ_metrics(labels, truth, wanted, tuple(reversed(case.image.GetSpacing())))
        per_case.append({organs.name_of(label): values["dice"] for label, values in metrics.items()})
        print(f"seed {seed}: mean Dice {np.mean(list(per_case[-1].values())):.3f}", flush=True)
    seconds = time.perf_counter() - started

    def row(name, values):
        ci = bootstrap_ci(values)
        return (f"| {name} | {np.mean(values):.3f} | {f'{ci[0]:.3f}-{ci[1]:.3f}' if ci else 'n/a'} | "
                f"{np.min(values):.3f} |")

    case_means = [float(np.mean(list(d.values()))) for d in per_case]
    case_small = [float(np.mean([d[n] for n in organs.small_names if n in d])) for d in per_case]
    lines = [f"Embedded model on {args.n} test phantoms (seeds {args.first_seed}-{args.first_seed + args.n - 1}, "
             f"default settings), {seconds / 60:.1f} min on this machine's CPU:", "",
             "| organ | mean Dice | 95% CI | lowest case |", "|---|---|---|---|",
             row("**all organs** (mean per case)", case_means), row("**small organs** (mean per case)", case_small)]
    lines += [row(name, [d[name] for d in per_case if name in d]) for name in organs.names
              if any(name in d for d in per_case)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
