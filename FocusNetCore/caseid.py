"""What a case is: one identity per CT, checked wherever contours meet a CT.

A case is identified by what it is, not where it lies:

- a DICOM CT series by the SOP Instance UIDs of its images (what Slicer's
  DICOM loader records in ``DICOM.instanceUIDs``), carrying its Study and
  Series Instance UIDs and Frame of Reference for messages and checks;
- any other volume by its voxels and geometry (size, origin, spacing,
  direction), so two copies of one scan are one case and two different scans
  that happen to share a file or folder name are two.

The review station, the Slicer module, the DICOM node and the study report
all use :func:`identity_of_input` / :func:`identity_of_image` /
:func:`identity_of_instances`; files a review writes carry the identity in
their name (:attr:`CaseIdentity.tag`) and in their header
(:data:`HEADER_KEY`) or report (``"case"``), and every load of contours
checks it with :func:`check_same_case`, refusing another case's contours with
a message naming both.

No torch here: the Slicer process imports this module.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import SimpleITK as sitk

from .imageio import ImageReadError, PathLike
from .study import case_id as hashed_case_id

# The header field (NRRD key/value) that binds a label map to its CT.
HEADER_KEY = "FocusNet_CaseUID"


class CaseMismatchError(ValueError):
    """Contours of one case offered for another's CT."""


@dataclass(frozen=True)
class CaseIdentity:
    uid: str  # "dicom:<sha1 of the sorted SOP Instance UIDs>" or "voxels:<sha1 of voxels and geometry>"
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""

    @property
    def case_id(self) -> str:
        """The study log's hashed case id (no patient identifiers)."""
        return hashed_case_id(self.uid)

    @property
    def tag(self) -> str:
        """What output file names carry: 8 hex digits of the case id."""
        return self.case_id[:8]

    def describe(self) -> str:
        if self.series_uid:
            return f"DICOM series {self.series_uid} (case {self.tag})"
        return f"case {self.tag} ({self.uid[:20]}...)"

    def to_dict(self) -> dict:
        return {**asdict(self), "case_id": self.case_id}

    @classmethod
    def from_dict(cls, data: dict) -> "CaseIdentity":
        return cls(**{k: str(data.get(k) or "") for k in ("uid", "study_uid", "series_uid",
                                                           "frame_of_reference_uid")})


def identity_of_instances(sop_instance_uids: Iterable[str], study_uid: str = "", series_uid: str = "",
                          frame_of_reference_uid: str = "") -> CaseIdentity:
    uids = sorted(str(u) for u in sop_instance_uids if str(u))
    if not uids:
        raise ValueError("a DICOM case needs the SOP Instance UIDs of its images")
    digest = hashlib.sha1(" ".join(uids).encode()).hexdigest()
    return CaseIdentity("dicom:" + digest, str(study_uid), str(series_uid), str(frame_of_reference_uid))


