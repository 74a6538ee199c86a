"""Organs the scan does not hold: judged from where the found organs are.

A CT rarely covers the whole head and neck: it may stop at the orbits or
start below the skull base, and a short series (5 slices) holds only one
level. The network still answers for every organ, and an organ it draws in
a scan that cannot hold it (both eyes in five slices through the mandible)
is a contour the planning system would take as real. So, after the
segmentation, each organ is judged from the others:

- an *anatomy prior* holds, per organ, its superior-inferior half-height and
  the offset of its centre from every other organ's centre (mean and
  standard deviation, in mm, over the training cases' labels: the bundle's
  ``anatomy``, written by ``focusnet train``; :func:`prior_from_cases`);
- every organ found in the scan is an *anchor*: where it lies bounds where
  each other organ can lie. An anchor wholly inside the scan gives its
  centre; one cut by the first or last slice gives an interval for it;
- an organ is *outside the field of view* when most anchors (at least two)
  put its whole extent, widened by ``K_SD`` standard deviations, beyond the
  scan's first or last slice. It is then not drawn, and the report says so;
- an organ drawn where most anchors say no part of it can be (a mandible
  near the vertex) is not that organ: removed, and reported outside the
  field of view when its centre lies beyond the scan, else *misplaced*
  (left to the reviewer as missing);
- not judged: a speck of an organ drawn near the scan's end where the
  anchors cannot tell whether its tip reaches in (an eye's slice at the top
  of a scan that stops just below the orbits). A rule for those (a speck
  whose centre lies beyond the end) was measured and dropped: on cut
  phantoms it also removed true tips of the temporal lobes.

An organ cut by the scan's end is kept: it is drawn inside the scan, where
the network drew it. With no prior (a bundle trained before this), nothing
is judged and the report says that.

Coordinates: the patient's superior direction (LPS +z), in mm, of voxel
centres; a slice is ``slice_mm`` thick around its centre.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .organs import CATALOGUE, OrganSet

K_SD = 3.0  # how far from the prior's mean an organ's centre may lie, in its standard deviations
MIN_SD_MM = 4.0  # a prior from few or alike cases claims no more certainty than this
K_HALF, MIN_HALF_SD_MM = 3.0, 4.0  # likewise for an organ's half-height
MIN_ANCHORS = 2
# An anchor much smaller than the organ can be (a few voxels the network put
# somewhere) says little about where the anatomy is.
ANCHOR_MIN_FRACTION = 0.2
PHANTOM_PRIOR = Path(__file__).with_name("models") / "focusnet-phantom-cpu.anatomy.json"


@dataclass
class Extent:
    low: float  # mm, inferior end (voxel centres)
    high: float  # mm, superior end
    voxels: int
    volume_cc: float


def _axis_z(image: sitk.Image) -> np.ndarray:
    """The superior coordinate (mm) of each voxel index along each axis:
    z = origin_z + sum_j direction[2, j] * spacing_j * index_j."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction[2] * np.asarray(image.GetSpacing(), dtype=float)


def scan_range(image: sitk.Image) -> Tuple[float, float]:
    """The superior coordinates (mm) of the scan's lowest and highest voxel centres."""
    steps = _axis_z(image)
    size = np.asarray(image.GetSize()) - 1
    z0 = float(image.GetOrigin()[2])
    corners = [z0 + float(np.dot(steps, size * np.asarray(c))) for c in np.ndindex(2, 2, 2)]
    return min(corners), max(corners)


def slice_mm(image: sitk.Image) -> float:
    """The distance between slices along the superior axis."""
    return float(np.max(np.abs(_axis_z(image))))


def extents(labels: sitk.Image, organs: OrganSet) -> Dict[str, Extent]:
    """Each drawn organ's superior-inferior extent (voxel centres, mm)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    steps = _axis_z(labels)
    z0 = float(labels.GetOrigin()[2])
    voxel_cc = float(np.prod(labels.GetSpacing())) / 1000.0
    found = set(stats.GetLabels())
    result = {}
    for name in organs.names:
        label = organs.label_of(name)
        if label not in found:
            continue
        box = stats.GetBoundingBox(label)  # x, y, z start, then sizes
        start, size = np.asarray(box[:3]), np.asarray(box[3:]) - 1
        corners = [z0 + float(np.dot(steps, start + size * np.asarray(c))) for c in np.ndindex(2, 2, 2)]
        count = int(stats.GetNumberOfPixels(label))
        result[name] = Extent(min(corners), max(corners), count, count * voxel_cc)
    return result


def prior_from_cases(cases: Iterable[sitk.Image], organs: OrganSet) -> dict:
    """The anatomy prior of a set of label images (training cases' truth):
    per organ its half-height, per pair of organs the offset of one centre
    from the other (mean, standard deviation, cases), all in mm; an organ
    cut by a case's first or last slice is left out of that case."""
    heights: Dict[str, List[float]] = {n: [] for n in organs.names}
    offsets: Dict[str, Dict[str, List[float]]] = {n: {m: [] for m in organs.names if m != n} for n in organs.names}
    count = 0
    for labels in cases:
        count += 1
        scan, tolerance = scan_range(labels), slice_mm(labels) / 2
        # An organ the case's scan cuts (the spinal cord, always) tells neither its height nor its centre.
        found = {n: e for n, e in extents(labels, organs).items()
                 if e.low > scan[0] + tolerance and e.high < scan[1] - tolerance}
        centres = {n: (e.low + e.high) / 2 for n, e in found.items()}
        for n, e in found.items():
            heights[n].append((e.high - e.low) / 2)
            for m, c in centres.items():
                if m != n:
                    offsets[n][m].append(centres[n] - c)

    def summary(values):
        return [round(float(np.mean(values)), 2), round(float(np.std(values)), 2), len(values)]

    return {"cases": count, "organ_set": organs.key,
            "half_height_mm": {n: summary(v) for n, v in heights.items() if v},
            "offset_mm": {n: {m: summary(v) for m, v in row.items() if v} for n, row in offsets.items()}}


def phantom_prior() -> dict:
    """The prior of the phantoms the embedded model was trained on."""
    return json.loads(PHANTOM_PRIOR.read_text())


@dataclass
class Judgement:
    outside: List[str]  # organs judged outside the field of view (removed when drawn)
    removed: List[str]  # the organs the network had drawn and that are removed (outside or misplaced)
    anchors: List[str]
    note: str = ""
    # drawn where the other organs say they cannot be, though they may be in the scan: removed, left
    # for the reviewer as missing
    misplaced: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"outside": self.outside, "removed": self.removed, "anchors": self.anchors, "note": self.note,
                "misplaced": self.misplaced}


