"""``focusnet evaluate``: predictions against ground truth, per organ.

Ground truth is read with the training loaders (phantom, PDDCA, nnU-Net or
DICOM layouts); predictions are ``.seg.nrrd`` files (segments matched by
name) or label maps with a ``<case>.labels.json`` table, as ``focusnet
segment`` writes them. Metrics are computed on the ground truth's grid.
Writes ``evaluation.csv`` (one row per case and organ) and ``evaluation.md``
(mean +/- sd per organ with the paper's numbers beside ours).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .data import discover_cases, load_case
from .imageio import ImageReadError, atomic_output, describe_grid_difference, same_grid
from .metrics import nanmean, organ_metrics
from .organs import UNIONS, get_organ_set
from .reference import PAPER_DICE, PAPER_HD95
from .segfile import read_seg_nrrd_segments

METRICS = ("dice", "hd95_paper", "hd95_symmetric", "surface_dice")
PRED_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def find_prediction(folder: Path, case: str) -> Optional[Path]:
    for stem in (case, f"{case}_ct", f"{case}_0000"):
        for suffix in PRED_SUFFIXES:
            path = folder / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def read_prediction(path: Path, organs) -> sitk.Image:
    """A prediction mapped to ``organs``' label values by organ name."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    if str(path).endswith(".seg.nrrd"):
        table = {s["name"]: s["label_value"] for s in read_seg_nrrd_segments(path) if s["layer"] == 0}
    else:
        side = path.with_name(path.name.split(".")[0] + ".labels.json")
        if not side.is_file():
            raise ImageReadError(path, f"no label table {side.name} beside the label map")
        table = {e["name"]: e["value"] for e in json.loads(side.read_text())["labels"]}
    out = np.zeros(array.shape, np.uint8)
    for name in organs.names:
        parts = [name] if name in table else [p for p in UNIONS.get(name, ()) if p in table]
        for part in parts:
            out[array == table[part]] = organs.label_of(name)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def evaluate(pred_dir, gt_dir, organ_set: str = "oar22", out_dir: Optional[Path] = None) -> Tuple[List[dict], List[Path]]:
    sources, problems = discover_cases(gt_dir)
    if not sources:
        raise ImageReadError(gt_dir, "no ground-truth cases found" + (f" ({problems[0]})" if problems else ""))
    return evaluate_sources(pred_dir, sources, organ_set, out_dir)


def evaluate_sources(pred_dir, sources, organ_set: str = "oar22",
                     out_dir: Optional[Path] = None) -> Tuple[List[dict], List[Path]]:
    """``evaluate`` for given ground-truth cases (data.CaseSource), e.g. a
    training run's test split."""
    organs = get_organ_set(organ_set)
    pred_dir, out_dir = Path(pred_dir), Path(out_dir or pred_dir)
    rows: List[dict] = []
    missing = []
    for source in sources:
        pred_path = find_prediction(pred_dir, source.name)
        if pred_path is None:
            missing.append(source.name)
            continue
        image, truth, present = load_case(source, organs)
        pred = read_prediction(pred_path, organs)
        if not same_grid(pred, image):
            raise ImageReadError(pred_path, "prediction grid differs from the CT's: "
                                 + describe_grid_difference(pred, image))
        spacing = tuple(reversed(image.GetSpacing()))
        labels = [organs.label_of(n) for n in organs.names if present[organs.label_of(n)]]
        for label, values in organ_metrics(sitk.GetArrayViewFromImage(pred), truth, labels, spacing).items():
            rows.append({"case": source.name, "organ": organs.name_of(label), **values})
    if not rows:
        raise ImageReadError(pred_dir, f"no predictions for the {len(sources)} ground-truth case(s)")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "evaluation.csv", out_dir / "evaluation.md"
    with atomic_output(csv_path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case", "organ", *METRICS])
            writer.writeheader()
            writer.writerows(rows)
    with atomic_output(md_path, overwrite=True) as tmp:
        tmp.write_text(markdown_table(rows, organs, missing))
    return rows, [csv_path, md_path]


def _mean_sd(values) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    return f"{np.mean(finite):.3f} ± {np.std(finite):.3f}"


def summary(rows: List[dict], organs) -> dict:
    """Per-organ means, the mean over organs and over the small organs."""
    out = {}
    for name in organs.names:
        values = [r for r in rows if r["organ"] == name]
        if values:
            out[name] = {m: nanmean([r[m] for r in values]) for m in METRICS}
    dice_all = [v["dice"] for v in out.values()]
    dice_small = [out[n]["dice"] for n in organs.small_names if n in out]
    return {"organs": out, "mean_dice": float(np.mean(dice_all)) if dice_all else float("nan"),
            "mean_dice_small": float(np.mean(dice_small)) if dice_small else float("nan")}


def markdown_table(rows: List[dict], organs, missing: List[str]) -> str:
    paper_dice = PAPER_DICE.get(organs.key, {})
    paper_hd = PAPER_HD95.get(organs.key, {})
    cases = sorted({r["case"] for r in rows})
    lines = [f"# FocusNet evaluation ({organs.key}, {len(cases)} cases)", "",
             "95HD (paper) is the mean of the two directed 95th-percentile surface distances, as FocusNetv2 "
             "reports it; 95HD (symmetric) is the 95th percentile of both directions pooled. Surface Dice at "
             "2 mm, area-weighted (Nikolov et al. 2021, DeepMind's surface-distance). Paper columns: FocusNetv2's published results (tables 1-3) on real CT, for orientation "
             "only: these numbers are not comparable with synthetic phantoms.", "",
             "| organ | Dice | 95HD paper (mm) | 95HD symmetric (mm) | surface Dice 2 mm | paper Dice | paper 95HD |",
             "|---|---|---|---|---|---|---|"]
    for name in organs.names:
        values = [r for r in rows if r["organ"] == name]
        if not values:
            continue
        small = " (small)" if name in organs.small_names else ""
        ref_d = f"{paper_dice[name] / 100:.3f}" if name in paper_dice else "-"
        ref_h = f"{paper_hd[name]:.2f}" if name in paper_hd else "-"
        lines.append(f"| {name}{small} | " + " | ".join(_mean_sd([r[m] for r in values]) for m in METRICS)
                     + f" | {ref_d} | {ref_h} |")
    stats = summary(rows, organs)
    lines += ["", f"Mean Dice over organs: {stats['mean_dice']:.3f}; over small organs: {stats['mean_dice_small']:.3f}."]
    if missing:
        lines += ["", f"No prediction for: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"
