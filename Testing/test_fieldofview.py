"""Organs the scan does not hold (FocusNetCore/fieldofview.py): judged from
where the found organs lie, not drawn, and said in the report and panels."""
import numpy as np
import pytest
import SimpleITK as sitk

from FocusNetCore import fieldofview
from FocusNetCore.organs import ORGAN_SETS, convert_labels
from FocusNetCore.phantom import PHANTOM_SET, generate_case

ORGANS = ORGAN_SETS["oar22"]
UPPER = ("Eye_L", "Eye_R", "Lens_L", "Lens_R", "OpticNrv_L", "OpticNrv_R", "OpticChiasm", "Pituitary")


@pytest.fixture(scope="module")
def segmenter():
    from FocusNetCore.segment import Segmenter

    return Segmenter()


@pytest.fixture(scope="module")
def phantom():
    """A phantom no choice was made on, and its truth in the 22 OARs."""
    case = generate_case(8501)
    truth, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, ORGANS)
    return case, truth


def _slices_of(truth, name):
    return np.nonzero((truth == ORGANS.label_of(name)).any(axis=(1, 2)))[0]


def test_a_short_scan_gets_no_organ_it_does_not_hold(segmenter, phantom):
    """Five slices through the mandible: the eyes, lenses, optic nerves,
    chiasm and pituitary are not drawn, and are reported outside the field
    of view (not missing); the mandible, which is there, is drawn."""
    case, truth = phantom
    middle = int(_slices_of(truth, "Bone_Mandible_L").mean())
    held = truth[middle - 2: middle + 3]
    assert not np.isin(held, [ORGANS.label_of(n) for n in UPPER]).any()
    result = segmenter.segment(case.image[:, :, middle - 2: middle + 3])
    drawn = sitk.GetArrayViewFromImage(result.labels)
    assert not np.isin(drawn, [ORGANS.label_of(n) for n in UPPER]).any()
    assert set(UPPER) <= set(result.outside_scan)
    by_name = {o.name: o for o in result.organs}
    assert all(by_name[n].outside_scan and not by_name[n].present for n in UPPER)
    assert by_name["Bone_Mandible_L"].present and not by_name["Bone_Mandible_L"].outside_scan
    assert result.report()["field_of_view"]["outside"] == result.outside_scan


def test_a_whole_scan_and_an_organ_cut_by_its_end_keep_their_contours(segmenter, phantom):
    """Nothing is judged outside a whole scan; a scan that stops in the
    middle of the eyes keeps the eyes' part inside it."""
    case, truth = phantom
    whole = segmenter.segment(case.image)
    assert whole.outside_scan == [] and whole.field_of_view["anchors"]
    top = int(_slices_of(truth, "Eye_L").mean()) + 1
    cut = segmenter.segment(case.image[:, :, :top])
    present = {o.name for o in cut.organs if o.present}
    assert {"Eye_L", "Eye_R", "Brainstem"} <= present and not {"Eye_L", "Eye_R"} & set(cut.outside_scan)
    for name in cut.outside_scan:  # anything judged outside is truly not in the cut scan
        assert not (truth[:top] == ORGANS.label_of(name)).any(), name


def _boxes(depth, boxes, spacing=(10.0, 10.0, 2.0)):
    """A label image of boxes side by side, 4 x 4 voxels of 1 cm^2 each: {organ: (first slice, last slice)}."""
    array = np.zeros((depth, 8, 8 * len(boxes)), np.uint8)
    for k, (name, (a, b)) in enumerate(boxes.items()):
        array[a: b + 1, 2:6, 8 * k + 2: 8 * k + 6] = ORGANS.label_of(name)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def test_the_prior_is_in_mm_superior_and_leaves_out_organs_the_scan_cuts():
    cases = [_boxes(40, {"Eye_L": (30, 33), "Brainstem": (10, 25), "SpinalCord": (0, 9)}),
             _boxes(40, {"Eye_L": (28, 31), "Brainstem": (8, 23), "SpinalCord": (0, 7)})]
    prior = fieldofview.prior_from_cases(cases, ORGANS)
    assert prior["cases"] == 2
    assert prior["half_height_mm"]["Eye_L"][:1] == [3.0] and prior["half_height_mm"]["Brainstem"][:1] == [15.0]
    assert prior["offset_mm"]["Eye_L"]["Brainstem"] == [28.0, 0.0, 2]  # the eye 14 slices of 2 mm above the brainstem
    assert "SpinalCord" not in prior["half_height_mm"] and "SpinalCord" not in prior["offset_mm"]["Eye_L"]


