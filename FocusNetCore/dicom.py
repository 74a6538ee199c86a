"""Writing a CT volume as a DICOM CT series with pydicom.

Used by the phantom (``--format dicom``) and by tests of the DICOM readers.
Geometry: ImagePositionPatient of each slice is the physical position of its
first voxel, ImageOrientationPatient the first two columns of the image's
direction matrix, so any SimpleITK image (flipped, permuted or oblique)
round-trips through DICOM with origin, spacing and direction intact.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .imageio import PathLike

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Stored values are HU - intercept, so air (-1024) is stored as 0.
RESCALE_INTERCEPT = -1024.0


def save_dicom(ds, path) -> None:
    """Write ``ds`` as a DICOM Part 10 file (preamble, file meta) with pydicom
    2.4 (what 3D Slicer 5.8 and 5.10 ship) and 3.x alike: 3.x spells it
    ``enforce_file_format=True``, 2.4 ``write_like_original=False``."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def ds_values(values):
    """Numbers as DICOM decimal strings (at most 16 characters each, as
    many significant digits as fit): "-95.33545175992099" is invalid DS."""
    from pydicom.valuerep import format_number_as_ds

    return [format_number_as_ds(float(v)) for v in values]


def new_dataset(sop_class_uid: str):
    """A dataset with its file meta information and a new SOP Instance UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def write_ct_series(image: sitk.Image, folder: PathLike, patient_id: str = "PHANTOM",
                    patient_name: str = "Phantom^Synthetic", study_uid: Optional[str] = None,
                    series_description: str = "FocusNet synthetic CT", modality: str = "CT",
                    series_uid: Optional[str] = None, frame_of_reference_uid: Optional[str] = None) -> Path:
    """Write ``image`` (HU) as one file per slice into ``folder``; returns the folder."""
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    stored = np.clip(np.round(array - RESCALE_INTERCEPT), -32768, 32767).astype(np.int16)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    now = datetime.datetime.now()
    for k in range(array.shape[0]):
        ds = new_dataset(CT_IMAGE_STORAGE)
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = modality
        ds.Manufacturer = "FocusNet phantom"
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = ds_values(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImageOrientationPatient = ds_values((*direction[:, 0], *direction[:, 1]))
        ds.PixelSpacing = ds_values((spacing[1], spacing[0]))  # row spacing, column spacing
        ds.SliceThickness = ds_values((spacing[2],))[0]
        ds.AcquisitionNumber = 1
        # Laterality (Type 2C) stays absent: required for paired body parts, and the head is not one.
        ds.BodyPartExamined = "HEAD"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.PixelData = stored[k].tobytes()
        save_dicom(ds, folder / f"CT{k + 1:04d}.dcm")
    return folder
