"""Post-processing of the label map on the model grid, before it is
resampled back to the scan: per organ, keep only the largest connected
component (as nnU-Net's post-processing does) and fill holes.

Each step is kept for an organ only where it did not lower the mean Dice on
the validation cases (:func:`choose`); the choice, with the Dice change that
justified it, is stored in the model bundle (``postprocess``), so training's
validation and every inference apply the same steps. A bundle without it is
used as it is.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .metrics import dice
from .organs import OrganSet

PLAN_VERSION = 1
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connected: a diagonal step is one organ
TOLERANCE = 1e-3  # a step that costs less mean Dice than this still goes in (it removes islands Dice barely sees)


def largest_component(mask: np.ndarray, faces_only: bool = False) -> np.ndarray:
    """The largest connected component of ``mask`` (bool): 26-connected, or
    6-connected (voxels sharing a face) with ``faces_only``, as the fine
    heads' thresholds were chosen with (finesos.largest_component)."""
    components, count = ndimage.label(mask, structure=None if faces_only else _CONNECTIVITY)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def fill_holes(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask)


def _steps(plan: Optional[dict], name: str) -> Tuple[bool, bool]:
    if not plan:
        return False, False
    return name in plan.get("largest_component", ()), name in plan.get("fill_holes", ())


def apply(labels: np.ndarray, plan: Optional[dict], organs: OrganSet) -> np.ndarray:
    """``labels`` (z, y, x) with the plan's steps applied, organ by organ:
    voxels cut from an organ become background; holes are filled only where
    no other organ is."""
    if not plan:
        return labels
    out = labels.copy()
    boxes = ndimage.find_objects(labels)
    for name in organs.names:
        keep_largest, holes = _steps(plan, name)
        label = organs.label_of(name)
        if not (keep_largest or holes) or label > len(boxes) or boxes[label - 1] is None:
            continue
        window = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[label - 1])
        region = out[window]
        mask = region == label
        if keep_largest:
            kept = largest_component(mask)
            region[mask & ~kept] = 0
            mask = kept
        if holes:
            region[fill_holes(mask) & (region == 0)] = label
    return out


def choose(cases: Sequence[Tuple[np.ndarray, np.ndarray]], organs: OrganSet) -> dict:
    """The plan from validation cases, each (predicted labels, true labels)
    on the model grid: a step goes in for an organ when the organ's mean
    Dice with it is no more than TOLERANCE below the mean without it."""
    gains: Dict[str, Dict[str, float]] = {"largest_component": {}, "fill_holes": {}}
    chosen: Dict[str, List[str]] = {"largest_component": [], "fill_holes": []}
    for name in organs.names:
        label = organs.label_of(name)
        pairs = [(p == label, t == label) for p, t in cases]
        pairs = [(p, t) for p, t in pairs if p.any() or t.any()]
        if not pairs:
            continue
        # largest component first, then holes on what it kept (the order apply() uses)
        before = np.mean([dice(p, t) for p, t in pairs])
        kept = [(largest_component(p), t) for p, t in pairs]
        gain = float(np.mean([dice(p, t) for p, t in kept]) - before)
        gains["largest_component"][name] = round(gain, 5)
        if gain >= -TOLERANCE:
            chosen["largest_component"].append(name)
            pairs = kept
        base = np.mean([dice(p, t) for p, t in pairs])
        gain = float(np.mean([dice(fill_holes(p), t) for p, t in pairs]) - base)
        gains["fill_holes"][name] = round(gain, 5)
        if gain >= -TOLERANCE:
            chosen["fill_holes"].append(name)
    return {"version": PLAN_VERSION, **chosen, "mean_dice_change": gains, "cases": len(cases),
            "rule": f"kept where the organ's mean validation Dice changed by at least -{TOLERANCE:g}"}


def mean_dice(cases: Sequence[Tuple[np.ndarray, np.ndarray]], organs: OrganSet, plan: Optional[dict] = None) -> float:
    """Mean over organs of the mean Dice over cases, with ``plan`` applied."""
    per_organ = []
    for name in organs.names:
        label = organs.label_of(name)
        values = [dice(apply(p, plan, organs) == label, t == label) for p, t in cases
                  if (p == label).any() or (t == label).any()]
        if values:
            per_organ.append(np.mean(values))
    return float(np.mean(per_organ)) if per_organ else float("nan")


# SOS-Net's probability thresholds tried per small organ; 0.5 unless another
# raises the validation Dice by more than TOLERANCE.
SOS_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def choose_sos_thresholds(samples: Dict[str, List[Tuple[np.ndarray, np.ndarray]]],
                          small_names: Sequence[str]) -> Tuple[Tuple[float, ...], Dict[str, dict]]:
    """Per small organ, the SOS-Net probability threshold with the highest
    mean Dice over ``samples[name]``: (probability ROI, true mask ROI) pairs,
    SOS-Net at the organ's true centre on the validation cases (a lens drawn
    2.6x too large at 0.5 is what this corrects), on the model grid. Returns
    the thresholds in ``small_names`` order and, per organ, the Dice at 0.5
    and at the choice (choose_sos_thresholds_from_scores)."""
    scores = {name: np.array([[dice(prob > t, truth) for t in SOS_THRESHOLDS] for prob, truth in pairs])
              for name, pairs in samples.items() if pairs}
    return choose_sos_thresholds_from_scores(scores, small_names)


