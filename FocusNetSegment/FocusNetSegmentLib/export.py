"""Exporting a reviewed segmentation: ``.seg.nrrd`` (Slicer's own writer),
NIfTI label map with a label table, and RTSTRUCT and DICOM SEG (the core's
writers, when the CT came from a DICOM series; the module prefers SlicerRT
and Slicer's SEG plugin when they are installed). No file is ever replaced: an existing name gets a numbered
sibling instead.
"""
from __future__ import annotations

from pathlib import Path

from FocusNetCore.imageio import write_image
from FocusNetCore.organs import OrganSet
from FocusNetCore.segfile import write_label_table

from .scene import export_labels, save_segmentation


def free_path(path) -> Path:
    """``path``, or ``name (2).ext``, ``name (3).ext``... if it exists."""
    path = Path(path)
    if not path.exists():
        return path
    name = path.name
    stem, suffix = name, ""
    for ending in (".seg.nrrd", ".rtstruct.dcm", ".seg.dcm", ".nii.gz", ".nrrd", ".dcm", ".json"):
        if name.endswith(ending):
            stem, suffix = name[: -len(ending)], ending
            break
    k = 2
    while (path.parent / f"{stem} ({k}){suffix}").exists():
        k += 1
    return path.parent / f"{stem} ({k}){suffix}"


def export_seg_nrrd(scene, segmentation_node, path) -> Path:
    target = free_path(path)
    save_segmentation(scene, segmentation_node, target)
    return target


def export_nifti(scene, segmentation_node, reference_volume, organs: OrganSet, path) -> Path:
    target = free_path(path)
    labels = export_labels(scene, segmentation_node, reference_volume, organs)
    write_image(labels, target)
    write_label_table(organs, free_path(target.with_name(target.name.split(".")[0] + ".labels.json")))
    return target


def export_dicom_seg(scene, segmentation_node, reference_volume, organs: OrganSet, ct_series_folder, path,
                     algorithm_types=None, model: dict = None, labels=None) -> Path:
    """``labels``: the contours already read from the scene (then this runs
    no MRML and may run on a worker thread)."""
    from FocusNetCore.dicomseg import write_dicom_seg

    model = model or {}
    target = free_path(path)
    if labels is None:
        labels = export_labels(scene, segmentation_node, reference_volume, organs)
    write_dicom_seg(labels, ct_series_folder, organs, target, algorithm_types=algorithm_types,
                    model_name=model.get("name") or "FocusNetv2", model_version=model.get("code_version") or "")
    return target


def export_rtstruct(scene, segmentation_node, reference_volume, organs: OrganSet, ct_series_folder, path,
                    labels=None, algorithm_types=None) -> Path:
    """``labels`` as for :func:`export_dicom_seg`."""
    from FocusNetCore.rtstruct import write_rtstruct

    target = free_path(path)
    if labels is None:
        labels = export_labels(scene, segmentation_node, reference_volume, organs)
    write_rtstruct(labels, ct_series_folder, organs, target, algorithm_types=algorithm_types)
    return target