def test_an_organ_the_anchors_put_beyond_the_scan_is_outside_and_no_prior_judges_nothing():
    prior = fieldofview.prior_from_cases(
        [_boxes(80, {"Eye_L": (70, 73), "Eye_R": (70, 73), "Parotid_L": (20, 35), "Parotid_R": (20, 35),
                     "Bone_Mandible_L": (10, 30), "Brainstem": (40, 60)})], ORGANS)
    # a scan of slices 18-32 of the same anatomy: the parotids and mandible are in it; the eyes 40 slices above
    scan = _boxes(15, {"Parotid_L": (2, 14), "Parotid_R": (2, 14), "Bone_Mandible_L": (0, 12), "Eye_L": (14, 14)})
    judged = fieldofview.judge(scan, ORGANS, prior)
    assert "Eye_L" in judged.outside and "Eye_R" in judged.outside and judged.removed == ["Eye_L"]
    assert "Parotid_L" not in judged.outside and "Bone_Mandible_L" not in judged.outside
    cleaned = fieldofview.remove(scan, ORGANS, judged.removed)
    assert not (sitk.GetArrayViewFromImage(cleaned) == ORGANS.label_of("Eye_L")).any()
    assert cleaned.GetSpacing() == scan.GetSpacing()
    nothing = fieldofview.judge(scan, ORGANS, None)
    assert nothing.outside == [] and "no anatomy prior" in nothing.note


def test_the_panels_say_not_in_scan_rather_than_missing():
    from FocusNetSegmentLib.review import NOT_IN_SCAN, not_in_scan, organ_flags

    results = [{"name": n, "present": False, "outside_scan": n == "Eye_L", "volume_cc": 0.0} for n in ORGANS.names]
    flags = organ_flags(ORGANS, results)
    assert flags["Eye_L"] == [] and flags["Eye_R"] == ["missing"]
    assert not_in_scan(results) == ["Eye_L"] and NOT_IN_SCAN == "not in scan"


def test_an_organ_drawn_where_it_cannot_be_is_removed():
    """A scan of the top of the head with a mandible drawn near the vertex
    (seen on a phantom scanned from the eyes up): not the mandible; outside
    the field of view, as its centre lies below the scan. Drawn far from
    where it lies in a scan that holds it: misplaced (left as missing)."""
    anatomy = {"Eye_L": (70, 73), "Eye_R": (70, 73), "Brainstem": (45, 65), "Lobe_Temporal_L": (55, 68),
               "Lobe_Temporal_R": (55, 68), "Bone_Mandible_L": (10, 30), "Parotid_L": (20, 35)}
    prior = fieldofview.prior_from_cases([_boxes(90, anatomy), _boxes(90, {k: (a + 1, b + 1) for k, (a, b)
                                                                            in anatomy.items()})], ORGANS)
    top = {k: (a - 40, b - 40) for k, (a, b) in anatomy.items() if a >= 45}  # slices 40-89 of that anatomy
    judged = fieldofview.judge(_boxes(50, {**top, "Bone_Mandible_L": (44, 48)}), ORGANS, prior)
    assert "Bone_Mandible_L" in judged.outside and "Bone_Mandible_L" in judged.removed
    assert not {"Eye_L", "Brainstem", "Lobe_Temporal_L"} & set(judged.removed)
    whole = {**anatomy, "Parotid_L": (70, 80)}  # the parotid drawn at the eyes' level, 40 mm too high
    judged = fieldofview.judge(_boxes(90, whole), ORGANS, prior)
    assert judged.misplaced == ["Parotid_L"] and "Parotid_L" in judged.removed and "Parotid_L" not in judged.outside