def choose_sos_thresholds_from_scores(scores: Dict[str, np.ndarray], small_names: Sequence[str]
                                      ) -> Tuple[Tuple[float, ...], Dict[str, dict]]:
    """Per small organ, the threshold of SOS_THRESHOLDS with the highest mean
    Dice over ``scores[name]`` (cases x SOS_THRESHOLDS, however measured:
    `focusnet postprocess` scores on the CT's grid, Worker.dice_of_heads);
    0.5 unless another beats it by more than TOLERANCE, and 0.5 for an organ
    no case holds. Returns the thresholds in ``small_names`` order and, per
    organ, the Dice at 0.5 and at the choice."""
    chosen, report = [], {}
    for name in small_names:
        rows = scores.get(name)
        if rows is None or not len(rows):
            chosen.append(0.5)
            continue
        means = dict(zip(SOS_THRESHOLDS, (float(v) for v in np.asarray(rows).mean(axis=0))))
        best = max(SOS_THRESHOLDS, key=lambda t: (means[t], -abs(t - 0.5)))
        if means[best] <= means[0.5] + TOLERANCE:
            best = 0.5
        chosen.append(best)
        report[name] = {"threshold": best, "dice_at_0.5": round(means[0.5], 4), "dice": round(means[best], 4),
                        "cases": len(rows)}
    return tuple(chosen), report


def choose_click_heads(scores: Sequence[Dict[str, np.ndarray]], thresholds: Sequence[float],
                       pipeline_thresholds: Sequence[float], small_names: Sequence[str],
                       margin: float = 0.01) -> Tuple[Dict[str, Tuple[int, float]], Dict[str, dict]]:
    """Click-to-find's head per small organ. ``scores[c][name]``: Dice of
    candidate head set ``c`` for a click at the organ's true centre, one row
    per case, one column per value of ``thresholds`` (worker.dice_of_heads);
    ``scores[0]`` holds the bundle's own heads, which the pipeline uses at
    ``pipeline_thresholds`` (each one of ``thresholds``). For each candidate
    the threshold with the highest mean Dice is taken (the one nearest 0.5
    among equals); an organ gets a click head (candidate index, threshold)
    only where the best beats the pipeline's head at its own threshold by
    more than ``margin`` mean Dice and by more than twice the standard
    error of the per-case differences (a reviewer's clicks change only on
    evidence: on 8 phantoms a head 0.06 better was 0.05 worse on 10 others).
    Returns the choice and, per organ, the mean Dice of the pipeline and of
    each candidate at its threshold, and the gain's standard error."""
    chosen, report = {}, {}
    for k, name in enumerate(small_names):
        own = scores[0].get(name)
        if own is None or not len(own):
            continue
        per_case = own[:, list(thresholds).index(pipeline_thresholds[k])]
        pipeline = float(np.mean(per_case))
        scored, columns = [], []
        for candidate in scores:
            means = np.mean(candidate[name], axis=0)
            t = max(range(len(thresholds)), key=lambda i: (means[i], -abs(thresholds[i] - 0.5)))
            scored.append((float(means[t]), float(thresholds[t])))
            columns.append(candidate[name][:, t])
        best = max(range(len(scored)), key=lambda c: (scored[c][0], -c))
        better, error = clearly_better(columns[best], per_case, margin)
        report[name] = {"pipeline": round(pipeline, 4), "cases": len(own), "gain_standard_error": round(error, 4),
                        "candidates": [{"dice": round(d, 4), "threshold": t} for d, t in scored]}
        if better:
            chosen[name] = (best, scored[best][1])
            report[name]["chosen"] = best
    return chosen, report


def clearly_better(candidate: np.ndarray, baseline: np.ndarray, margin: float) -> Tuple[bool, float]:
    """Whether per-case scores ``candidate`` beat ``baseline`` (same cases)
    on the mean by more than ``margin`` and by more than twice the standard
    error of the per-case differences; returns that and the standard error."""
    gains = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    error = float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("inf")
    return bool(len(gains) and float(np.mean(gains)) > max(margin, 2.0 * error)), error


def choose_snet_small(branch: Sequence[Tuple[np.ndarray, np.ndarray]], snet: Sequence[Tuple[np.ndarray, np.ndarray]],
                      organs: OrganSet, margin: float = 0.01) -> Tuple[Tuple[str, ...], Dict[str, dict]]:
    """The small organs to draw with S-Net's own contour rather than the
    small-organ branch's. ``branch`` and ``snet``: per validation case
    (predicted labels, true labels) on the model grid, from the whole
    FocusNetv2 and from S-Net alone. Each organ's mask is compared after
    its largest component and hole filling (what post-processing can make
    of either), by Dice per case where the organ is present; S-Net is taken
    only where it beats the branch by more than ``margin`` and twice the
    standard error of the per-case differences (the paper's branch is the
    default; leaving it needs evidence). Returns the names in
    ``organs.small_names`` order and, per organ, both mean Dice values."""
    chosen, report = [], {}
    for name, label in zip(organs.small_names, organs.small_labels):
        rows = [(b, s, t == label) for (b, t), (s, _) in zip(branch, snet) if (t == label).any()]
        if not rows:
            continue
        scores = [[dice(fill_holes(largest_component(p == label)), truth) for p in (b, s)] for b, s, truth in rows]
        ours, theirs = np.asarray(scores).T
        better, error = clearly_better(theirs, ours, margin)
        report[name] = {"branch": round(float(ours.mean()), 4), "snet": round(float(theirs.mean()), 4),
                        "cases": len(rows), "gain_standard_error": round(error, 4), "snet_chosen": better}
        if better:
            chosen.append(name)
    return tuple(chosen), report
