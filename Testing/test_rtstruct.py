import subprocess
import sys

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from FocusNetCore.dicom import write_ct_series
from FocusNetCore.imageio import ImageReadError, read_image
from FocusNetCore.metrics import dice
from FocusNetCore.phantom import PHANTOM_SET, generate_case, write_case
from FocusNetCore.rtstruct import match_roi_name, read_rtstruct, write_rtstruct

SMALL = ("Lens_L", "Lens_R", "OpticChiasm", "Pituitary")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """A standard phantom and one whose x axis is flipped (same anatomy, mirrored storage)."""
    root = tmp_path_factory.mktemp("rt")
    case = generate_case(610, "full", z_range=(-110.0, 40.0))
    write_case(case, root / "standard", "dicom")
    flipped_ct = sitk.Flip(case.image, [True, False, False])
    flipped_labels = sitk.Flip(case.labels, [True, False, False])
    write_ct_series(flipped_ct, root / "flipped" / "CT")
    write_rtstruct(flipped_labels, root / "flipped" / "CT", PHANTOM_SET, root / "flipped" / "rt.dcm")
    return {"standard": (root / "standard" / case.name / "CT", root / "standard" / case.name / "RTSTRUCT" / "rtstruct.dcm",
                         case.labels),
            "flipped": (root / "flipped" / "CT", root / "flipped" / "rt.dcm", flipped_labels)}


@pytest.mark.parametrize("which", ["standard", "flipped"])
def test_round_trip_keeps_every_organ(cases, which):
    ct_folder, rt_path, truth_image = cases[which]
    ct = read_image(ct_folder)
    labels, present, unmatched = read_rtstruct(rt_path, ct, ct_folder, PHANTOM_SET)
    # Compare on the series' grid (the flipped case stores its slices the other way round).
    truth = sitk.GetArrayFromImage(sitk.Resample(truth_image, ct, sitk.Transform(), sitk.sitkNearestNeighbor))
    voxel_cc = np.prod(ct.GetSpacing()) / 1000.0
    assert not unmatched and present.all()
    for name in PHANTOM_SET.names:
        value = PHANTOM_SET.label_of(name)
        score = dice(truth == value, labels == value)
        if (truth == value).sum() * voxel_cc >= 1.0:
            assert score >= 0.97, (which, name, score)
        if name in SMALL:
            assert score >= 0.85, (which, name, score)


def test_independent_reader_gives_the_same_masks(cases, tmp_path):
    """dcmrtstruct2nii (its own reader, scikit-image's polygon rasteriser)
    reads our structure set back to the masks we wrote."""
    import pydicom as _pydicom

    # dcmrtstruct2nii 5 still calls pydicom.read_file, which pydicom 3 renamed dcmread.
    if not hasattr(_pydicom, "read_file"):
        _pydicom.read_file = _pydicom.dcmread
    from dcmrtstruct2nii import dcmrtstruct2nii

    ct_folder, rt_path, truth_image = cases["standard"]
    dcmrtstruct2nii(str(rt_path), str(ct_folder), str(tmp_path), convert_original_dicom=False)
    truth = sitk.GetArrayViewFromImage(truth_image)
    voxel_cc = np.prod(truth_image.GetSpacing()) / 1000.0
    for name in PHANTOM_SET.names:
        mask = sitk.ReadImage(str(tmp_path / f"mask_{name}.nii.gz"))
        assert np.allclose(mask.GetOrigin(), truth_image.GetOrigin(), atol=1e-3)
        score = dice(sitk.GetArrayViewFromImage(mask) > 0, truth == PHANTOM_SET.label_of(name))
        if (truth == PHANTOM_SET.label_of(name)).sum() * voxel_cc >= 1.0:
            assert score >= 0.97, (name, score)
        assert score >= 0.85, (name, score)