def identity_of_image(image: sitk.Image) -> CaseIdentity:
    """A volume without DICOM identifiers: its voxels and geometry."""
    digest = hashlib.sha1(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    digest.update(repr((image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())).encode())
    return CaseIdentity("voxels:" + digest.hexdigest())


def identity_of_dicom_series(folder: PathLike, series_uid: Optional[str] = None) -> CaseIdentity:
    """The identity of the CT series :func:`imageio.read_dicom_series` reads
    from ``folder`` (headers only)."""
    import pydicom

    from .imageio import choose_ct_series, scan_dicom_folder

    entry = choose_ct_series(Path(folder), scan_dicom_folder(folder), series_uid)
    sops, first = [], None
    for file in entry.files:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        first = first or ds
        sops.append(str(getattr(ds, "SOPInstanceUID", "")))
    if not all(sops):
        raise ImageReadError(folder, "a DICOM image of the CT series has no SOPInstanceUID")
    return identity_of_instances(sops, getattr(first, "StudyInstanceUID", ""), entry.series_uid,
                                 getattr(first, "FrameOfReferenceUID", ""))


def identity_of_input(path: PathLike, image: Optional[sitk.Image] = None) -> CaseIdentity:
    """A CT given as a DICOM series folder or a volume file (``image``: the
    volume already read, to spare reading it again)."""
    path = Path(path)
    if path.is_dir():
        return identity_of_dicom_series(path)
    if image is None:
        from .imageio import read_image

        image = read_image(path)
    return identity_of_image(image)


def identity_in_header(path: PathLike) -> Optional[str]:
    """The case uid a label map file carries in its header, or None."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData(HEADER_KEY) if reader.HasMetaDataKey(HEADER_KEY) else None


def stamp(image: sitk.Image, identity: CaseIdentity) -> sitk.Image:
    """``image`` with the case uid in its header (written by NRRD and MHA)."""
    image.SetMetaData(HEADER_KEY, identity.uid)
    return image


def check_same_case(expected: CaseIdentity, found_uid: Optional[str], what: PathLike) -> None:
    """Refuse contours of another case: ``found_uid`` is what ``what`` (a file)
    says it belongs to; None when it says nothing (nothing to check here)."""
    if found_uid is None or found_uid == expected.uid:
        return
    raise CaseMismatchError(
        f"{what}: these contours belong to another case (case {hashed_case_id(found_uid)[:8]}), not to this CT, "
        f"{expected.describe()}; refusing to join them. Open the contours with their own CT.")


def check_same_frame(expected: CaseIdentity, series_uid: str, frame_uid: str, what: PathLike) -> None:
    """Refuse a DICOM object (an RTSTRUCT, a SEG) that references another
    series or frame of reference than the CT's."""
    if expected.series_uid and series_uid and series_uid != expected.series_uid:
        raise CaseMismatchError(f"{what}: references the CT series {series_uid}, not this CT, "
                                f"{expected.describe()}; refusing to join them")
    if expected.frame_of_reference_uid and frame_uid and frame_uid != expected.frame_of_reference_uid:
        raise CaseMismatchError(f"{what}: is in the frame of reference {frame_uid}, not this CT's "
                                f"({expected.frame_of_reference_uid}, {expected.describe()}); refusing to join them")


def check_same_grid(reference: sitk.Image, labels: sitk.Image, what: PathLike) -> None:
    """Refuse a label map that is not on the CT's grid (after a resume, an
    autosave must be exactly on it)."""
    from .imageio import describe_grid_difference, same_grid

    if not same_grid(reference, labels, tolerance=1e-4):
        raise CaseMismatchError(f"{what}: not on this CT's grid ({describe_grid_difference(reference, labels)}); "
                                "refusing to join them")


def referenced_series(path: PathLike):
    """(series UIDs, frame of reference UIDs) an RTSTRUCT or a DICOM SEG references."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    series, frames = set(), set()
    for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", []):  # RTSTRUCT
        frames.add(str(frame.FrameOfReferenceUID))
        for study in getattr(frame, "RTReferencedStudySequence", []):
            series |= {str(s.SeriesInstanceUID) for s in getattr(study, "RTReferencedSeriesSequence", [])}
    series |= {str(s.SeriesInstanceUID) for s in getattr(ds, "ReferencedSeriesSequence", [])}  # SEG
    if getattr(ds, "Modality", "") == "SEG" and "FrameOfReferenceUID" in ds:
        frames.add(str(ds.FrameOfReferenceUID))
    return series, frames


def check_references(expected: CaseIdentity, path: PathLike) -> None:
    """Refuse an RTSTRUCT or SEG that does not reference exactly this CT's
    series and frame of reference (checked before it is sent anywhere)."""
    series, frames = referenced_series(path)
    if series != {expected.series_uid} or (expected.frame_of_reference_uid
                                           and frames != {expected.frame_of_reference_uid}):
        raise CaseMismatchError(f"{path}: references series {sorted(series)} in frames {sorted(frames)}, not only "
                                f"this CT, {expected.describe()} (frame {expected.frame_of_reference_uid})")


def stamp_nrrd_file(path: PathLike, identity_uid: str) -> None:
    """Add the case uid to a NRRD file just written by another writer
    (Slicer's segmentation storage node), as a ``key:=value`` header line;
    the file is replaced in one rename."""
    import os

    path = Path(path)
    if not identity_uid or "\n" in identity_uid:
        raise ValueError(f"not a case uid: {identity_uid!r}")
    data = path.read_bytes()
    if not data.startswith(b"NRRD"):
        raise ValueError(f"{path}: not a NRRD file")
    first = data.index(b"\n") + 1  # after the magic line; key/value lines may stand anywhere in the header
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data[:first] + f"{HEADER_KEY}:={identity_uid}\n".encode() + data[first:])
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_on_grid(reference: sitk.Image, path: PathLike) -> None:
    """Refuse a label file (a ``.seg.nrrd``, which Slicer may crop to the
    segments' extent) that does not lie on the CT's grid: the same spacing and
    direction, its first voxel on a voxel of the CT, inside the CT."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    spacing, origin = np.array(reader.GetSpacing()[:3]), np.array(reader.GetOrigin()[:3])
    direction = np.array(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3]
    size = np.array(reader.GetSize()[:3])
    problems = []
    if not np.allclose(spacing, reference.GetSpacing(), atol=1e-3):
        problems.append(f"spacing {tuple(np.round(spacing, 4))} vs the CT's {tuple(np.round(reference.GetSpacing(), 4))}")
    if not np.allclose(direction.ravel(), reference.GetDirection(), atol=1e-4):
        problems.append("another orientation (direction)")
    if not problems:
        start = np.array(reference.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in origin)))
        if not np.allclose(start, np.round(start), atol=1e-2):
            problems.append("its voxels fall between the CT's (origin off the CT's grid)")
        elif np.any(np.round(start) < 0) or np.any(np.round(start) + size > np.array(reference.GetSize())):
            problems.append(f"it reaches outside the CT (voxels {np.round(start).astype(int).tolist()} + "
                            f"{size.tolist()} of {list(reference.GetSize())})")
    if problems:
        raise CaseMismatchError(f"{path}: not on this CT's grid ({'; '.join(problems)}): these contours were drawn "
                                "on another scan; refusing to join them")
