import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from FocusNetCore import precision
from FocusNetCore.evaluate import evaluate
from FocusNetCore.organs import CATALOGUE, ORGAN_SETS
from FocusNetCore.phantom import PHANTOM_SET, generate_case, with_body_below, write_case
from FocusNetCore.segfile import read_seg_nrrd_segments, write_seg_nrrd
from FocusNetCore.segment import Segmenter


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    write_case(generate_case(400, "small"), folder, "nrrd")
    return folder


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "FocusNetCore", *map(str, args)], capture_output=True, text=True)


def test_api_output_on_the_input_grid(tiny_bundle, case_dir):
    seg = Segmenter(tiny_bundle, device="cpu")
    stages = []
    image = sitk.ReadImage(str(case_dir / "phantom_0400_ct.nrrd"))
    result = seg.segment(image, progress=lambda s, f, m: stages.append((s, f)))
    for what in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(result.labels, what)() == getattr(image, what)()
    assert [s for s, _ in stages][0] == "read" and stages[-1] == ("done", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in stages)
    assert [o.name for o in result.organs] == list(ORGAN_SETS["oar22"].names)
    assert set(result.timings) >= {"read", "preprocess", "inference", "postprocess", "total"}
    assert result.model["name"] == "tiny random"
    for organ in result.organs:
        if organ.present:
            assert organ.volume_cc > 0 and len(organ.centroid_mm) == 3


def test_flipped_input_keeps_its_own_geometry(tiny_bundle, case_dir):
    image = sitk.ReadImage(str(case_dir / "phantom_0400_ct.nrrd"))
    flipped = sitk.Flip(image, [True, False, False])  # SimpleITK keeps the physical space, flips the axis
    assert flipped.GetDirection() != image.GetDirection()
    seg = Segmenter(tiny_bundle, device="cpu")
    a, b = seg.segment(image).labels, seg.segment(flipped).labels
    assert b.GetDirection() == flipped.GetDirection() and b.GetOrigin() == flipped.GetOrigin()
    # The same physical labels: flipping the result back gives the first result.
    back = sitk.GetArrayFromImage(sitk.Flip(b, [True, False, False]))
    agree = (back == sitk.GetArrayViewFromImage(a)).mean()
    assert agree > 0.99