def _sd(value: float) -> float:
    return max(float(value), MIN_SD_MM)


def _centre_interval(name: str, extent: Extent, scan: Tuple[float, float], tolerance: float,
                     prior: dict) -> Optional[Tuple[float, float]]:
    """Where an anchor's centre can be: its own centre when it lies wholly
    inside the scan, else an interval from its half-height in the prior."""
    mean, sd, _ = prior["half_height_mm"].get(name, (None, None, 0))
    cut_low = extent.low <= scan[0] + tolerance
    cut_high = extent.high >= scan[1] - tolerance
    if not cut_low and not cut_high:
        centre = (extent.low + extent.high) / 2
        return centre, centre
    if mean is None:
        return None
    longest = mean + K_HALF * max(float(sd), MIN_HALF_SD_MM)
    shortest = max(0.0, mean - K_HALF * max(float(sd), MIN_HALF_SD_MM))
    if cut_low and cut_high:  # it spans the scan: its centre within its half-height of both ends
        low, high = scan[1] - longest, scan[0] + longest
        return (low, high) if low <= high else None
    if cut_low:  # its superior end is seen
        return extent.high - longest, extent.high - shortest
    return extent.low + shortest, extent.low + longest


def _majority(votes: int, yes: int) -> bool:
    return votes >= MIN_ANCHORS and yes >= MIN_ANCHORS and 2 * yes > votes


def judge(labels: sitk.Image, organs: OrganSet, prior: Optional[dict]) -> Judgement:
    """Which organs the scan cannot hold, and which the network drew where
    they cannot be (see the module's docstring)."""
    if not prior or not prior.get("offset_mm"):
        return Judgement([], [], [], "no anatomy prior in the model: organs outside the field of view not judged")
    scan = scan_range(labels)
    tolerance = slice_mm(labels) / 2
    found = extents(labels, organs)
    anchors = {}
    for name, extent in found.items():
        low_cc = CATALOGUE[name].volume_cc[0]
        whole = extent.low > scan[0] + tolerance and extent.high < scan[1] - tolerance
        if not whole and extent.volume_cc < ANCHOR_MIN_FRACTION * low_cc:
            continue
        interval = _centre_interval(name, extent, scan, tolerance, prior)
        if interval is not None:  # a cut anchor's centre: the middle of where it can be
            anchors[name] = (interval[0] + interval[1]) / 2
    outside, misplaced = [], []
    for name in organs.names:
        half = prior["half_height_mm"].get(name)
        row = prior["offset_mm"].get(name, {})
        if half is None:
            continue
        reach = half[0] + K_HALF * max(float(half[1]), MIN_HALF_SD_MM)  # how far from its centre it reaches
        drawn = found.get(name)
        votes = beyond = centre_beyond = elsewhere = 0
        for anchor, at in anchors.items():
            if anchor == name or anchor not in row:
                continue
            mean, sd, _ = row[anchor]
            centre = (at + mean - K_SD * _sd(sd), at + mean + K_SD * _sd(sd))  # where its centre can be
            reaches = (centre[0] - reach, centre[1] + reach)  # where any of it can be
            votes += 1
            beyond += reaches[1] < scan[0] - tolerance or reaches[0] > scan[1] + tolerance
            centre_beyond += centre[1] < scan[0] - tolerance or centre[0] > scan[1] + tolerance
            if drawn is not None:
                elsewhere += reaches[1] < drawn.low - tolerance or reaches[0] > drawn.high + tolerance
        if _majority(votes, beyond):
            outside.append(name)
        elif drawn is not None and _majority(votes, elsewhere):
            # drawn where it cannot be (a mandible near the vertex): not this organ
            (outside if _majority(votes, centre_beyond) else misplaced).append(name)
    removed = [n for n in outside + misplaced if n in found]
    return Judgement(outside, removed, sorted(anchors), misplaced=misplaced)


def remove(labels: sitk.Image, organs: OrganSet, names: Sequence[str]) -> sitk.Image:
    """``labels`` without the organs named (a new image, same geometry)."""
    if not names:
        return labels
    array = sitk.GetArrayFromImage(labels)
    array[np.isin(array, [organs.label_of(n) for n in names])] = 0
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(labels)
    return result