def test_rt_utils_reader_agrees_up_to_its_edge_convention(cases):
    """rt-utils (an independent reader with its own OpenCV rasteriser) finds
    every ROI at the same place. Its fillPoly also fills the pixels the
    polygon edge passes through, so its masks are ours plus at most a
    one-pixel in-plane rim: that is the whole difference."""
    from rt_utils import RTStructBuilder
    from scipy import ndimage

    ct_folder, rt_path, truth_image = cases["standard"]
    rt = RTStructBuilder.create_from(str(ct_folder), str(rt_path))
    assert set(rt.get_roi_names()) == set(PHANTOM_SET.names)
    truth = sitk.GetArrayViewFromImage(truth_image)
    voxel_cc = np.prod(truth_image.GetSpacing()) / 1000.0
    rim = np.zeros((3, 3, 3), bool)
    rim[1] = ndimage.generate_binary_structure(2, 2)  # in-plane only
    for name in PHANTOM_SET.names:
        ours = truth == PHANTOM_SET.label_of(name)
        theirs = np.transpose(rt.get_roi_mask_by_name(name), (2, 0, 1)).astype(bool)  # (rows, cols, z) -> (z, y, x)
        assert not (ours & ~theirs).any(), name  # everything we contour, they find
        assert not (theirs & ~ndimage.binary_dilation(ours, rim)).any(), name  # nothing beyond one pixel
        if ours.sum() * voxel_cc >= 1.0:
            assert dice(theirs, ours) >= 0.85, name


# Type 1 and 2 attributes of the RT Structure Set IOD's required modules
# (PS3.3 A.19: Patient, General Study, RT Series, General Equipment,
# Structure Set, ROI Contour, RT ROI Observations, SOP Common).
REQUIRED = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
            "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality", "SeriesInstanceUID", "SeriesNumber",
            "OperatorsName", "Manufacturer", "StructureSetLabel", "StructureSetDate", "StructureSetTime",
            "StructureSetROISequence", "ROIContourSequence", "RTROIObservationsSequence", "SOPClassUID",
            "SOPInstanceUID", "ReferencedFrameOfReferenceSequence"]


def test_required_modules_and_references(cases):
    ct_folder, rt_path, _ = cases["standard"]
    with pydicom.config.strict_reading():
        ds = pydicom.dcmread(rt_path)
    for keyword in REQUIRED:
        assert keyword in ds, keyword
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    ct_files = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in ct_folder.iterdir()}
    ct0 = pydicom.dcmread(next(iter(ct_files.values())), stop_before_pixels=True)
    assert ds.PatientID == ct0.PatientID and ds.StudyInstanceUID == ct0.StudyInstanceUID
    assert ds.SeriesInstanceUID != ct0.SeriesInstanceUID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == ct0.FrameOfReferenceUID
    assert frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID == ct0.SeriesInstanceUID
    for roi, obs, contour in zip(ds.StructureSetROISequence, ds.RTROIObservationsSequence, ds.ROIContourSequence):
        assert roi.ROIName in PHANTOM_SET.names and obs.RTROIInterpretedType == "ORGAN"
        assert contour.ReferencedROINumber == roi.ROINumber and len(contour.ROIDisplayColor) == 3
        for item in contour.ContourSequence:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            assert item.NumberOfContourPoints * 3 == len(item.ContourData)
            assert item.ContourImageSequence[0].ReferencedSOPInstanceUID in ct_files
            z = np.asarray(item.ContourData, float).reshape(-1, 3)[:, 2]
            assert np.ptp(z) < 1e-3  # planar, on its slice


def test_holes_and_islands():
    labels = np.zeros((3, 40, 40), np.uint8)
    labels[1, 5:30, 5:30] = 1
    labels[1, 12:20, 12:20] = 0  # a hole
    labels[1, 33:37, 33:37] = 1  # a second island
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.9, 0.9, 3.0))
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    write_ct_series(sitk.Cast(image, sitk.sitkInt16) * 0 - 1000, folder / "CT")
    from FocusNetCore.organs import ORGAN_SETS

    organs = ORGAN_SETS["oar22"]
    write_rtstruct(image, folder / "CT", organs, folder / "rt.dcm")
    ds = pydicom.dcmread(folder / "rt.dcm")
    assert len(ds.ROIContourSequence[0].ContourSequence) == 3  # outer, hole, island
    back, _, _ = read_rtstruct(folder / "rt.dcm", read_image(folder / "CT", check_ct=False), folder / "CT", organs)
    assert np.array_equal(back == 1, labels == 1)


