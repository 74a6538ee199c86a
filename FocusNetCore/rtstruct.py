"""DICOM RT Structure Sets: export of label images to planning systems and
import of a department's contours for training (pydicom).

Export writes one ROI per organ with its TG-263 name, catalogue colour, RT
ROI Interpreted Type ORGAN and SNOMED CT code; closed planar contours on each
CT slice in patient coordinates (every island and every hole its own
contour, as planning systems expect, holes resolved by the even-odd rule);
each contour references its CT image; the structure set references the CT
series, study and Frame of Reference; patient and study attributes are
copied from the CT; UIDs are new.

Import rasterises contours onto the CT grid with the even-odd rule and
matches ROI names to the organ catalogue, common synonyms included
("BrainStem", "Parotid Lt", "L_Parotid", "Chiasm", "Cochlea_L", ...).
"""
from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .imageio import ImageReadError, PathLike, sorted_slices, atomic_output, scan_dicom_folder
from .organs import CATALOGUE, OrganSet

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# ROI Generation Algorithm (3006,0036), PS3.3 C.8.8.5: the defined terms.
ROI_GENERATION_ALGORITHMS = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


# --------------------------------------------------------------------------
# ROI names
# --------------------------------------------------------------------------

_BASES = {
    "parotid": "Parotid", "parotidgland": "Parotid", "eye": "Eye", "globe": "Eye", "eyeball": "Eye",
    "lens": "Lens", "opticnerve": "OpticNrv", "opticnrv": "OpticNrv", "on": "OpticNrv", "nerveoptic": "OpticNrv",
    "chiasm": "OpticChiasm", "opticchiasm": "OpticChiasm", "chiasma": "OpticChiasm", "pituitary": "Pituitary",
    "hypophysis": "Pituitary", "brainstem": "Brainstem", "spinalcord": "SpinalCord", "cord": "SpinalCord",
    "temporallobe": "Lobe_Temporal", "lobetemporal": "Lobe_Temporal", "temporal": "Lobe_Temporal",
    "innerear": "Ear_Internal", "earinternal": "Ear_Internal", "cochlea": "Ear_Internal",
    "middleear": "Ear_Middle", "earmiddle": "Ear_Middle", "midear": "Ear_Middle", "tmj": "Joint_TM",
    "jointtm": "Joint_TM", "temporomandibularjoint": "Joint_TM", "mandible": "Bone_Mandible",
    "bonemandible": "Bone_Mandible", "submandibular": "Glnd_Submand", "submandibulargland": "Glnd_Submand",
    "glndsubmand": "Glnd_Submand", "smg": "Glnd_Submand",
}
_LEFT, _RIGHT = {"l", "lt", "left"}, {"r", "rt", "right"}


def match_roi_name(name: str) -> Optional[str]:
    """Catalogue name for a structure name, or None. TG-263 names match as they are."""
    if name in CATALOGUE:
        return name
    tokens = [t.lower() for t in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)]
    side = None
    if tokens and tokens[0] in _LEFT | _RIGHT:
        side, tokens = tokens[0], tokens[1:]
    elif tokens and tokens[-1] in _LEFT | _RIGHT:
        side, tokens = tokens[-1], tokens[:-1]
    base = _BASES.get("".join(tokens))
    if base is None:
        return None
    if side is None:
        return base if base in CATALOGUE else None
    candidate = f"{base}_{'L' if side in _LEFT else 'R'}"
    return candidate if candidate in CATALOGUE else None


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

def _ct_series(ct_folder: PathLike, pixels: bool = False):
    """The CT series' slices (headers only, unless ``pixels``) in the order SimpleITK reads them."""
    import pydicom

    found = [s for s in scan_dicom_folder(ct_folder).values() if s.modality == "CT"]
    if len(found) != 1:
        raise ImageReadError(ct_folder, f"expected one CT series, found {len(found)}")
    files, _ = sorted_slices(Path(ct_folder), found[0])
    return [pydicom.dcmread(f, stop_before_pixels=not pixels) for f in files]