def test_cli_seg_nrrd_and_json_progress(tiny_bundle, case_dir, tmp_path):
    out = run_cli("segment", case_dir / "phantom_0400_ct.nrrd", "--out", tmp_path, "--model", tiny_bundle,
                  "--progress", "json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert {"stage", "fraction", "message"} <= set(lines[0])
    assert lines[-1]["stage"] == "done" and lines[-1]["fraction"] == 1.0
    seg_path = tmp_path / "phantom_0400_ct.seg.nrrd"
    segments = read_seg_nrrd_segments(seg_path)
    organs = ORGAN_SETS["oar22"]
    assert [s["name"] for s in segments] == list(organs.names)
    for s in segments:
        assert s["label_value"] == organs.label_of(s["name"])
        assert np.allclose(np.asarray(s["color"]) * 255, CATALOGUE[s["name"]].color, atol=0.01)
        assert f"SCT^{CATALOGUE[s['name']].snomed_code}^" in s["tags"]
    report = json.loads((tmp_path / "phantom_0400_ct.report.json").read_text())
    assert report["model"]["intended_use"] == "tests only" and len(report["organs"]) == 22
    # Never overwritten silently.
    again = run_cli("segment", case_dir / "phantom_0400_ct.nrrd", "--out", tmp_path, "--model", tiny_bundle)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_cli_refusals(tiny_bundle, tmp_path, capsys):
    from FocusNetCore.cli import main

    missing = run_cli("segment", tmp_path / "nope.nrrd", "--out", tmp_path / "o", "--model", tiny_bundle)
    assert missing.returncode == 2 and "nope.nrrd" in missing.stderr and "no such file" in missing.stderr
    mr = sitk.Image(32, 32, 8, sitk.sitkInt16) + 300
    sitk.WriteImage(mr, str(tmp_path / "t1.nrrd"))
    # the others in this process: the same error path as the process's exit code above
    assert main(["segment", str(tmp_path / "t1.nrrd"), "--out", str(tmp_path / "o"), "--model", str(tiny_bundle)]) == 2
    assert "Hounsfield" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "t1.nrrd"), "--out", str(tmp_path / "o"), "--model",
                 str(tmp_path / "t1.nrrd")]) == 2
    assert "not a readable FocusNet model bundle" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_folder_with_one_corrupt_case_still_segments_the_others(tiny_bundle, tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    for seed in (401, 402):
        sitk.WriteImage(generate_case(seed, "small").image, str(folder / f"case{seed}.nrrd"))
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\nnot really")
    out = run_cli("segment", folder, "--out", tmp_path / "out", "--model", tiny_bundle, "--format", "nifti")
    assert out.returncode == 2
    assert "broken" in out.stderr
    assert (tmp_path / "out" / "case401.nii.gz").is_file() and (tmp_path / "out" / "case402.nii.gz").is_file()
    assert json.loads((tmp_path / "out" / "case401.labels.json").read_text())["labels"][0]["name"] == "Eye_L"


def test_evaluate_perfect_prediction_and_tables(tmp_path):
    case = generate_case(403, "small")
    write_case(case, tmp_path / "gt", "nrrd")
    organs = ORGAN_SETS["oar22"]
    from FocusNetCore.organs import convert_labels

    labels, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(case.labels)
    write_seg_nrrd(image, organs, tmp_path / "pred" / f"{case.name}_ct.seg.nrrd")
    rows, written = evaluate(tmp_path / "pred", tmp_path / "gt", "oar22", tmp_path / "eval")
    assert len(rows) == 22 and all(r["dice"] == 1.0 and r["hd95_paper"] == 0.0 for r in rows)
    table = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "| OpticChiasm (small) | 1.000 ± 0.000" in table and "0.612" in table  # paper's chiasm Dice
    out = run_cli("evaluate", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--organs", "pddca9")
    assert out.returncode == 0, out.stderr
    assert "Bone_Mandible" in (tmp_path / "pred" / "evaluation.md").read_text()


def test_demo_runs_end_to_end(tiny_bundle, tmp_path):
    out = run_cli("demo", "--out", tmp_path / "demo", "--size", "small", "--model", tiny_bundle, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    for name in ("demo_case.seg.nrrd", "demo_case.report.json", "demo_case_segmentation.png",
                 "demo_case_ground_truth.png", "evaluation.md", "evaluation.csv", "ground_truth/demo_case_ct.nrrd"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "mean Dice" in out.stdout and "tests only" in out.stdout


def test_segment_dicom_series_to_rtstruct(tiny_bundle, tmp_path, capsys):
    from FocusNetCore.cli import main
    from FocusNetCore.imageio import read_image
    from FocusNetCore.rtstruct import read_rtstruct

    case = generate_case(404, "small")
    write_case(case, tmp_path / "dicom", "dicom")
    series = tmp_path / "dicom" / case.name / "CT"
    out = run_cli("segment", series, "--out", tmp_path / "out", "--model", tiny_bundle, "--format", "rtstruct,dicomseg")
    assert out.returncode == 0, out.stderr
    rt = tmp_path / "out" / "CT.rtstruct.dcm"
    # both files of one segmentation, both named in the report
    report = json.loads((tmp_path / "out" / "CT.report.json").read_text())
    assert report["outputs"] == [str(rt), str(tmp_path / "out" / "CT.seg.dcm")] and report["output"] == str(rt)
    ct = read_image(series)
    labels, present, unmatched = read_rtstruct(rt, ct, series, ORGAN_SETS["oar22"])
    seg = Segmenter(tiny_bundle, device="cpu").segment(series).labels
    assert not unmatched
    # A random network's labels are speckled; pixels touching only at a
    # corner are the one ambiguity of contours, so allow a sliver.
    assert (labels == sitk.GetArrayViewFromImage(seg)).mean() > 0.995
    # RTSTRUCT needs a DICOM series to refer to: a volume file is refused (in this process)
    assert main(["segment", str(tmp_path / "dicom" / case.name / "labels.nrrd"), "--out", str(tmp_path / "o2"),
                 "--model", str(tiny_bundle), "--format", "seg.nrrd,rtstruct"]) == 2
    assert "--format rtstruct needs a DICOM CT series" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())  # nothing half-written
    # a file of the run before is not overwritten by a second format list naming it
    assert main(["segment", str(series), "--out", str(tmp_path / "out"), "--model", str(tiny_bundle),
                 "--format", "nifti,dicomseg"]) == 2
    assert "CT.seg.dcm" in capsys.readouterr().err and not (tmp_path / "out" / "CT.nii.gz").exists()
    for bad, message in (("rtstruct,stl", "unknown format 'stl'"), ("rtstruct,rtstruct", "names a format twice")):
        with pytest.raises(SystemExit) as exit_:
            main(["segment", str(series), "--out", str(tmp_path / "o3"), "--format", bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_precision_choice_rules(monkeypatch):
    from FocusNetCore import precision

    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device="cuda": True)  # (no GPU here)
    assert precision.resolve("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda device="cuda": False)  # a V100, a T4
    assert precision.resolve("auto", "cuda") == "float32"
    assert precision.resolve("float32", "cuda") == "float32"
    assert precision.resolve("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve("auto", "cpu") == "float32"  # emulated bfloat16 would be slower
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve("auto", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        precision.resolve("half", "cpu")


@pytest.mark.skipif(not precision.cpu_has_native_bf16(),
                    reason="this CPU has no AMX or AVX512-BF16: bfloat16 is emulated (one 40-slice chunk took 75 s "
                           "on a 2-core AMD EPYC with AVX2 only, against 2 s in float32), and 'auto' never picks "
                           "it here; test_precision checks bfloat16 against float32 on a small input instead")
def test_bfloat16_segmentation_matches_float32(case_dir):
    """The embedded model in bfloat16 autocast (what "auto" picks on CPUs with
    AMX or AVX512-BF16) draws the same organs as in float32 wherever the model
    is sure of them. (Where it is not — near-ties between classes, mean
    probability under 0.6 — rounding may tip a voxel either way, as any change
    of hardware may.)"""
    ct = case_dir / "phantom_0400_ct.nrrd"
    out = {p: Segmenter(precision=p).segment(ct) for p in ("float32", "bfloat16")}
    assert out["bfloat16"].precision == "bfloat16" and out["bfloat16"].report()["precision"] == "bfloat16"
    a, b = (sitk.GetArrayFromImage(out[p].labels) for p in ("float32", "bfloat16"))
    checked = 0
    for organ in out["float32"].organs:
        if organ.present and organ.volume_cc > 1.0 and organ.confidence > 0.6:
            checked += 1
            lab = organ.label
            overlap = 2 * np.sum((a == lab) & (b == lab)) / (np.sum(a == lab) + np.sum(b == lab))
            assert overlap > 0.95, organ.name
    assert checked >= 5


def test_a_scan_that_goes_on_into_the_thorax_gets_the_same_organs():
    """The model sees the head-and-neck band only (320 mm below the head's
    top): 300 slices added below a phantom (0.9 m more scan: 180 mm more
    neck, then thorax) leave the model grid at the band's size, the organs
    as they were (the spinal cord compared where both scans have it), and
    no contour below the band."""
    from FocusNetCore.preprocess import HEAD_BAND_MARGIN_MM, HEAD_BAND_MM, locate_head, model_grid

    case = generate_case(2027, "small")
    head = sitk.DICOMOrient(case.image, "LPS")
    longer = with_body_below(case.image, 300, neck_slices=60)
    segmenter = Segmenter(device="cpu", precision="float32")
    config = segmenter.config.preprocess
    grid = model_grid(longer, config)
    assert grid.size[2] * config.spacing[2] <= HEAD_BAND_MM + HEAD_BAND_MARGIN_MM + config.spacing[2]
    assert locate_head(longer).top == pytest.approx(locate_head(head).top)

    short = sitk.GetArrayFromImage(segmenter.segment(head).labels)
    long = sitk.GetArrayFromImage(segmenter.segment(longer).labels)
    assert long.shape[0] == short.shape[0] + 300
    lowest = int(np.nonzero(long.any(axis=(1, 2)))[0].min())
    band_low = locate_head(longer).band[0]
    assert longer.TransformIndexToPhysicalPoint((0, 0, lowest))[2] >= band_low - head.GetSpacing()[2], \
        "nothing below the head-and-neck band"
    same = long[300:]
    organs = segmenter.config.organs
    found = 0
    for name in organs.names:
        a, b = short == organs.label_of(name), same == organs.label_of(name)
        if name == "SpinalCord":  # it goes on down the longer neck: compare above the short scan's two lowest slices
            a, b = a[2:], b[2:]
        if a.any() or b.any():
            found += 1
            overlap = 2 * (a & b).sum() / (a.sum() + b.sum())
            assert overlap >= 0.97, f"{name}: Dice {overlap:.3f} between the scan and the scan with thorax below"
    assert found >= 15
