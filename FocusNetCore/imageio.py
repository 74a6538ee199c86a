"""Reading CT volumes and writing label images with exact geometry.

Volumes are SimpleITK images throughout: their origin, spacing and direction
are the geometry contract. Readers refuse what FocusNet cannot segment
correctly (a non-CT series, a 2-D image, missing or unevenly spaced slices, an
empty file) with an :class:`ImageReadError` that names the file and the
problem. Writers are atomic (temporary file + rename) and never replace an
existing file unless asked to.

No torch here: the Slicer process imports this module.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import SimpleITK as sitk

PathLike = Union[str, os.PathLike]

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# A CT in Hounsfield units always holds air or fat somewhere in a head scan;
# a volume whose minimum stays above this is MR, PET or unrescaled raw data.
CT_MIN_HU_UPPER_BOUND = -200.0
# Relative tolerance on slice spacing before a series counts as uneven.
SLICE_SPACING_TOLERANCE = 0.01
# Scanners write ImagePositionPatient rounded, often to 0.01 mm: each position
# is then off by up to half of that, a gap by up to all of it (a 0.625 mm
# series reads 0.62-0.63 mm, 1.6 % off), which is no uneven spacing.
POSITION_ROUNDING_MM = 0.005
# Slice origins further off the slice normal than this mean a tilted gantry.
GANTRY_TILT_TOLERANCE_DEG = 0.5
# A gap this many times the usual spacing means slices are missing.
MISSING_SLICE_FACTOR = 1.5


class ImageReadError(ValueError):
    """A volume could not be used; the message names the file and the problem."""

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class OutputExistsError(FileExistsError):
    """Refusal to overwrite a file the user may have made or edited."""

    def __init__(self, path: PathLike):
        self.path = str(path)
        super().__init__(f"{path}: already exists; refusing to overwrite it "
                         "(pass overwrite=True / --overwrite to replace it)")


def has_volume_suffix(path: PathLike) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def _suffix(path: PathLike) -> str:
    name = str(path).lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def read_image(path: PathLike, series_uid: Optional[str] = None, check_ct: bool = True) -> sitk.Image:
    """Read a CT volume: a NRRD/NIfTI/MHA file or a folder holding a DICOM series.

    The result is a 3-D image in Hounsfield units with the file's geometry.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder")
    if path.is_dir():
        image = read_dicom_series(path, series_uid=series_uid)
    else:
        image = _read_volume_file(path)
    _check_3d(path, image)
    check_finite(path, image)
    if check_ct:
        _check_hounsfield(path, image)
    return image