def mask_contours(mask2d: np.ndarray) -> List[np.ndarray]:
    """Closed contours (each (N, 2) in (column, row) pixel coordinates) around
    the pixels of a 2-D mask, half-way between inside and outside pixel
    centres; islands and holes each give their own contour."""
    import contourpy

    padded = np.pad(mask2d.astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    lines = generator.lines(0.5)
    out = []
    for line in lines:
        points = np.asarray(line) - 1.0  # undo the padding
        if len(points) > 1 and np.allclose(points[0], points[-1]):
            points = points[:-1]  # DICOM closed contours do not repeat the first point
        if len(points) >= 3:
            out.append(points)
    return out


def _on_series_grid(labels: sitk.Image, ct_folder: PathLike) -> sitk.Image:
    """The labels on the grid SimpleITK reads the series on (slices in the
    series' order). A label image stored with flipped or permuted axes of
    the same lattice is reordered; anything else is refused."""
    from .imageio import describe_grid_difference, read_dicom_series, same_grid

    ct = read_dicom_series(ct_folder)
    if same_grid(labels, ct, tolerance=1e-3):
        out = sitk.Image(labels)
        out.CopyInformation(ct)
        return out
    moved = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    before = np.bincount(sitk.GetArrayViewFromImage(labels).ravel())
    after = np.bincount(sitk.GetArrayViewFromImage(moved).ravel(), minlength=len(before))
    if not np.array_equal(before, after[: len(before)]) or after[len(before):].any():
        raise ValueError(f"the label image is not on the grid of the CT series in {ct_folder}: "
                         + describe_grid_difference(labels, ct))
    return moved


def write_rtstruct(labels: sitk.Image, ct_folder: PathLike, organs: OrganSet, path: PathLike,
                   overwrite: bool = False, label: str = "FocusNet", series_description: str = "FocusNet OARs",
                   algorithm_types: Optional[Dict[str, str]] = None, series_uid: Optional[str] = None,
                   instance_number: int = 1) -> Path:
    """Write ``labels`` (on the CT series' grid) as an RT Structure Set.
    ``algorithm_types``: each organ's ROI Generation Algorithm (AUTOMATIC,
    SEMIAUTOMATIC once a reviewer edited it, MANUAL when drawn by hand);
    AUTOMATIC where not given (the model's own contours). ``series_uid``: a
    new version of an earlier result goes into that result's series (a new
    SOP Instance UID, ``instance_number`` counting the versions), so a
    planning system sees one series whose latest instance replaces the
    earlier; default a new series."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    from .dicom import new_dataset, save_dicom

    slices = _ct_series(ct_folder)
    labels = _on_series_grid(labels, ct_folder)
    array = sitk.GetArrayViewFromImage(labels)
    first = slices[0]
    now = datetime.datetime.now()
    ds = new_dataset(RT_STRUCTURE_SET_STORAGE)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"):
        setattr(ds, keyword, getattr(first, keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = int(instance_number)
    ds.SeriesNumber = 901
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    ds.Manufacturer = "FocusNet"
    ds.ManufacturerModelName = "FocusNetv2"
    ds.StructureSetLabel = label
    ds.StructureSetName = label
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    frame_uid = first.FrameOfReferenceUID
    ds.FrameOfReferenceUID = frame_uid  # the Frame of Reference module: the CT's
    ds.PositionReferenceIndicator = getattr(first, "PositionReferenceIndicator", "")

    def image_ref(s):
        item = Dataset()
        item.ReferencedSOPClassUID = s.SOPClassUID
        item.ReferencedSOPInstanceUID = s.SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = Sequence([image_ref(s) for s in slices])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    rois, contours, observations = [], [], []
    for number, name in enumerate(organs.names, start=1):
        value = organs.label_of(name)
        organ = CATALOGUE[name]
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = name
        roi.ROIDescription = organ.display_name
        kind = (algorithm_types or {}).get(name, "AUTOMATIC")
        if kind not in ROI_GENERATION_ALGORITHMS:
            raise ValueError(f"ROI generation algorithm of {name}: {kind!r} is not one of {ROI_GENERATION_ALGORITHMS}")
        roi.ROIGenerationAlgorithm = kind
        rois.append(roi)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(organ.color)
        roi_contour.ReferencedROINumber = number
        items = []
        for k in np.nonzero((array == value).any(axis=(1, 2)))[0]:
            for points in mask_contours(array[k] == value):
                physical = [labels.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(k)))
                            for x, y in points]
                item = Dataset()
                item.ContourImageSequence = Sequence([image_ref(slices[k])])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(physical)
                item.ContourData = [f"{c:.3f}" for p in physical for c in p]
                items.append(item)
        if items:  # an organ not found has no ContourSequence (an empty one is invalid: 1-n items)
            roi_contour.ContourSequence = Sequence(items)
        contours.append(roi_contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = organ.snomed_code, "SCT", organ.snomed_meaning
        obs.RTROIIdentificationCodeSequence = Sequence([code])
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    with atomic_output(Path(path), overwrite) as tmp:
        save_dicom(ds, tmp)
    return Path(path)


# --------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------

def polygon_mask(vertices: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """The voxels of a (rows, columns) slice whose centres lie inside a closed
    polygon given as (column, row) continuous indices, by the even-odd rule
    along each row (numpy only: Slicer's Python has no matplotlib). A centre
    on a left edge is inside, on a right edge outside."""
    mask = np.zeros(shape, bool)
    x, y = np.asarray(vertices[:, 0], float), np.asarray(vertices[:, 1], float)
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    rows = np.arange(max(int(np.ceil(y.min())), 0), min(int(np.floor(y.max())), shape[0] - 1) + 1)
    for row in rows:
        crossing = (y > row) != (y2 > row)  # half-open: a vertex on the row counts once
        if not crossing.any():
            continue
        t = (row - y[crossing]) / (y2[crossing] - y[crossing])
        xs = np.sort(x[crossing] + t * (x2[crossing] - x[crossing]))
        for start, stop in zip(xs[0::2], xs[1::2]):
            first, last = max(int(np.ceil(start)), 0), min(int(np.ceil(stop)), shape[1])
            if first < last:
                mask[row, first:last] = True
    return mask


def read_rtstruct(path: PathLike, ct: sitk.Image, ct_folder: PathLike, organs: OrganSet
                  ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Rasterise an RT Structure Set onto the CT grid: (labels (z, y, x) in
    ``organs``, present flags, ROI names that matched no organ)."""
    import pydicom

    ds = pydicom.dcmread(path)
    if getattr(ds, "Modality", "") != "RTSTRUCT":
        raise ImageReadError(path, f"not an RT Structure Set (modality {getattr(ds, 'Modality', '?')})")
    slices = _ct_series(ct_folder)
    frame_uid = slices[0].FrameOfReferenceUID
    referenced = {str(f.FrameOfReferenceUID) for f in getattr(ds, "ReferencedFrameOfReferenceSequence", [])}
    referenced |= {str(r.ReferencedFrameOfReferenceUID) for r in ds.StructureSetROISequence
                   if "ReferencedFrameOfReferenceUID" in r}
    if frame_uid not in referenced:
        raise ImageReadError(path, f"its Frame of Reference ({', '.join(sorted(referenced)) or 'none'}) is not "
                             f"the CT's ({frame_uid}): the contours belong to another scan")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    shape = tuple(reversed(ct.GetSize()))
    labels = np.zeros(shape, np.uint8)
    present = np.zeros(organs.num_classes, bool)
    present[0] = True
    unmatched = []
    for roi in getattr(ds, "ROIContourSequence", []):
        name = names.get(int(roi.ReferencedROINumber), "")
        organ = match_roi_name(name)
        if organ is None or organ not in organs.names:
            unmatched.append(name)
            continue
        value = organs.label_of(organ)
        slice_masks: Dict[int, np.ndarray] = {}
        for contour in getattr(roi, "ContourSequence", []):
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            index = np.array([ct.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
            k = int(round(float(np.median(index[:, 2]))))
            if not 0 <= k < shape[0]:
                continue
            mask = slice_masks.setdefault(k, np.zeros(shape[1:], bool))
            mask ^= polygon_mask(index[:, :2], shape[1:])  # even-odd: holes cancel
        for k, mask in slice_masks.items():
            labels[k][mask] = value
        if slice_masks:
            present[value] = True
    return labels, present, unmatched
