"""The DICOM we write, checked by independent tools (Debian packages that
`make test` installs): dicom3tools' dciodvfy validates each object against
the standard's module definitions, plastimatch rasterises our RTSTRUCT on
the CT, dcmtk's dcmdump parses every file, highdicom's and pydicom's readers
read the SEG back. They are required: these tests fail, not skip, without them."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from FocusNetCore.dicomseg import read_dicom_seg, write_dicom_seg
from FocusNetCore.imageio import read_image
from FocusNetCore.metrics import dice
from FocusNetCore.organs import CATALOGUE, ORGAN_SETS, convert_labels
from FocusNetCore.phantom import PHANTOM_SET, generate_case, write_case
from FocusNetCore.rtstruct import write_rtstruct

ORGANS = ORGAN_SETS["oar22"]


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test` installs it (Debian packages dicom3tools, dcmtk, plastimatch)"
    return path


def dciodvfy(path):
    """(errors, warnings) dciodvfy reports for one file."""
    out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A phantom CT series, what `focusnet segment` writes from it (RTSTRUCT, SEG),
    and the ground truth written with the same writers."""
    root = tmp_path_factory.mktemp("dicom")
    case = generate_case(2026, "small")
    write_case(case, root / "phantom", "dicom")
    series = root / "phantom" / case.name / "CT"
    result = subprocess.run([sys.executable, "-m", "FocusNetCore", "segment", str(series), "--out",
                             str(root / "out"), "--format", "rtstruct,dicomseg", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = {"rtstruct": root / "out" / "CT.rtstruct.dcm", "dicomseg": root / "out" / "CT.seg.dcm"}
    ct = read_image(series)
    truth_array, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, ORGANS)
    truth = sitk.GetImageFromArray(truth_array)
    truth.CopyInformation(ct)
    outputs["truth_rtstruct"] = write_rtstruct(truth, series, ORGANS, root / "truth.rtstruct.dcm")
    outputs["truth_seg"] = write_dicom_seg(truth, series, ORGANS, root / "truth.seg.dcm")
    return dict(root=root, series=series, ct=ct, truth=truth, **outputs)


@pytest.mark.parametrize("what", ["rtstruct", "dicomseg", "truth_rtstruct", "truth_seg", "ct"])
def test_dciodvfy_reports_no_error(written, what):
    files = sorted(written["series"].glob("*.dcm")) if what == "ct" else [written[what]]
    for path in files[:3] + files[-1:]:
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        assert warnings == [], f"{path.name}: {warnings} (list accepted warnings in the README)"


def test_dciodvfy_would_see_an_error(written, tmp_path):
    """The check above can fail: a structure set without its Frame of Reference is reported."""
    ds = pydicom.dcmread(str(written["rtstruct"]))
    del ds.FrameOfReferenceUID
    ds.save_as(str(tmp_path / "broken.dcm"))
    errors, _ = dciodvfy(tmp_path / "broken.dcm")
    assert any("FrameOfReferenceUID" in e for e in errors)


def test_plastimatch_rasterises_our_rtstruct_as_our_label_map(written, tmp_path):
    """plastimatch's own rasteriser on our RTSTRUCT of the ground truth gives
    back our label map: Dice >= 0.97 per organ, >= 0.85 for the small ones."""
    out = subprocess.run([tool("plastimatch"), "convert", "--input", str(written["truth_rtstruct"]),
                          "--referenced-ct", str(written["series"]), "--output-prefix", str(tmp_path / "masks"),
                          "--prefix-format", "nrrd"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    truth = sitk.GetArrayViewFromImage(written["truth"])
    scores = {}
    for name in ORGANS.names:
        mask = sitk.ReadImage(str(tmp_path / "masks" / f"{name}.nrrd"))
        on_ct = sitk.Resample(mask, written["ct"], sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        scores[name] = dice(sitk.GetArrayViewFromImage(on_ct) > 0, truth == ORGANS.label_of(name))
    low = {n: round(d, 3) for n, d in scores.items() if d < (0.85 if CATALOGUE[n].small else 0.97)}
    assert low == {}, f"plastimatch disagrees with our label map: {low}"


def test_dcmdump_parses_every_file_we_write(written):
    files = [written[k] for k in ("rtstruct", "dicomseg", "truth_rtstruct", "truth_seg")]
    files += sorted(written["series"].glob("*.dcm"))
    for path in files:
        out = subprocess.run([tool("dcmdump"), "-q", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "E:" not in out.stderr, f"{path.name}: {out.stderr[-500:]}"


def test_dicom_seg_references_the_ct_and_reads_back_as_our_label_map(written):
    ds = pydicom.dcmread(str(written["truth_seg"]))
    ct = pydicom.dcmread(str(next(written["series"].glob("*.dcm"))), stop_before_pixels=True)
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == ct.StudyInstanceUID
    assert ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    segments = {s.SegmentLabel: s for s in ds.SegmentSequence}
    assert list(segments) == list(ORGANS.names)
    eye = segments["Eye_L"]
    assert eye.SegmentAlgorithmType == "AUTOMATIC" and eye.SegmentedPropertyTypeCodeSequence[0].CodeValue == "81745001"
    assert eye.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert eye.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "FocusNetv2"
    back = read_dicom_seg(written["truth_seg"], ORGANS, written["ct"])
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(written["truth"]))
    # The model's SEG leaves out the organs it did not find.
    found = pydicom.dcmread(str(written["dicomseg"]))
    report = __import__("json").loads((written["root"] / "out" / "CT.report.json").read_text())
    assert [s.SegmentLabel for s in found.SegmentSequence] == [o["name"] for o in report["organs"] if o["present"]]


def test_highdicom_reads_our_seg(written):
    import highdicom as hd

    seg = hd.seg.segread(str(written["truth_seg"])) if hasattr(hd.seg, "segread") else \
        hd.seg.Segmentation.from_dataset(pydicom.dcmread(str(written["truth_seg"])))
    assert seg.number_of_segments == 22
    assert [d.segment_label for d in seg.SegmentSequence] == list(ORGANS.names)


def test_seg_of_nothing_is_refused(written, tmp_path):
    empty = sitk.Image(written["truth"])
    empty = sitk.Multiply(empty, 0)
    with pytest.raises(ValueError, match="no organ has a contour"):
        write_dicom_seg(empty, written["series"], ORGANS, tmp_path / "empty.seg.dcm")
    assert not (tmp_path / "empty.seg.dcm").exists()
