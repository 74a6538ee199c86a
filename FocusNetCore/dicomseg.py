"""Writing a label map as a DICOM Segmentation (SEG) with highdicom.

The SEG references the CT series it was made on (its frames are the CT's
slices, in the series' order), has one segment per organ that has a contour
(empty organs are left out), each with its SNOMED CT category, type and
type modifiers (laterality; inner/middle for the ears), algorithm type
AUTOMATIC (or what the caller says, e.g. SEMIAUTOMATIC for reviewed
contours, MANUAL for a manual baseline) and the model's name and version.

highdicom is the field's maintained SEG library; 0.22 is the last release
for pydicom 2.4 (what 3D Slicer 5.8 and 5.10 ship), later ones need
pydicom 3, and this module works with both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from . import __version__
from .imageio import PathLike, atomic_output
from .organs import ANATOMICAL_STRUCTURE, CATALOGUE, OrganSet

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def segment_descriptions(names: List[str], algorithm_types: Dict[str, str], model_name: str,
                         model_version: str) -> list:
    """One highdicom SegmentDescription per organ, numbered from 1 in order."""
    import highdicom as hd
    from pydicom.sequence import Sequence
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=model_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for number, name in enumerate(names, start=1):
        organ = CATALOGUE[name]
        kind = algorithm_types.get(name, "AUTOMATIC")
        if kind not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm type of {name} must be one of {ALGORITHM_TYPES}, got {kind!r}")
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=_code(*ANATOMICAL_STRUCTURE),
            segmented_property_type=_code(organ.snomed_code, organ.snomed_meaning),
            algorithm_type=getattr(hd.seg.SegmentAlgorithmTypeValues, kind),
            algorithm_identification=None if kind == "MANUAL" else algorithm,
            tracking_uid=hd.UID(), tracking_id=name)
        modifiers = [m for m in (organ.modifier, organ.laterality_code) if m]
        if modifiers:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
                Sequence([_code(*m) for m in modifiers])
        description.SegmentDescription = organ.display_name
        description.RecommendedDisplayCIELabValue = _cielab(organ.color)
        out.append(description)
    return out


def _cielab(rgb) -> List[int]:
    """sRGB (0-255) to DICOM's scaled CIELab (0-65535), as Slicer's SEG export writes colours."""
    c = np.asarray(rgb, float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    lab = np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    scaled = [lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255]
    return [int(np.clip(round(v), 0, 65535)) for v in scaled]


def write_dicom_seg(labels: sitk.Image, ct_folder: PathLike, organs: OrganSet, path: PathLike,
                    overwrite: bool = False, algorithm_types: Optional[Dict[str, str]] = None,
                    model_name: str = "FocusNetv2", model_version: str = __version__,
                    series_description: str = "FocusNet OARs", series_uid: Optional[str] = None,
                    instance_number: int = 1) -> Path:
    """Write ``labels`` (on the CT series' grid; label values are ``organs``')
    as a DICOM SEG referencing the series in ``ct_folder``. Organs with no
    voxel are left out; a label map with no organ at all is refused."""
    import highdicom as hd

    from .rtstruct import _ct_series, _on_series_grid

    sources = _ct_series(ct_folder, pixels=True)
    array = sitk.GetArrayFromImage(_on_series_grid(labels, ct_folder))  # (slices in series order, rows, columns)
    names = [n for n in organs.names if np.any(array == organs.label_of(n))]
    if not names:
        raise ValueError("no organ has a contour: a DICOM SEG needs at least one segment")
    segment_map = np.zeros(array.shape, np.uint8)  # segment numbers 1..len(names), in order
    for number, name in enumerate(names, start=1):
        segment_map[array == organs.label_of(name)] = number
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(names, algorithm_types or {}, model_name, model_version),
        series_instance_uid=series_uid or hd.UID(), series_number=902, sop_instance_uid=hd.UID(),
        instance_number=int(instance_number),
        manufacturer="FocusNet", manufacturer_model_name=model_name, software_versions=str(model_version),
        device_serial_number="0", series_description=series_description,
        content_label="FOCUSNET", content_creator_name=None)
    for keyword in ("StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if not getattr(seg, keyword, None) and getattr(first, keyword, None):
            setattr(seg, keyword, getattr(first, keyword))
    from .dicom import save_dicom

    with atomic_output(Path(path), overwrite) as tmp:
        save_dicom(seg, tmp)
    return Path(path)


def read_dicom_seg(path: PathLike, organs: OrganSet, reference: sitk.Image) -> sitk.Image:
    """A SEG's segments as a label image on ``reference``'s grid (the CT
    series' as SimpleITK reads it), each segment's label by its name."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    labels_by_number = {int(s.SegmentNumber): organs.label_of(s.SegmentLabel) for s in ds.SegmentSequence}
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        index = reference.TransformPhysicalPointToIndex(position)  # the frame's first pixel: its slice
        out[index[2]][frame > 0] = labels_by_number[number]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image
