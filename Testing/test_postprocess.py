"""Post-processing on the model grid: largest connected component and hole
filling per organ, chosen on validation cases, stored in the bundle and
applied by every inference."""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FocusNetCore.bundle import load_bundle, with_postprocess
from FocusNetCore.metrics import hausdorff95
from FocusNetCore.organs import ORGAN_SETS
from FocusNetCore.phantom import generate_case
from FocusNetCore.postprocess import apply, choose, mean_dice
from FocusNetCore.segment import EMBEDDED_MODEL, Segmenter

ORGANS = ORGAN_SETS["oar22"]
PAROTID, BRAINSTEM = ORGANS.label_of("Parotid_L"), ORGANS.label_of("Brainstem")


def ball(shape, centre, radius):
    z, y, x = np.indices(shape)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def test_a_stray_island_goes_and_the_distance_comes_back():
    truth = np.zeros((40, 60, 60), np.uint8)
    truth[ball(truth.shape, (20, 20, 20), 8)] = PAROTID
    predicted = truth.copy()
    predicted[ball(truth.shape, (20, 48, 48), 4)] = PAROTID  # an island 40 voxels away, 1/5 of the surface
    plan = {"largest_component": ["Parotid_L"], "fill_holes": []}
    cleaned = apply(predicted, plan, ORGANS)
    assert np.array_equal(cleaned, truth)
    before = hausdorff95(predicted == PAROTID, truth == PAROTID, (2.0, 2.0, 2.0))["hd95_paper"]
    after = hausdorff95(cleaned == PAROTID, truth == PAROTID, (2.0, 2.0, 2.0))["hd95_paper"]
    assert before > 10 and after == 0.0
    assert np.array_equal(apply(predicted, None, ORGANS), predicted), "no plan, no change"


def test_holes_are_filled_but_never_with_another_organs_voxels():
    labels = np.zeros((30, 40, 40), np.uint8)
    labels[ball(labels.shape, (15, 20, 20), 10)] = BRAINSTEM
    labels[ball(labels.shape, (15, 20, 20), 3)] = 0                 # a hole
    labels[15, 20, 20] = PAROTID                                      # another organ inside it
    out = apply(labels, {"largest_component": [], "fill_holes": ["Brainstem"]}, ORGANS)
    assert out[15, 20, 20] == PAROTID
    assert (out == BRAINSTEM).sum() == (ball(labels.shape, (15, 20, 20), 10)).sum() - 1
    assert not ndimage.binary_fill_holes(out == BRAINSTEM).sum() > (out == BRAINSTEM).sum() + 1


def test_choose_keeps_a_step_only_where_it_does_not_cost_dice():
    """Parotid_L truly has two parts here: keeping the largest one costs
    Dice, so it is not chosen; the brainstem's island is false, so it is."""
    truth = np.zeros((40, 60, 60), np.uint8)
    truth[ball(truth.shape, (20, 15, 15), 7)] = PAROTID
    truth[ball(truth.shape, (20, 45, 45), 6)] = PAROTID
    truth[ball(truth.shape, (10, 45, 15), 5)] = BRAINSTEM
    predicted = truth.copy()
    predicted[ball(truth.shape, (32, 15, 45), 2)] = BRAINSTEM
    plan = choose([(predicted, truth)], ORGANS)
    assert "Brainstem" in plan["largest_component"] and "Parotid_L" not in plan["largest_component"]
    assert plan["mean_dice_change"]["largest_component"]["Parotid_L"] < -0.1
    assert mean_dice([(predicted, truth)], ORGANS, plan) > mean_dice([(predicted, truth)], ORGANS)


def test_the_bundles_plan_is_applied_by_inference(tmp_path):
    """A plan written into a copy of the embedded bundle changes what
    `focusnet segment` draws, and only as the plan says: every organ in
    the plan comes out as one connected piece."""
    case = generate_case(1500, "small")
    plain = Segmenter(device="cpu", precision="float32")
    everything = {"largest_component": list(ORGANS.names), "fill_holes": list(ORGANS.names)}
    bundle = with_postprocess(EMBEDDED_MODEL, everything, tmp_path / "model.pt")
    _, meta = load_bundle(bundle)
    assert meta["postprocess"] == everything and meta["checksum"] == plain.meta["checksum"]
    planned = Segmenter(bundle, device="cpu", precision="float32")
    assert planned.model_info["postprocess"]["largest_component"] == list(ORGANS.names)
    assert planned.config.preprocess == plain.config.preprocess  # no chunk depth given: the bundle's own
    labels = sitk.GetArrayFromImage(planned.segment(case.image).labels)
    for name in ORGANS.names:
        mask = labels == ORGANS.label_of(name)
        if mask.any():
            assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] <= 2, name  # one piece (resampling may split a hair)
    with pytest.raises(FileExistsError):
        with_postprocess(EMBEDDED_MODEL, everything, bundle)


