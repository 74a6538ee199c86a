import json

import numpy as np
import pytest
import SimpleITK as sitk

from FocusNetCore.imageio import OutputExistsError, read_image, read_label_image
from FocusNetCore.organs import CATALOGUE, ORGAN_SETS, PDDCA_FILE_NAMES, convert_labels
from FocusNetCore.phantom import FORMATS, PHANTOM_SET, generate_case, write_case

# Cropped to the head and upper neck: every organ, in half the time.
Z_RANGE = (-115.0, 45.0)
TRAIN_SEEDS = range(100, 105)
TEST_SEEDS = range(200, 205)


@pytest.fixture(scope="module")
def cases():
    return {seed: generate_case(seed, "full", z_range=Z_RANGE) for seed in (*TRAIN_SEEDS, *TEST_SEEDS)}


def arrays(case):
    return sitk.GetArrayFromImage(case.image), sitk.GetArrayFromImage(case.labels)


def test_same_seed_same_case_bit_for_bit():
    a, b = generate_case(3, "small"), generate_case(3, "small")
    assert np.array_equal(sitk.GetArrayViewFromImage(a.image), sitk.GetArrayViewFromImage(b.image))
    assert np.array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(b.labels))
    assert a.image.GetOrigin() == b.image.GetOrigin() and a.image.GetSpacing() == b.image.GetSpacing()
    c = generate_case(4, "small")
    assert not np.array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(c.labels))


def test_full_size_is_a_clinical_scan():
    case = generate_case(11, "full")
    sx, sy, sz = case.image.GetSpacing()
    assert case.image.GetSize()[:2] == (512, 512)
    assert 0.78 <= sx == sy <= 1.25 and 2.5 <= sz <= 3.5
    assert 60 <= case.image.GetSize()[2] <= 140
    assert case.image.GetPixelID() == sitk.sitkInt16


def test_every_organ_present_with_typical_volume(cases):
    for seed, case in cases.items():
        _, labels = arrays(case)
        voxel_cc = np.prod(case.image.GetSpacing()) / 1000.0
        for name in PHANTOM_SET.names:
            volume = (labels == PHANTOM_SET.label_of(name)).sum() * voxel_cc
            low, high = CATALOGUE[name].volume_cc
            assert low <= volume <= high, (seed, name, volume, (low, high))


def test_left_organs_on_patient_left(cases):
    for case in cases.values():
        _, labels = arrays(case)
        for name in PHANTOM_SET.names:
            if not name.endswith("_L"):
                continue
            xs = {}
            for side in ("_L", "_R"):
                k, j, i = np.argwhere(labels == PHANTOM_SET.label_of(name[:-2] + side)).mean(axis=0)
                xs[side] = case.image.TransformContinuousIndexToPhysicalPoint((i, j, k))[0]
            # LPS: +x is the patient's left.
            assert xs["_L"] > xs["_R"] + 10.0, (name, xs)


def test_hounsfield_units_are_realistic(cases):
    case = cases[TRAIN_SEEDS[0]]
    image, labels = arrays(case)
    core = sitk.GetArrayFromImage(sitk.BinaryErode(case.labels == PHANTOM_SET.label_of("Parotid_L"), [2, 2, 1]))
    assert -45 < np.median(image[core > 0]) < 35
    lens = labels == PHANTOM_SET.label_of("Lens_L")
    assert 40 < np.median(image[lens]) < 160
    mandible = np.isin(labels, [PHANTOM_SET.label_of("Bone_Mandible_L"), PHANTOM_SET.label_of("Bone_Mandible_R")])
    assert np.median(image[mandible]) > 400
    middle_ear = labels == PHANTOM_SET.label_of("Ear_Middle_L")
    assert np.median(image[middle_ear]) < -500
    assert image.min() <= -990 and 10 <= np.std(image[image < -900]) <= 40  # noise in air


def _lcc(mask):
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))),
                                       sortByObjectSize=True)
    return sitk.GetArrayFromImage(components) == 1


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _organ_masks(case):
    """The baseline's targets: the mandible whole, the intracranial optic
    nerves (within 16 mm of the chiasm centre), chiasm and pituitary."""
    _, labels = arrays(case)
    L = PHANTOM_SET.label_of
    k, j, i = np.indices(labels.shape, sparse=True)
    origin, spacing = np.asarray(case.image.GetOrigin()), np.asarray(case.image.GetSpacing())
    chiasm = np.asarray(case.landmarks["chiasm"])
    near_chiasm = ((origin[0] + i * spacing[0] - chiasm[0]) ** 2 + (origin[1] + j * spacing[1] - chiasm[1]) ** 2
                   + (origin[2] + k * spacing[2] - chiasm[2]) ** 2) <= 16.0 ** 2
    return {
        "mandible": np.isin(labels, [L("Bone_Mandible_L"), L("Bone_Mandible_R")]),
        "chiasm": labels == L("OpticChiasm"),
        "pituitary": labels == L("Pituitary"),
        "optic nerve L (intracranial)": (labels == L("OpticNrv_L")) & near_chiasm,
        "optic nerve R (intracranial)": (labels == L("OpticNrv_R")) & near_chiasm,
    }


