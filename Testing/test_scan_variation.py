"""Phantoms that vary the way scans do (issue 48, phantom.Variation): the
same patient with only the named change, the truth painted alike."""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from FocusNetCore.phantom import PHANTOM_SET, Variation, generate_case


def _volumes_cc(case):
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(case.labels)
    return {PHANTOM_SET.names[label - 1]: stats.GetPhysicalSize(label) / 1000.0 for label in stats.GetLabels()}


def test_no_variation_is_the_default_patient_and_pose_slices_pixels_follow():
    plain, same = generate_case(31, "small"), generate_case(31, "small", variation=Variation())
    assert np.array_equal(sitk.GetArrayViewFromImage(plain.image), sitk.GetArrayViewFromImage(same.image))
    turned = generate_case(31, "small", variation=Variation(pose=(12.0, -8.0, 5.0), slice_mm=2.0, pixel_mm=1.2))
    assert turned.image.GetSpacing() == pytest.approx((1.2, 1.2, 2.0))
    assert turned.labels.GetSpacing() == turned.image.GetSpacing() and turned.labels.GetSize() == turned.image.GetSize()
    assert (turned.parameters["yaw"], turned.parameters["pitch"], turned.parameters["roll"]) == (12.0, -8.0, 5.0)
    # the same patient: every large organ keeps its volume however the head lies and the voxels fall
    before, after = _volumes_cc(plain), _volumes_cc(turned)
    for organ in ("Brainstem", "Parotid_L", "Parotid_R", "Eye_L", "Bone_Mandible_L"):
        assert after[organ] == pytest.approx(before[organ], rel=0.12), organ
    # and it is turned: the eyes' centres move relative to each other
    plain_eyes = [plain.landmarks["eye_L"], plain.landmarks["eye_R"]]
    turned_eyes = [turned.landmarks["eye_L"], turned.landmarks["eye_R"]]
    assert abs(np.subtract(*turned_eyes)[1] - np.subtract(*plain_eyes)[1]) > 5.0  # yaw: one eye forward


def test_metal_adds_fillings_on_the_mandible_and_leaves_the_truth():
    plain = generate_case(32, "small")
    metal = generate_case(32, "small", variation=Variation(metal=True))
    assert np.array_equal(sitk.GetArrayViewFromImage(plain.labels), sitk.GetArrayViewFromImage(metal.labels))
    ct = sitk.GetArrayViewFromImage(metal.image)
    fillings = np.argwhere(ct >= 2900)
    assert len(fillings) and metal.parameters["metal_fillings"] == 3
    labels = sitk.GetArrayViewFromImage(metal.labels)
    jaw = np.argwhere(np.isin(labels, [PHANTOM_SET.label_of("Bone_Mandible_L"), PHANTOM_SET.label_of("Bone_Mandible_R")]))
    assert fillings[:, 0].min() >= jaw[:, 0].min() and fillings[:, 1].mean() < jaw[:, 1].mean()  # anterior
    changed = (np.abs(ct.astype(float) - sitk.GetArrayViewFromImage(plain.image)) > 100) & (ct < 2900)
    assert changed.sum() > 10 * len(fillings), "streaks reach beyond the fillings"


def test_a_cut_field_of_view_cuts_image_and_truth_alike():
    case = generate_case(33, "full", variation=Variation(fov_mm=200.0, z_range=(-120.0, 10.0)))
    assert case.image.GetSize() == case.labels.GetSize()
    assert case.image.GetSize()[0] * case.image.GetSpacing()[0] <= 200.0 + case.image.GetSpacing()[0]
    assert case.image.GetSize()[1] > case.image.GetSize()[0]
    assert case.parameters["z_top"] == 10.0


def test_random_variation_is_drawn_per_case_and_refused_out_of_range():
    assert Variation.random(5) == Variation.random(5) and Variation.random(5) != Variation.random(6)
    drawn = Variation.random(7)
    assert max(abs(a) for a in drawn.pose) <= 15 and 1.0 <= drawn.slice_mm <= 5.0 and 0.5 <= drawn.pixel_mm <= 1.2
    with pytest.raises(ValueError, match="slice thickness"):
        Variation(slice_mm=0.1).check()
    with pytest.raises(ValueError, match="pose"):
        Variation(pose=(float("nan"), 0.0, 0.0)).check()  # NaN compares false: once it drew an all-air CT
    result = subprocess.run([sys.executable, "-m", "FocusNetCore", "phantom", "--out", "/nonexistent-never-written",
                             "--pose", "40", "0", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pose" in result.stderr and "Traceback" not in result.stderr