def test_postprocess_command_writes_a_new_bundle(tmp_path, tiny_bundle):
    """On a tiny bundle (the embedded model's plan is the other tests')."""
    from FocusNetCore.phantom import write_case

    for seed in (1600, 1601):
        write_case(generate_case(seed, "small"), tmp_path / "val", "nrrd")
    out = subprocess.run([sys.executable, "-m", "FocusNetCore", "postprocess", "--model", str(tiny_bundle),
                          "--data", str(tmp_path / "val"), "--chunk-slices", "24", "--out", str(tmp_path / "pp.pt")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "validation mean Dice" in out.stdout
    model, meta = load_bundle(tmp_path / "pp.pt")
    assert meta["postprocess"]["cases"] == 2
    # the chunk depth it was chosen with is the new bundle's; the weights are the same
    given, given_meta = load_bundle(tiny_bundle)
    assert model.config.preprocess.chunk_slices == 24 != given.config.preprocess.chunk_slices
    assert model.config.preprocess.spacing == given.config.preprocess.spacing
    assert meta["checksum"] == given_meta["checksum"]
    # SOS-Net's thresholds, chosen on the same cases, go into the network configuration
    assert len(model.config.sos_thresholds) == len(model.config.organs.small_names)
    # scored where the user sees the contours: on the CT's own grid, over both cases
    assert "SOS-Net threshold Lens_L" in out.stdout and "on the CT's grid" in out.stdout
    assert out.stdout.count("scored") == 2
    # and which small organs S-Net draws alone (none without clear evidence on two cases)
    assert "Lens_L: validation Dice" in out.stdout and "S-Net alone" in out.stdout
    assert set(model.config.snet_small) <= set(model.config.organs.small_names)


def test_sos_thresholds_are_chosen_where_they_raise_validation_dice():
    """A head whose probabilities spill past the organ (a lens drawn too
    large at 0.5) gets a higher threshold; one that is right at 0.5 keeps it;
    an organ no validation case holds keeps 0.5."""
    from FocusNetCore.postprocess import choose_sos_thresholds

    truth = np.zeros((4, 10, 10), bool)
    truth[1:3, 3:6, 3:6] = True
    spilling = np.where(truth, 0.97, 0.0)
    spilling[0:4, 2:7, 2:7] = np.maximum(spilling[0:4, 2:7, 2:7], 0.7)  # a rim at 0.7 around the organ
    sharp = np.where(truth, 0.8, 0.1)
    thresholds, report = choose_sos_thresholds({"Lens_L": [(spilling, truth)] * 2, "Lens_R": [(sharp, truth)]},
                                               ("Lens_L", "Lens_R", "Pituitary"))
    assert thresholds == (0.7, 0.5, 0.5)  # the threshold nearest 0.5 that drops the rim (> 0.7 is kept)
    assert report["Lens_L"]["dice"] == 1.0 and report["Lens_L"]["dice_at_0.5"] < 0.5 and report["Lens_L"]["cases"] == 2
    assert "Pituitary" not in report


def test_snet_small_is_chosen_only_where_s_net_alone_is_clearly_better():
    """Per small organ, S-Net's own contour replaces the branch's only where
    S-Net beat it by more than chance: a lens the branch draws off centre on
    every case goes to S-Net; a nerve where each wins on half the cases
    (S-Net slightly ahead on the mean) stays with the branch; an organ no
    case holds is not judged."""
    from FocusNetCore.postprocess import choose_snet_small

    lens, nerve = ORGANS.label_of("Lens_L"), ORGANS.label_of("OpticNrv_L")
    branch, snet = [], []
    for case in range(4):
        truth = np.zeros((12, 40, 40), np.uint8)
        truth[ball(truth.shape, (6, 10, 10), 3)] = lens
        truth[ball(truth.shape, (6, 28, 28), 3)] = nerve
        b, s = np.zeros_like(truth), np.zeros_like(truth)
        b[ball(truth.shape, (6, 14, 10), 3)] = lens  # the branch's lens 4 voxels off
        s[truth == lens] = lens
        b_off, s_off = (0, 3) if case % 2 == 0 else (4, 0)  # the nerve: each misses on half the cases
        b[ball(truth.shape, (6, 28 + b_off, 28), 3)] = nerve
        s[ball(truth.shape, (6, 28 + s_off, 28), 3)] = nerve
        branch.append((b, truth))
        snet.append((s, truth))
    chosen, report = choose_snet_small(branch, snet, ORGANS)
    assert chosen == ("Lens_L",)
    assert report["Lens_L"]["snet"] == 1.0 and report["Lens_L"]["branch"] < 0.8 and report["Lens_L"]["cases"] == 4
    assert report["OpticNrv_L"]["snet"] > report["OpticNrv_L"]["branch"]  # ahead on the mean, yet within noise
    assert report["OpticNrv_L"]["snet_chosen"] is False and "Pituitary" not in report


def test_snet_small_organs_keep_s_nets_contour(tmp_path):
    """A bundle whose configuration names a small organ in snet_small draws
    that organ exactly as S-Net alone does; the other small organs still
    come from the branch (S-Net's own votes for them are cleared): the left
    optic nerve, which the embedded model's branch draws."""
    from FocusNetCore.preprocess import preprocess
    import torch

    _, shipped = load_bundle(EMBEDDED_MODEL)
    bundle = with_postprocess(EMBEDDED_MODEL, shipped["postprocess"], tmp_path / "model.pt", snet_small=("Lens_R",))
    model, meta = load_bundle(bundle)
    assert model.config.snet_small == ("Lens_R",) and meta["checksum"] == shipped["checksum"]
    volume = torch.as_tensor(preprocess(generate_case(1000, "small").image, model.config.preprocess).image)[None, None]
    with torch.inference_mode():
        whole = model.segment(volume)["labels"][0].numpy()
        alone = model.segment(volume, small_organ_branch=False)["labels"][0].numpy()
    lens_r, nerve = ORGANS.label_of("Lens_R"), ORGANS.label_of("OpticNrv_L")
    assert (alone == lens_r).sum() > 10 and np.array_equal(whole == lens_r, alone == lens_r)
    assert (whole == nerve).any() and not np.array_equal(whole == nerve, alone == nerve)
    with pytest.raises(ValueError, match="snet_small must name small organs"):
        with_postprocess(EMBEDDED_MODEL, shipped["postprocess"], tmp_path / "bad.pt", snet_small=("Brainstem",))
    assert not (tmp_path / "bad.pt").exists()