def test_roi_name_synonyms():
    expected = {"BrainStem": "Brainstem", "Parotid Lt": "Parotid_L", "L_Parotid": "Parotid_L", "Lt_Parotid": "Parotid_L",
                "Parotid_R": "Parotid_R", "OpticChiasm": "OpticChiasm", "Chiasm": "OpticChiasm",
                "Cochlea_L": "Ear_Internal_L", "OpticNerve_R": "OpticNrv_R", "Mandible": "Bone_Mandible",
                "TMJ_R": "Joint_TM_R", "Lens Right": "Lens_R", "PTV_70": None, "External": None}
    for name, organ in expected.items():
        assert match_roi_name(name) == organ, name


def test_frame_of_reference_mismatch_is_refused(cases, tmp_path):
    ct_folder, rt_path, _ = cases["standard"]
    ds = pydicom.dcmread(rt_path)
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4"
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = "1.2.3.4"
    ds.save_as(tmp_path / "other.dcm")
    with pytest.raises(ImageReadError, match="Frame of Reference .* is not the CT's"):
        read_rtstruct(tmp_path / "other.dcm", read_image(ct_folder), ct_folder, PHANTOM_SET)


def test_dicom_ls_lists_series(cases):
    ct_folder, _, _ = cases["standard"]
    out = subprocess.run([sys.executable, "-m", "FocusNetCore", "dicom", "ls", str(ct_folder.parent)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "CT" in out.stdout and "RTSTRUCT" in out.stdout and " x 3.00" in out.stdout or "x 2." in out.stdout


def test_gantry_tilt_is_reported(tmp_path):
    image = sitk.Image(32, 32, 10, sitk.sitkInt16) - 1000
    folder = write_ct_series(image, tmp_path / "tilt")
    for k, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.3 * k  # y drifts with z
        ds.save_as(path)
    with pytest.raises(ImageReadError, match="gantry tilt of"):
        read_image(folder)


def test_polygon_fill_agrees_with_matplotlib_inside_and_needs_no_matplotlib():
    """FocusNet's reader fills contours with numpy (released Slicer has no
    matplotlib); on random polygons it agrees with matplotlib's
    contains_points (random star-shaped polygons; no voxel centre lies on an edge)."""
    import ast

    PolygonPath = pytest.importorskip("matplotlib.path", reason="the check runs in the main environment").Path

    from FocusNetCore.rtstruct import polygon_mask

    rng = np.random.default_rng(7)
    filled = 0
    rr, cc = np.mgrid[:40, :50]
    centres = np.stack([cc.ravel(), rr.ravel()], axis=1).astype(float)
    for _ in range(30):
        n = int(rng.integers(3, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(3, 18, n)
        vertices = np.stack([25 + radii * np.cos(angles), 20 + radii * np.sin(angles)], axis=1) + rng.uniform(
            -0.4, 0.4, (n, 2))
        ours = polygon_mask(vertices, (40, 50))
        # closed=True takes the last vertex as the CLOSEPOLY code's, not a
        # corner (the old matplotlib-based reader dropped each contour's last point).
        closed = np.vstack([vertices, vertices[:1]])
        theirs = PolygonPath(closed, closed=True).contains_points(centres).reshape(40, 50)
        assert np.array_equal(ours, theirs)
        filled += int(ours.sum())
    assert filled > 3000  # the polygons are not all empty
    import FocusNetCore.rtstruct as module

    tree = ast.parse(open(module.__file__).read())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                         if isinstance(node, ast.ImportFrom) and node.module}
    assert "matplotlib" not in imported