def _box(mask, spacing, margin_mm=10.0):
    idx = np.argwhere(mask)
    grow = np.ceil(margin_mm / np.asarray(spacing)[::-1]).astype(int)
    low, high = np.maximum(idx.min(axis=0) - grow, 0), idx.max(axis=0) + grow + 1
    box = np.zeros(mask.shape, bool)
    box[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    return box


def test_phantom_poses_the_papers_problem(cases):
    """A plain intensity baseline - each organ's HU window learned from 5
    training phantoms, given the organ's location (its box grown by 10 mm),
    largest connected component - finds the mandible but not the small,
    low-contrast organs."""
    windows = {}
    for seed in TRAIN_SEEDS:
        image, _ = arrays(cases[seed])
        for name, mask in _organ_masks(cases[seed]).items():
            windows.setdefault(name, []).append(image[mask])
    windows = {name: np.percentile(np.concatenate(v), [2.5, 97.5]) for name, v in windows.items()}
    scores = {}
    for seed in TEST_SEEDS:
        image, _ = arrays(cases[seed])
        for name, truth in _organ_masks(cases[seed]).items():
            low, high = windows[name]
            candidate = (image >= low) & (image <= high) & _box(truth, cases[seed].image.GetSpacing())
            scores.setdefault(name, []).append(_dice(_lcc(candidate), truth))
    assert min(scores["mandible"]) >= 0.8, scores["mandible"]
    for name in ("chiasm", "pituitary", "optic nerve L (intracranial)", "optic nerve R (intracranial)"):
        assert max(scores[name]) < 0.5, (name, scores[name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_read_back_to_the_same_voxels_and_geometry(tmp_path, fmt):
    case = generate_case(5, "small")
    write_case(case, tmp_path, fmt)
    ct, labels = case.image, sitk.GetArrayViewFromImage(case.labels)
    if fmt in ("nrrd", "nifti"):
        suffix = ".nrrd" if fmt == "nrrd" else ".nii.gz"
        back = read_image(tmp_path / f"{case.name}_ct{suffix}")
        back_labels = read_label_image(tmp_path / f"{case.name}_labels{suffix}", reference=back)
        assert json.loads((tmp_path / "labels.json").read_text())["labels"]["Lens_L"] == PHANTOM_SET.label_of("Lens_L")
    elif fmt == "pddca":
        back = read_image(tmp_path / case.name / "img.nrrd")
        pddca = ORGAN_SETS["pddca9"]
        expected, _ = convert_labels(labels, PHANTOM_SET, pddca)
        for name in pddca.names:
            mask = read_label_image(tmp_path / case.name / "structures" / f"{PDDCA_FILE_NAMES[name]}.nrrd", back)
            assert np.array_equal(sitk.GetArrayViewFromImage(mask), expected == pddca.label_of(name)), name
        back_labels = None
    elif fmt == "nnunet":
        back = read_image(tmp_path / "imagesTr" / f"{case.name}_0000.nii.gz")
        back_labels = read_label_image(tmp_path / "labelsTr" / f"{case.name}.nii.gz", reference=back)
        dataset = json.loads((tmp_path / "dataset.json").read_text())
        assert dataset["labels"]["Bone_Mandible_R"] == PHANTOM_SET.label_of("Bone_Mandible_R")
        assert dataset["numTraining"] == 1
    else:
        back = read_image(tmp_path / case.name / "CT")
        back_labels = read_label_image(tmp_path / case.name / "labels.nrrd", reference=back)
    for what in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(back, what)(), getattr(ct, what)(), atol=1e-4), what
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct))
    if back_labels is not None:
        assert np.array_equal(sitk.GetArrayViewFromImage(back_labels), labels)


def test_writing_twice_refuses_to_overwrite(tmp_path):
    case = generate_case(6, "small")
    write_case(case, tmp_path, "nrrd")
    with pytest.raises(OutputExistsError):
        write_case(case, tmp_path, "nrrd")
    write_case(case, tmp_path, "nrrd", overwrite=True)


def test_scan_that_stops_below_the_eyes_has_no_eyes():
    case = generate_case(8, "small", z_range=(-105.0, -28.0))
    labels = sitk.GetArrayViewFromImage(case.labels)
    for name in ("Eye_L", "Lens_R", "OpticChiasm", "Pituitary"):
        assert not (labels == PHANTOM_SET.label_of(name)).any(), name
    assert (labels == PHANTOM_SET.label_of("Bone_Mandible_L")).any()


def test_noisier_scan_is_the_same_patient_with_more_noise():
    """`focusnet phantom --noise 26 34`: the same seed's anatomy, tissues and
    pose; only the noise's level moves into the range asked for."""
    calm, noisy = generate_case(3, "small"), generate_case(3, "small", noise=(26.0, 34.0))
    assert np.array_equal(sitk.GetArrayViewFromImage(calm.labels), sitk.GetArrayViewFromImage(noisy.labels))
    assert noisy.image.GetOrigin() == calm.image.GetOrigin() and noisy.image.GetSpacing() == calm.image.GetSpacing()
    assert {k: v for k, v in noisy.parameters.items() if k != "noise_sigma"} == \
        {k: v for k, v in calm.parameters.items() if k != "noise_sigma"}
    assert 26.0 <= noisy.parameters["noise_sigma"] <= 34.0 and 10.0 <= calm.parameters["noise_sigma"] <= 30.0
    # the same noise pattern, scaled: inside the head the two scans differ by
    # (sigma_noisy - sigma_calm) times one standard normal field
    inside = sitk.GetArrayViewFromImage(calm.labels) > 0
    difference = (sitk.GetArrayFromImage(noisy.image).astype(float) - sitk.GetArrayFromImage(calm.image))[inside]
    gap = noisy.parameters["noise_sigma"] - calm.parameters["noise_sigma"]
    assert difference.std() == pytest.approx(gap, rel=0.05)
    with pytest.raises(ValueError, match="noise range"):
        generate_case(3, "small", noise=(30.0, 20.0))