def check_finite(path, image: sitk.Image) -> None:
    """Refuse a volume with NaN or infinite voxels (a damaged or mis-converted
    file): the network would turn them into contours that look like any other."""
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        # a few slices at a time: no whole-scan boolean copy of a long scan
        bad = sum(int(part.size - np.count_nonzero(np.isfinite(part))) for part in np.array_split(
            array, max(1, array.shape[0] // 16)))
        if bad:
            raise ImageReadError(path, f"{bad} of its {array.size} voxels are not finite numbers (NaN or "
                                 "infinity); the volume is damaged or was converted wrongly")


def read_label_image(path: PathLike, reference: Optional[sitk.Image] = None) -> sitk.Image:
    """Read an integer label image; if ``reference`` is given, its grid must match."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    image = _read_volume_file(path)
    _check_3d(path, image)
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise ImageReadError(path, f"label image has non-integer values (pixel type {image.GetPixelIDTypeAsString()})")
        image = sitk.Cast(image, sitk.sitkUInt16)
    if reference is not None and not same_grid(image, reference):
        raise ImageReadError(path, "label image grid differs from the CT's: "
                             + describe_grid_difference(image, reference))
    return image


def _read_volume_file(path: Path) -> sitk.Image:
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "exception" in line.lower()), "")
        raise ImageReadError(path, f"not a readable image ({detail.strip() or 'unknown format or corrupt data'})") from None


def _check_3d(path: Path, image: sitk.Image) -> None:
    size = image.GetSize()
    if image.GetDimension() != 3 or min(size) < 2:
        raise ImageReadError(path, f"expected a 3-D volume, got a {image.GetDimension()}-D image of size {size}")


def _check_hounsfield(path: Path, image: sitk.Image) -> None:
    minimum = float(sitk.GetArrayViewFromImage(image).min())
    if minimum > CT_MIN_HU_UPPER_BOUND:
        raise ImageReadError(
            path, f"does not look like a CT in Hounsfield units: its lowest value is {minimum:g}, "
            f"but a head-and-neck CT holds air (about -1000 HU); FocusNet segments CT only")


# --------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------

@dataclass
class DicomSeries:
    """One series found in a folder (headers only)."""

    series_uid: str
    modality: str
    description: str
    files: List[str]
    positions: Optional[np.ndarray] = None  # slice positions along the normal, mm

    @property
    def num_files(self) -> int:
        return len(self.files)


def scan_dicom_folder(folder: PathLike) -> Dict[str, DicomSeries]:
    """Group the DICOM files below ``folder`` by SeriesInstanceUID (headers only)."""
    import pydicom

    folder = Path(folder)
    series: Dict[str, DicomSeries] = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            file = os.path.join(root, name)
            try:
                ds = pydicom.dcmread(file, stop_before_pixels=True)
            except Exception:  # not DICOM: README, DICOMDIR, thumbnails ...
                continue
            uid = str(getattr(ds, "SeriesInstanceUID", ""))
            if not uid:
                continue
            entry = series.setdefault(uid, DicomSeries(
                uid, str(getattr(ds, "Modality", "")), str(getattr(ds, "SeriesDescription", "")), []))
            entry.files.append(file)
    return series


def sorted_slices(folder: Path, entry: DicomSeries):
    """Sort a series' files along the slice normal; return files and positions."""
    import pydicom

    records = []
    orientation = None
    for file in entry.files:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        iop = getattr(ds, "ImageOrientationPatient", None)
        ipp = getattr(ds, "ImagePositionPatient", None)
        if iop is None or ipp is None:
            raise ImageReadError(file, "DICOM slice lacks ImagePositionPatient/ImageOrientationPatient")
        iop = np.asarray([float(v) for v in iop])
        if orientation is None:
            orientation = iop
        elif not np.allclose(iop, orientation, atol=1e-4):
            raise ImageReadError(folder, f"series {entry.series_uid} mixes slice orientations")
        normal = np.cross(orientation[:3], orientation[3:])
        records.append((float(np.dot(normal, [float(v) for v in ipp])), file))
    records.sort()
    positions = np.array([p for p, _ in records])
    if len(records) > 1:
        # Gantry tilt: slice origins step off the slice normal.
        first = pydicom.dcmread(records[0][1], stop_before_pixels=True).ImagePositionPatient
        last = pydicom.dcmread(records[-1][1], stop_before_pixels=True).ImagePositionPatient
        step = np.subtract([float(v) for v in last], [float(v) for v in first])
        normal = np.cross(orientation[:3], orientation[3:])
        cosine = abs(float(np.dot(step, normal))) / (np.linalg.norm(step) + 1e-9)
        tilt = float(np.degrees(np.arccos(min(cosine, 1.0))))
        if tilt > GANTRY_TILT_TOLERANCE_DEG:
            raise ImageReadError(folder, f"the CT series was acquired with a gantry tilt of {tilt:.1f} degrees; "
                                 "resample it to an untilted grid (e.g. 3D Slicer's DICOM import with "
                                 "'acquisition geometry regularization') before segmenting")
    return [f for _, f in records], positions


def check_slice_positions(folder: PathLike, positions: np.ndarray) -> None:
    """Refuse duplicate, missing or unevenly spaced slices."""
    if len(positions) < 2:
        raise ImageReadError(folder, f"expected a 3-D volume, the CT series has {len(positions)} slice(s)")
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        raise ImageReadError(folder, "the CT series has two slices at the same position")
    usual = float(np.median(gaps))
    missing = np.nonzero(gaps > MISSING_SLICE_FACTOR * usual)[0]
    if missing.size:
        where = ", ".join(f"between {positions[i]:.2f} and {positions[i + 1]:.2f} mm" for i in missing[:3])
        count = int(sum(round(gaps[i] / usual) - 1 for i in missing))
        raise ImageReadError(folder, f"the CT series is missing about {count} slice(s) ({where}; "
                             f"usual spacing {usual:.2f} mm)")
    deviation = np.abs(gaps - usual).max()
    if deviation > max(SLICE_SPACING_TOLERANCE * usual, 2 * POSITION_ROUNDING_MM + 1e-6):
        raise ImageReadError(folder, f"the CT series is unevenly spaced: slice gaps range from "
                             f"{gaps.min():.3f} to {gaps.max():.3f} mm")


def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None) -> sitk.Image:
    """Read the CT series of a DICOM folder; rescale slope/intercept are applied.

    With several series in the folder, the CT series is chosen; two or more CT
    series are ambiguous and need ``series_uid``.
    """
    folder = Path(folder)
    chosen = choose_ct_series(folder, scan_dicom_folder(folder), series_uid)
    files, positions = sorted_slices(folder, chosen)
    check_slice_positions(folder, positions)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ImageReadError(folder, f"could not read the CT series: {str(error).strip().splitlines()[-1]}") from None
    return _narrowed(image)


def choose_ct_series(folder: Path, found: Dict[str, DicomSeries], series_uid: Optional[str] = None) -> DicomSeries:
    """The CT series of a folder (``series_uid``, or the only CT series)."""
    if not found:
        raise ImageReadError(folder, "folder holds no DICOM files")
    if series_uid is not None:
        if series_uid not in found:
            raise ImageReadError(folder, f"no series with SeriesInstanceUID {series_uid}")
        chosen = found[series_uid]
        if chosen.modality != "CT":
            raise ImageReadError(folder, f"series {series_uid} has modality {chosen.modality}, expected CT")
    else:
        cts = [s for s in found.values() if s.modality == "CT"]
        if not cts:
            kinds = ", ".join(sorted(f"{s.modality or '?'} ({s.num_files} files)" for s in found.values()))
            raise ImageReadError(folder, f"no CT series in the folder (found: {kinds}); FocusNet segments CT only")
        if len(cts) > 1:
            listing = "; ".join(f"{s.series_uid} '{s.description}' ({s.num_files} slices)" for s in cts)
            raise ImageReadError(folder, f"{len(cts)} CT series in the folder, choose one by SeriesInstanceUID: {listing}")
        chosen = cts[0]
    return chosen


def _narrowed(image: sitk.Image) -> sitk.Image:
    """GDCM returns a rescaled CT series as 32-bit integers; held in int16
    when every value fits (Hounsfield units do), it takes half the memory
    for the whole segmentation (a 480-slice 512 x 512 series: 0.25 GB)."""
    wide = (sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64, sitk.sitkUInt16)
    if image.GetPixelID() not in wide:
        return image
    array = sitk.GetArrayViewFromImage(image)
    if array.size and (int(array.min()) < -32768 or int(array.max()) > 32767):
        return image
    return sitk.Cast(image, sitk.sitkInt16)  # the geometry comes along


# --------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------

def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-5) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def describe_grid_difference(a: sitk.Image, b: sitk.Image) -> str:
    parts = []
    for what in ("Size", "Origin", "Spacing", "Direction"):
        va, vb = getattr(a, f"Get{what}")(), getattr(b, f"Get{what}")()
        if not np.allclose(va, vb, atol=1e-5):
            parts.append(f"{what.lower()} {tuple(round(v, 4) for v in va)} vs {tuple(round(v, 4) for v in vb)}")
    return "; ".join(parts) or "identical"


def label_image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label image from a (z, y, x) array on ``reference``'s grid, geometry copied exactly."""
    expected = tuple(reversed(reference.GetSize()))
    if array.shape != expected:
        raise ValueError(f"label array shape {array.shape} does not match the reference grid {expected} (z, y, x)")
    if array.max(initial=0) > 255:
        image = sitk.GetImageFromArray(array.astype(np.uint16))
    else:
        image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def atomic_output(path: PathLike, overwrite: bool = False):
    """A context manager yielding a temporary path beside ``path``; on success
    the temporary file replaces ``path`` in one rename."""
    return _AtomicOutput(Path(path), overwrite)


class _AtomicOutput:
    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.path.exists() and not self.overwrite:
            raise OutputExistsError(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = _suffix(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".tmp{suffix}", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.path.exists() and not self.overwrite:  # appeared meanwhile
                self.tmp.unlink(missing_ok=True)
                raise OutputExistsError(self.path)
            # mkstemp makes the file private (0600); outputs get the usual
            # permissions of a new file under the user's umask.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def write_image(image: sitk.Image, path: PathLike, overwrite: bool = False, compress: bool = True) -> Path:
    """Write an image atomically; refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    with atomic_output(path, overwrite) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


def write_label_image(labels: Union[np.ndarray, sitk.Image], reference: sitk.Image, path: PathLike,
                      overwrite: bool = False) -> Path:
    """Write a label image on ``reference``'s grid (origin, spacing, direction identical)."""
    if isinstance(labels, sitk.Image):
        if not same_grid(labels, reference):
            raise ValueError("label image grid differs from the reference: "
                             + describe_grid_difference(labels, reference))
        image = sitk.Image(labels)
        image.CopyInformation(reference)
    else:
        image = label_image_like(labels, reference)
    return write_image(image, path, overwrite=overwrite)


def find_volumes(folder: PathLike) -> List[Path]:
    """Volume files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and has_volume_suffix(p))


def case_name(path: PathLike) -> str:
    """A case name from a file or folder name, without volume suffixes."""
    path = Path(path)
    name = path.name
    suffix = _suffix(path)
    if path.is_file() and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    return name


def geometry_of(image: sitk.Image) -> dict:
    return {"size": list(image.GetSize()), "origin": list(image.GetOrigin()),
            "spacing": list(image.GetSpacing()), "direction": list(image.GetDirection())}

