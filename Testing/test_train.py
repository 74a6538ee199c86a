import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import pytest
import torch

from FocusNetCore.bundle import load_bundle
from FocusNetCore.data import (
    AugmentConfig, CachedCase, augment, choose_z, choose_z_on_organ, discover_cases, heatmaps, load_case,
    load_training_cases, mirror_chunk, sample_chunk,
)
from FocusNetCore.organs import ORGAN_SETS
from FocusNetCore.phantom import generate_case, write_case
from FocusNetCore.preprocess import PreprocessConfig
from FocusNetCore.train import TrainConfig, Trainer, load_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-test.yaml"


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    for seed in (300, 301, 302):
        write_case(generate_case(seed, "small"), folder, "nrrd")
    return folder


def test_config_base_and_overrides(tmp_path):
    v1 = load_config(ROOT / "configs" / "phantom-cpu-focusnetv1.yaml")
    v2 = load_config(ROOT / "configs" / "phantom-cpu.yaml")
    assert not v1.adversarial and v2.adversarial and v1.network == v2.network and v1.stages == v2.stages
    (tmp_path / "a.yaml").write_text("base: b.yaml\nlr: 0.001\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_a_stage_a_child_config_adds_takes_its_place_in_the_schedule():
    """``base:`` merges the stages mapping; a stage the child adds runs where
    the schedule puts it (snet_fixed_bn between snet and solnet), not last."""
    config = load_config(ROOT / "configs" / "phantom-cpu-fixed-bn.yaml")
    assert [name for name, _ in config.stages] == ["snet", "snet_fixed_bn", "solnet", "aae_pretrain", "sos"]
    assert dict(config.stages)["snet"] == dict(load_config(ROOT / "configs" / "phantom-cpu-solnet.yaml").stages)["snet"]


def test_configs_load_and_reject_unknown_keys(tmp_path):
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert paper.network.width == 1.0 and paper.lr == 5e-4 and paper.shape_weight == 5.0
    assert paper.adversarial_weight == 0.001 and paper.network.preprocess.spacing == (1.0, 1.0, 3.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("network: {width: 0.5}\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown training configuration keys: \\['learning_rate'\\]"):
        load_config(bad)
    bad.write_text("stages: {snet: 1, warmup: 2}\n")
    with pytest.raises(ValueError, match="unknown stage 'warmup'"):
        load_config(bad)


def test_discovers_every_layout_and_reports_bad_cases(tmp_path):
    case = generate_case(310, "small")
    for fmt in ("nrrd", "pddca", "nnunet", "dicom"):
        write_case(case, tmp_path / fmt, fmt)
        sources, problems = discover_cases(tmp_path / fmt)
        assert [s.name for s in sources] == [case.name], fmt
        assert not problems
    # PDDCA: 9 organs, the mandible whole; a patient without a mandible file has it absent.
    (tmp_path / "pddca" / case.name / "structures" / "Mandible.nrrd").unlink()
    sources, _ = discover_cases(tmp_path / "pddca")
    image, labels, present = load_case(sources[0], ORGAN_SETS["pddca9"])
    assert not present[ORGAN_SETS["pddca9"].label_of("Bone_Mandible")]
    assert present[ORGAN_SETS["pddca9"].label_of("Brainstem")]
    # A corrupt case is named and skipped, the others load.
    write_case(generate_case(311, "small"), tmp_path / "nrrd", "nrrd")
    (tmp_path / "nrrd" / f"{case.name}_ct.nrrd").write_bytes(b"garbage")
    messages = []
    cases, problems = load_training_cases(tmp_path / "nrrd", tmp_path / "cache", PreprocessConfig(), ORGAN_SETS["oar22"],
                                          log=messages.append)
    assert [c.name for c in cases] == ["phantom_0311"]
    assert len(problems) == 1 and case.name in problems[0]
    assert any("1 problem(s); 1 case(s) usable" in m for m in messages)


def test_cache_is_reused(phantom_data, tmp_path):
    config, organs = PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_size=(64, 64)), ORGAN_SETS["oar22"]
    first, _ = load_training_cases(phantom_data, tmp_path, config, organs)
    files = sorted(tmp_path.glob("*/image.npy"))
    assert len(files) == 3
    stamp = [f.stat().st_mtime_ns for f in files]
    second, _ = load_training_cases(phantom_data, tmp_path, config, organs)
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.glob("*/image.npy"))] == stamp
    assert np.array_equal(first[0].labels, second[0].labels)
    # Memory-mappable files: a crop reads its slices; the whole arrays are read on demand only.
    assert np.load(files[0], mmap_mode="r").dtype == np.float16
    image, labels = second[0].slab(2, 5)
    assert image.dtype == np.float32 and np.array_equal(image, second[0].image[2:5])
    assert np.array_equal(labels, second[0].labels[2:5]) and second[0].depth == second[0].image.shape[0]
    assert second[0].z_extents == CachedCase("x", second[0].image, second[0].labels, second[0].present).z_extents


def test_augmentation_moves_image_and_labels_together():
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 64, 48), np.uint8)
    labels[:, 20:30, 10:22] = 1
    labels[:, 40:50, 30:40] = 2
    image = labels.astype(np.float32) * 100.0 - 1.0
    for _ in range(5):
        img, lab = augment(image, labels, rng, AugmentConfig())
        core = lab == 2
        if core.sum() > 20:
            assert np.median(img[core]) == pytest.approx(199.0, abs=1.0)
        assert set(np.unique(lab)) <= {0, 1, 2}
    same, lab = augment(image, labels, rng, AugmentConfig(enabled=False))
    assert np.array_equal(lab, labels)


def test_mirror_augmentation_keeps_left_organs_on_the_patients_left(phantom_data, tmp_path):
    organs = ORGAN_SETS["oar22"]
    table = organs.mirror_labels
    assert table[organs.label_of("Parotid_L")] == organs.label_of("Parotid_R")
    assert table[organs.label_of("Ear_Internal_R")] == organs.label_of("Ear_Internal_L")
    assert table[organs.label_of("Brainstem")] == organs.label_of("Brainstem") and table[0] == 0
    assert [table[t] for t in table] == list(range(organs.num_classes))
    pddca = ORGAN_SETS["pddca9"]  # the whole mandible has no partner
    assert pddca.mirror_labels[pddca.label_of("Bone_Mandible")] == pddca.label_of("Bone_Mandible")

    cases, _ = load_training_cases(phantom_data, tmp_path, PreprocessConfig(spacing=(3.0, 3.0, 3.0)), organs)
    case = CachedCase(cases[0].name, cases[0].image, cases[0].labels, cases[0].present.copy())
    case.present[organs.label_of("Parotid_L")] = False  # as if the case lacked a left parotid contour
    pairs = [("Eye_L", "Eye_R"), ("Parotid_L", "Parotid_R"), ("Bone_Mandible_L", "Bone_Mandible_R")]

    def column(labels, name):
        return np.nonzero(labels == organs.label_of(name))[2].mean()

    # The model grid is LPS: the patient's left lies at the larger column index.
    for left, right in pairs:
        assert column(case.labels, left) > column(case.labels, right)
    image, labels, present = mirror_chunk(case.image, case.labels, case.present, table)
    width = case.labels.shape[2]
    for left, right in pairs:
        assert column(labels, left) > column(labels, right)
        assert column(labels, left) == pytest.approx(width - 1 - column(case.labels, right))
    assert np.array_equal(image, case.image[..., ::-1])
    assert not present[organs.label_of("Parotid_R")] and present[organs.label_of("Parotid_L")]
    assert np.array_equal(mirror_chunk(image, labels, present, table)[1], case.labels)

    # In sampling: mirror 1 always mirrors, 0 never; no affine so the crops compare.
    depth = case.labels.shape[0]
    plain = AugmentConfig(max_translation=0, max_rotation_deg=0, scale=(1.0, 1.0))
    _, same, flags = sample_chunk(case, depth, np.random.default_rng(1), plain, mirror_labels=table)
    assert np.array_equal(same, case.labels) and flags is case.present
    flipped = AugmentConfig(max_translation=0, max_rotation_deg=0, scale=(1.0, 1.0), mirror=1.0)
    _, mirrored, flags = sample_chunk(case, depth, np.random.default_rng(1), flipped, mirror_labels=table)
    assert np.array_equal(mirrored, labels) and np.array_equal(flags, present)
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(mirror=1.5)


def test_a_tilt_rotates_out_of_plane_in_millimetres_and_reads_the_slices_it_needs():
    """augment.max_tilt_deg (issue 48: heads nodding or tipped in the scan):
    a flat layer comes out sloped by the tilt's tangent in millimetres (3 mm
    slices, 1 mm pixels), and the chunk's ends are filled from the case's
    slices beyond them, not with air."""
    from FocusNetCore.data import tilt_chunk

    labels = np.zeros((30, 64, 64), np.uint8)
    labels[15] = 1  # a flat layer, 3 mm thick
    _, tilted = tilt_chunk(labels.astype(np.float32), labels, 10.0, 0.0, (1.0, 1.0, 3.0))
    rows = [y for y in range(8, 56) if tilted[:, y, 32].any()]
    heights = [np.nonzero(tilted[:, y, 32])[0].mean() * 3.0 for y in rows]
    slope = np.polyfit(np.array(rows, float), heights, 1)[0]  # mm per mm
    assert abs(slope) == pytest.approx(np.tan(np.radians(10.0)), abs=0.03)
    _, rolled = tilt_chunk(labels.astype(np.float32), labels, 0.0, 10.0, (1.0, 1.0, 3.0))
    assert rolled[:, 32, :].any(axis=0).sum() > 40 and not np.array_equal(rolled, tilted)

    body = np.ones((60, 48, 48), np.uint8)  # organ everywhere: a tilt must not cut it at the chunk's ends
    case = CachedCase("c", body.astype(np.float32), body, np.ones(2, bool))
    config = AugmentConfig(max_translation=0, max_rotation_deg=0, scale=(1.0, 1.0), max_tilt_deg=15.0)
    image, chunk, _ = sample_chunk(case, 20, np.random.default_rng(3), config, spacing=(1.0, 1.0, 3.0))
    # (beyond the in-plane edges the scan's field of view ends: there the rotation brings in air)
    assert chunk.shape == (20, 48, 48) and chunk[:, 8:-8, 8:-8].all() and image.shape == chunk.shape
    without = AugmentConfig(max_translation=0, max_rotation_deg=0, scale=(1.0, 1.0))
    short = CachedCase("c", body[:20].astype(np.float32), body[:20], np.ones(2, bool))
    _, cut = tilt_chunk(*sample_chunk(short, 20, np.random.default_rng(3), without)[:2], 15.0, 15.0,
                        (1.0, 1.0, 3.0))
    assert not cut[[0, -1], 8:-8, 8:-8].all(), "a tilt of the chunk alone would cut the organ at its ends"
    with pytest.raises(ValueError, match="max_tilt_deg"):
        AugmentConfig(max_tilt_deg=45.0)


def test_heatmaps_peak_at_organ_centres_and_crops_keep_small_organs():
    labels = np.zeros((40, 32, 32), np.uint8)
    labels[10:13, 5:8, 20:23] = 3
    maps, centres = heatmaps(labels, [3, 4])
    assert centres == [(11, 6, 21), None]
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) == (11, 6, 21)
    assert maps[0].max() == pytest.approx(1.0) and maps[1].max() == 0.0
    case = CachedCase("c", np.zeros((100, 8, 8), np.float32), np.zeros((100, 8, 8), np.uint8), np.ones(3, bool))
    case.labels[60:66, 4, 4] = 3
    rng = np.random.default_rng(1)
    for _ in range(20):
        start = choose_z(case, 40, rng, [3])
        assert start + 3 <= 60 and 66 + 3 <= start + 40


def test_organ_crops_show_a_rare_organ_as_often_as_a_big_one():
    """With organ-centred crops each organ present is drawn alike, held whole
    when it fits; uniform crops of a tall scan rarely see a small organ."""
    case = CachedCase("c", np.zeros((300, 8, 8), np.float32), np.zeros((300, 8, 8), np.uint8), np.ones(3, bool))
    case.labels[100:104, 4, 4] = 1      # a small organ, 4 slices
    case.labels[200:260, 2:6, 2:6] = 2  # a tall one, 60 slices: more than a crop
    rng = np.random.default_rng(0)
    starts = [choose_z_on_organ(case, 24, rng) for _ in range(400)]
    whole_small = sum(s_ <= 100 and 104 <= s_ + 24 for s_ in starts)
    on_tall = sum(s_ == (200 + 260 - 24) // 2 for s_ in starts)  # centred when it cannot fit
    assert 160 < whole_small < 240 and whole_small + on_tall == 400
    uniform = [choose_z(case, 24, rng) for _ in range(400)]
    assert sum(s_ <= 100 and 104 <= s_ + 24 for s_ in uniform) < 60
    empty = CachedCase("e", np.zeros((50, 8, 8), np.float32), np.zeros((50, 8, 8), np.uint8), np.ones(3, bool))
    assert 0 <= choose_z_on_organ(empty, 24, rng) <= 26
    with pytest.raises(ValueError, match="organ_crop_fraction must be between 0 and 1"):
        TrainConfig(organ_crop_fraction=1.5)


def _run(config: TrainConfig, data, out, stop_after=None, resume=False):
    trainer = Trainer(config, data, out, "cpu", log=lambda *a: None)
    trainer.run(resume=resume, progress=False, stop_after=stop_after)
    return trainer


def test_resume_ends_with_the_same_weights(phantom_data, tmp_path):
    """Interrupted inside a stage and resumed: the same weights as a run that
    went through (with the cosine schedule, whose rate depends on where in
    the stage the run is; the constant one is a special case of it)."""
    torch.set_num_threads(1)
    config = TrainConfig.from_dict({**load_config(TINY).to_dict(), "lr_schedule": "cosine"})
    whole = _run(config, phantom_data, tmp_path / "whole")
    _run(config, phantom_data, tmp_path / "parts", stop_after=5)  # interrupted inside the solnet stage
    resumed = _run(config, phantom_data, tmp_path / "parts", resume=True)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(whole.aae.state_dict().values(), resumed.aae.state_dict().values()):
        assert torch.equal(a, b)
    rows = (tmp_path / "whole" / "validation.csv").read_text().splitlines()
    assert rows[0].startswith("step,stage,organ,dice,hd95_paper") and len(rows) > 10
    assert (tmp_path / "whole" / "validation.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def tiny_run(phantom_data, tmp_path_factory):
    """A whole run of the tiny configuration (read, never changed, by the tests)."""
    torch.set_num_threads(1)
    return train(TINY, phantom_data, tmp_path_factory.mktemp("tiny") / "run", device="cpu", progress=False,
                 log=lambda *a: None)


def test_train_command_writes_a_bundle_with_provenance(phantom_data, tiny_run):
    bundle = tiny_run
    model, meta = load_bundle(bundle)
    assert meta["provenance"]["training_cases"] == 2 and meta["provenance"]["validation_cases"] == 1
    assert "OpticChiasm" in meta["provenance"]["validation_metrics"]
    # The post-processing chosen on the validation case travels in the bundle.
    plan = meta["postprocess"]
    assert plan["cases"] == 1 and set(plan["largest_component"]) <= set(model.config.organs.names)
    assert set(plan["mean_dice_change"]) == {"largest_component", "fill_holes"}
    # Where the organs lie relative to each other in the training contours (fieldofview): the eyes above the
    # mandible, as a Segmenter of this bundle uses it to judge which organs a scan cannot hold.
    anatomy = meta["anatomy"]
    assert anatomy["cases"] == 2 and anatomy["offset_mm"]["Eye_L"]["Bone_Mandible_L"][0] > 20
    from FocusNetCore.segment import Segmenter

    assert Segmenter(bundle).anatomy == anatomy
    with pytest.raises(FileExistsError, match="--resume"):
        train(TINY, phantom_data, bundle.parent, progress=False, log=lambda *a: None)


def test_ddp_two_cpu_processes(phantom_data, tmp_path):
    """torchrun with 2 processes on the gloo backend trains and writes one bundle."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "FocusNetCore", "train", "--config", str(TINY), "--data", str(phantom_data),
           "--out", str(tmp_path / "ddp"), "--device", "cpu", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    model, meta = load_bundle(tmp_path / "ddp" / "model.pt")
    assert meta["provenance"]["world_size"] == 2


def test_branch_an_ablation_after_the_shared_stages(phantom_data, tmp_path):
    """FocusNetv1 (no autoencoder) branches from a FocusNetv2 run after S-Net
    and SOL-Net, as the paper's ablation shares them; a checkpoint taken
    before SOL-Net is done, or of another network, is refused."""
    torch.set_num_threads(1)
    v2 = load_config(TINY)
    _run(v2, phantom_data, tmp_path / "v2", stop_after=6)  # inside aae_pretrain: S-Net and SOL-Net done
    branch_point = tmp_path / "v2" / "checkpoint-after-solnet.pt"  # what a run keeps for its ablations
    shared = torch.load(branch_point, weights_only=True)["model"]
    v1 = TrainConfig.from_dict({**v2.to_dict(), "adversarial": False, "model_name": "FocusNetv1"})
    # A checkpoint written before a setting existed (here augment.mirror) reads it as its default.
    state = torch.load(branch_point, weights_only=True)
    older = json.loads(state["config"])
    del older["augment"]["mirror"]
    state["config"] = json.dumps(older)
    torch.save(state, branch_point)
    trainer = Trainer(v1, phantom_data, tmp_path / "v1", "cpu", log=lambda *a: None)
    trainer.branch_from(branch_point)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, shared[name]), name
    trainer.run(resume=True, progress=False)
    assert trainer.position == (len(v1.stages), 0)
    trained = trainer.model.state_dict()
    assert any(not torch.equal(trained[n], shared[n]) for n in shared if n.startswith("sosnet."))  # SOS-Net trained

    # --fresh-sos: an ablation branched from a run whose SOS-Net had trained
    # starts SOS-Net afresh (the same new weights each time), the rest shared.
    state = torch.load(branch_point, weights_only=True)
    state["model"] = {k: v + 1.0 if k.startswith("sosnet.") and v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, tmp_path / "trained-sos.pt")
    fresh = []
    for run in ("fresh1", "fresh2"):
        trainer = Trainer(v1, phantom_data, tmp_path / run, "cpu", log=lambda *a: None)
        trainer.branch_from(tmp_path / "trained-sos.pt", fresh_sos=True)
        fresh.append(trainer.model.state_dict())
    for name, value in fresh[0].items():
        assert torch.equal(value, fresh[1][name]), name
        if name.startswith("sosnet.") and "num_batches" not in name:
            assert not torch.equal(value, state["model"][name]), name
        elif not name.startswith("sosnet."):
            assert torch.equal(value, shared[name]), name

    _run(v2, phantom_data, tmp_path / "early", stop_after=4)  # inside solnet
    with pytest.raises(ValueError, match="after the snet and solnet stages"):
        Trainer(v1, phantom_data, tmp_path / "v1b", "cpu", log=lambda *a: None).branch_from(
            tmp_path / "early" / "checkpoint.pt")
    wider = TrainConfig.from_dict({**v1.to_dict(), "network": {**v1.network.to_dict(), "width": 0.25}})
    with pytest.raises(ValueError, match="different 'network'"):
        Trainer(wider, phantom_data, tmp_path / "v1c", "cpu", log=lambda *a: None).branch_from(
            tmp_path / "v2" / "checkpoint.pt")


def test_branch_with_a_longer_solnet_stage_continues_solnet(phantom_data, tmp_path):
    torch.set_num_threads(1)
    v2 = load_config(TINY)
    _run(v2, phantom_data, tmp_path / "v2", stop_after=6)
    longer = TrainConfig.from_dict({**v2.to_dict(), "stages": {**dict(v2.stages), "solnet": 4}})
    trainer = Trainer(longer, phantom_data, tmp_path / "long", "cpu", log=lambda *a: None)
    trainer.branch_from(tmp_path / "v2" / "checkpoint-after-solnet.pt")
    assert trainer.position == (1, 2)  # two more SOL-Net iterations to go
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run(resume=True, progress=False, stop_after=7)  # 3 snet + 4 solnet
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("snet."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("solnet."))


def test_each_stage_runs_at_its_own_learning_rate_and_schedule(phantom_data, tmp_path):
    """``stage_lr`` gives a stage its own Adam rate (and schedule); stages it
    leaves out use ``lr`` / ``lr_schedule`` as in the paper. The settings it
    replaced (``finetune_lr``, ``sos_lr``) still read as the same rates."""
    torch.set_num_threads(1)
    base = load_config(TINY)
    assert base.stage_lr == () and base.rate_of("finetune") == (5e-4, "constant")
    config = TrainConfig.from_dict({**base.to_dict(), "stage_lr": {"finetune": 5e-5,
                                                                   "sos": {"lr": 1e-4, "schedule": "constant"}}})
    trainer = _run(config, phantom_data, tmp_path / "sos", stop_after=8)  # inside the sos stage
    assert {key: o.param_groups[0]["lr"] for key, o in trainer.optimizers.items()} == {"sos_g": 1e-4, "sos_d": 1e-4}
    trainer.run(resume=True, progress=False, stop_after=10)  # the first fine-tune iteration
    assert trainer.stage == "finetune"
    assert {key: o.param_groups[0]["lr"] for key, o in trainer.optimizers.items()} == \
        {"finetune_g": 5e-5, "finetune_d": 5e-5}
    # what a configuration or checkpoint written before stage_lr holds
    older = {k: v for k, v in base.to_dict().items() if k != "stage_lr"}
    assert TrainConfig.from_dict({**older, "finetune_lr": 5e-5, "sos_lr": 1e-4}).stage_lr == (
        ("aae_pretrain", 1e-4, "constant"), ("sos", 1e-4, "constant"), ("finetune", 5e-5, "constant"))
    for bad, message in (({"finetune": 0}, "finetune's rate must be a positive number"),
                         ({"warmup": 1e-3}, "unknown stage 'warmup'"),
                         ({"solnet": {"lr": 1e-3, "schedule": "linear"}}, "solnet's schedule must be one of"),
                         ({"solnet": {"rate": 1e-3}}, "solnet takes lr and schedule")):
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict({**base.to_dict(), "stage_lr": bad})


def test_cosine_schedule_lowers_the_rate_within_each_stage(phantom_data, tmp_path):
    """``lr_schedule: cosine``: each stage starts at its own rate and lowers it
    along half a cosine; a stage with a schedule of its own keeps it."""
    torch.set_num_threads(1)
    base = load_config(TINY)
    assert base.lr_schedule == "constant"
    config = TrainConfig.from_dict({**base.to_dict(), "lr_schedule": "cosine",
                                    "stage_lr": {"finetune": 5e-5, "solnet": {"lr": 2e-3, "schedule": "constant"}}})
    trainer = Trainer(config, phantom_data, tmp_path / "run", "cpu", log=lambda *a: None)
    expected = {2: ("snet", 5e-4 * 0.75),      # iteration 1 of 3: (1 + cos(pi / 3)) / 2
                4: ("solnet", 2e-3),           # iteration 0 of the next stage: its own rate, constant
                5: ("solnet", 2e-3),
                11: ("finetune_g", 5e-5 * 0.5)}
    for stop, (key, lr) in expected.items():
        trainer.run(resume=stop > 2, progress=False, stop_after=stop)
        assert trainer.optimizers[key].param_groups[0]["lr"] == pytest.approx(lr)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig.from_dict({**base.to_dict(), "lr_schedule": "linear"})


def test_a_run_starts_from_a_model_bundle_at_a_chosen_stage(phantom_data, tiny_run, tmp_path):
    """``--from-model BUNDLE --from-stage solnet``: S-Net stays the bundle's,
    SOL-Net and what follows train on from the bundle's weights; the bundle
    written says where it started. A bundle of another network is refused by
    name of what differs."""
    torch.set_num_threads(1)
    config = load_config(TINY)
    first = tiny_run
    shipped, _ = load_bundle(first)
    second = train(TINY, phantom_data, tmp_path / "second", device="cpu", progress=False, log=lambda *a: None,
                   from_model=first, from_stage="solnet")
    model, meta = load_bundle(second)
    ours, theirs = model.state_dict(), shipped.state_dict()
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("solnet."))
    assert meta["provenance"]["started_from"]["stage"] == "solnet"
    assert meta["provenance"]["started_from"]["checksum"] == load_bundle(first)[1]["checksum"]
    # S-Net is not trained before the fine-tune: stop inside SOL-Net and compare
    trainer = Trainer(config, phantom_data, tmp_path / "third", "cpu", log=lambda *a: None)
    trainer.start_from_model(first, "solnet")
    trainer.run(resume=True, progress=False, stop_after=config.stages[0][1] + 1)
    assert trainer.stage == "solnet"
    now = trainer.model.state_dict()
    assert all(torch.equal(now[k], theirs[k]) for k in now if k.startswith("snet."))
    assert any(not torch.equal(now[k], theirs[k]) for k in now if k.startswith("solnet."))
    wider = TrainConfig.from_dict({**config.to_dict(), "network": {**config.network.to_dict(), "width": 0.25}})
    with pytest.raises(ValueError, match="its network differs from this configuration's in width"):
        Trainer(wider, phantom_data, tmp_path / "fourth", "cpu", log=lambda *a: None).start_from_model(first, "sos")
    with pytest.raises(ValueError, match="--from-model and --from-stage go together"):
        train(TINY, phantom_data, tmp_path / "fifth", device="cpu", progress=False, from_model=first)


def _tiny(**overrides):
    return TrainConfig.from_dict({**load_config(TINY).to_dict(), **overrides})


def test_non_finite_steps_are_skipped_and_counted_then_stop_the_run(phantom_data, tmp_path, monkeypatch):
    """A NaN loss skips the step (the weights stay finite); five in a row stop
    training with an error naming the stage and iteration, and nothing
    non-finite is written."""
    from FocusNetCore import losses
    from FocusNetCore.bundle import non_finite_tensors
    from FocusNetCore.train import TrainingDiverged

    original, calls = losses.segmentation_loss, {"n": 0}

    def nan_from(first_bad, last_bad):
        def loss(*args, **kwargs):
            calls["n"] += 1
            value = original(*args, **kwargs)
            return value * float("nan") if first_bad <= calls["n"] <= last_bad else value
        return loss

    config = _tiny(stages={"snet": 8, "solnet": 0, "aae_pretrain": 0, "sos": 0, "finetune": 0})
    monkeypatch.setattr(losses, "segmentation_loss", nan_from(2, 2))
    messages = []
    trainer = Trainer(config, phantom_data, tmp_path / "run", "cpu", log=messages.append)
    trainer.run(progress=False, stop_after=8)
    assert trainer.bad_steps["total"] == 1 and trainer.provenance()["skipped_steps"] == 1
    assert any("snet iteration 2: non-finite loss or gradient, step skipped" in m for m in messages)
    assert non_finite_tensors(trainer.model.state_dict()) == []

    calls["n"] = 0
    monkeypatch.setattr(losses, "segmentation_loss", nan_from(2, 99))
    trainer = Trainer(config, phantom_data, tmp_path / "run", "cpu", log=lambda *a: None)  # the same cache
    with pytest.raises(TrainingDiverged, match="stage snet at iteration 6: 5 steps in a row"):
        trainer.run(progress=False)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # from iteration 4
    assert saved["position"] == [0, 4] and non_finite_tensors(saved["model"]) == []
    assert not (tmp_path / "run" / "model.pt").exists()


def test_bfloat16_that_measures_wrong_for_the_autoencoder_trains_it_in_float32(phantom_data, tmp_path,
                                                                                 monkeypatch):
    """The AMD Zen 4 case (bfloat16 weight gradients of the autoencoder's
    stride-2 convolution came out NaN), emulated: that network alone falls
    back to float32, says so, and the decision is in the model's provenance."""
    from test_precision import NaNGradientInBFloat16

    from FocusNetCore.networks import ShapeAutoencoder

    original = ShapeAutoencoder._forward

    def faulty(self, mask):
        recon, z, features = original(self, mask)
        return NaNGradientInBFloat16.apply(recon), z, features

    monkeypatch.setattr(ShapeAutoencoder, "_forward", faulty)
    messages = []
    config = _tiny(precision="bfloat16", stages={"snet": 1, "solnet": 1, "aae_pretrain": 1, "sos": 1,
                                                   "finetune": 0})
    trainer = Trainer(config, phantom_data, tmp_path / "run", "cpu", log=messages.append)
    assert trainer.precision_probe["focusnet"] == "bfloat16"
    assert trainer.precision_probe["autoencoder"].startswith("float32 (the gradient of ")
    assert trainer.aae.float32_only and trainer.precision == "bfloat16"
    assert any("bfloat16 measured wrong for the autoencoder" in m for m in messages)
    stage_index = [name for name, _ in config.stages].index("aae_pretrain")
    trainer._set_trainable("aae_pretrain")
    loss = trainer._step("aae_pretrain", stage_index, 0)  # the autoencoder inside bfloat16 autocast
    assert math.isfinite(loss) and trainer.bad_steps["total"] == 0
    assert trainer.provenance()["precision_probe"] == trainer.precision_probe


def test_localisation_metrics_measure_the_peak_distance_in_mm():
    """Validation's SOL-Net metric: the heat map's maximum against the organ's
    centre, in mm of the model grid's (z, y, x) spacing, and whether the peak
    clears the presence threshold; organs absent from the truth are left out."""
    from FocusNetCore.train import localisation_metrics

    labels = np.zeros((10, 20, 20), np.uint8)
    labels[4:7, 9:12, 2:5] = 7          # centre (5, 10, 3)
    heat = torch.zeros((2, 10, 20, 20))
    heat[0, 5, 10, 7] = 0.8             # 4 voxels off in x
    heat[1, 1, 1, 1] = 0.9              # an organ (label 9) the truth does not hold
    out = localisation_metrics(heat, labels, (7, 9), (3.0, 2.0, 1.5), threshold=0.5)
    assert list(out) == [7]
    assert out[7]["peak_error_mm"] == pytest.approx(6.0) and out[7]["detected"] == 1.0
    assert localisation_metrics(heat, labels, (7, 9), (3.0, 2.0, 1.5), threshold=0.9)[7]["detected"] == 0.0


def _snet_norms(model):
    return {k: v.clone() for k, v in model.snet.state_dict().items() if "running_" in k}


def test_snet_fixed_bn_recomputes_snet_statistics_then_holds_them(phantom_data, tmp_path, monkeypatch):
    """The snet_fixed_bn stage replaces S-Net's BatchNorm running statistics
    (an average of the last few dozen crops) by the plain average over
    ``precise_bn_crops`` training crops, then holds them while S-Net's
    weights train on, through the joint fine-tune too; a run interrupted in
    or just before the stage resumes to the same weights."""
    import FocusNetCore.train as train_module

    torch.set_num_threads(1)
    config = _tiny(stages={"snet": 3, "snet_fixed_bn": 2, "solnet": 1, "aae_pretrain": 0, "sos": 0, "finetune": 2},
                   precise_bn_crops=5, precision="float32")
    crops = []
    original = train_module.sample_chunk

    def recording(case, depth, rng, augment_config, *args, **kwargs):
        image, labels, present = original(case, depth, rng, augment_config, *args, **kwargs)
        crops.append(image)
        return image, labels, present

    # workers=0: the crops are drawn in this process, where the recording below sees them.
    trainer = Trainer(config, phantom_data, tmp_path / "run", "cpu", log=lambda *a: None, workers=0)
    trainer.run(progress=False, stop_after=3)
    after_snet = _snet_norms(trainer.model)
    stem = copy.deepcopy(trainer.model.snet.stem[0])  # the convolution before the first BatchNorm
    monkeypatch.setattr(train_module, "sample_chunk", recording)
    trainer.run(resume=True, progress=False, stop_after=4)  # the recompute, then one iteration
    monkeypatch.setattr(train_module, "sample_chunk", original)
    fixed = _snet_norms(trainer.model)
    assert any(not torch.equal(fixed[k], after_snet[k]) for k in fixed)
    # the stem's statistics are the average over the 5 recomputing crops (the 6th crop trained)
    assert len(crops) == 6
    with torch.no_grad():
        means = [stem(torch.as_tensor(c)[None, None]).mean(dim=(0, 2, 3, 4)) for c in crops[:5]]
    assert torch.allclose(fixed["stem.1.running_mean"], torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    weights = {k: v.clone() for k, v in trainer.model.snet.state_dict().items() if "running_" not in k}
    trainer.run(resume=True, progress=False)  # to the end, the joint fine-tune included
    assert all(torch.equal(v, fixed[k]) for k, v in _snet_norms(trainer.model).items())
    now = trainer.model.snet.state_dict()
    assert any(not torch.equal(now[k], weights[k]) for k in weights if k.endswith("weight"))
    whole = _run(config, phantom_data, tmp_path / "whole")
    for (name, a), b in zip(whole.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_snet_fixed_bn_must_follow_snet_and_precede_its_readers():
    with pytest.raises(ValueError, match="list it after snet"):
        _tiny(stages={"snet_fixed_bn": 2, "snet": 3})
    with pytest.raises(ValueError, match="changes the S-Net features that solnet learn from"):
        _tiny(stages={"snet": 3, "solnet": 2, "snet_fixed_bn": 2})
    with pytest.raises(ValueError, match="precise_bn_crops must be 1 or more"):
        _tiny(stages={"snet": 3, "snet_fixed_bn": 2}, precise_bn_crops=0)


def test_a_small_organ_drawn_but_not_in_the_truth_does_not_crash_validation(phantom_data, tmp_path, monkeypatch):
    """Issue 47: with 1 mm pixels and a 64x64 crop, the final validation met a
    small organ with a Dice but no localisation error and raised KeyError
    'peak_error_mm', losing the run. The same situation, made directly: no
    localisation figures for any organ."""
    import FocusNetCore.train as train_module

    monkeypatch.setattr(train_module, "localisation_metrics", lambda *args, **kwargs: {})
    trainer = Trainer(_tiny(stages={"snet": 1, "solnet": 0, "aae_pretrain": 0, "sos": 0, "finetune": 0}),
                      phantom_data, tmp_path / "run", "cpu", log=lambda *a: None)
    summary = trainer.validate(1, "snet")
    assert summary and all("peak_error_mm" not in values for values in summary.values())


def test_a_failing_step_after_training_still_writes_the_model(phantom_data, tmp_path, monkeypatch):
    """Whatever fails after the last iteration (tuning, post-processing, the
    final validation), the trained weights are written as model.pt and the
    failure is logged and recorded in the bundle."""
    said = []

    def broken(self, *args, **kwargs):
        raise KeyError("peak_error_mm")

    monkeypatch.setattr(Trainer, "validate", broken)
    monkeypatch.setattr(Trainer, "calibrate_sos_thresholds", broken)
    bundle = train(TINY, phantom_data, tmp_path / "run", device="cpu", progress=False, log=said.append)
    assert bundle.is_file()
    model, meta = load_bundle(bundle)
    errors = meta["provenance"]["after_training_errors"]
    assert [e.split(":")[0] for e in errors] == ["SOS-Net thresholds", "final validation"]
    assert any("final validation failed after training" in line for line in said)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


@pytest.mark.parametrize("capability, native_bf16, expected", [
    ((9, 0), True, "bfloat16"),   # H100
    ((8, 0), True, "bfloat16"),   # A100
    ((7, 0), False, "float16"),   # V100
    ((7, 5), False, "float16"),   # T4
    ((6, 1), False, "float32"),   # TITAN Xp: no tensor cores
])
def test_training_precision_fits_the_gpu(monkeypatch, capability, native_bf16, expected):
    """Issue 47: bfloat16 only where the card computes it; float16 with loss
    scaling on cards with float16 tensor cores; float32 on the others. The
    reason names the card (mocked: no GPU here)."""
    from FocusNetCore import precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    chosen, why = precision.choose_for_training("auto", "cuda")
    assert chosen == expected and "Test GPU" in why and f"{capability[0]}.{capability[1]}" in why
    assert precision.resolve("auto", "cuda") == ("bfloat16" if native_bf16 else "float32")  # inference
    assert precision.choose_for_training("float32", "cuda")[0] == "float32"
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        precision.choose_for_training("half", "cuda")


def test_float16_training_scales_the_loss_and_resumes_exactly(phantom_data, tmp_path):
    """The float16 path (a GradScaler) trains finite weights, records its
    precision and reason, and an interrupted run resumed ends with the same
    weights and loss scale as one that went through."""
    torch.set_num_threads(1)
    config = _tiny(precision="float16", stages={"snet": 3, "solnet": 2, "aae_pretrain": 0, "sos": 0, "finetune": 0})
    whole = _run(config, phantom_data, tmp_path / "whole")
    assert whole.scaler is not None and whole.precision == "float16"
    assert whole.provenance()["precision_reason"] == "set in the training configuration"
    _run(config, phantom_data, tmp_path / "parts", stop_after=3)
    resumed = _run(config, phantom_data, tmp_path / "parts", resume=True)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
        assert not a.is_floating_point() or torch.isfinite(a).all(), name
    assert whole.scaler.get_scale() == resumed.scaler.get_scale()


def test_crop_workers_give_the_same_run_as_none(phantom_data, tmp_path):
    """Issue 47: crops made ahead by worker processes (memory-mapped cases,
    heat maps only where a stage uses them) train exactly the weights the
    training process alone trains."""
    torch.set_num_threads(1)
    config = _tiny(stages={"snet": 3, "solnet": 2, "aae_pretrain": 1, "sos": 2, "finetune": 1})

    def run(workers, out):
        trainer = Trainer(config, phantom_data, out, "cpu", log=lambda *a: None, workers=workers)
        trainer.run(progress=False)
        return trainer

    alone, helped = run(0, tmp_path / "alone"), run(2, tmp_path / "helped")
    for (name, a), b in zip(alone.model.state_dict().items(), helped.model.state_dict().values()):
        assert torch.equal(a, b), name
    crops = helped.crops("snet", 0)
    assert crops[0]["maps"] is None and crops[0]["centres"] is None  # S-Net: no heat maps computed
    assert helped.crops("solnet", 1)[0]["maps"] is not None
    sos = helped.crops("sos", 3)[0]
    assert sos["maps"] is None and any(c is not None for c in sos["centres"])


def test_bootstrap_interval_of_a_mean():
    from FocusNetCore.train import bootstrap_ci

    assert bootstrap_ci([0.8, 0.9]) is None  # too few cases for an interval
    low, high = bootstrap_ci([0.70, 0.75, 0.80, 0.85, 0.90, 0.95])
    assert low < 0.825 < high and high - low < 0.2


def _copy_data(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_the_test_split_is_scored_at_the_end_and_touches_no_choice(phantom_data, tmp_path):
    """Issue 47: splits.json fixes train / validation / test; everything
    tuned (thresholds, S-Net's small organs, post-processing, the final
    validation, the weights) comes from training and validation only: with
    the test case's contours poisoned, every tuned value is the same, and
    only the test-set score (segmented by the finished bundle as users run
    it) changes."""
    torch.set_num_threads(1)
    config = tmp_path / "split.yaml"
    config.write_text(f"base: {TINY}\nvalidation_cases: 1\ntest_cases: 1\n")
    clean = _copy_data(phantom_data, tmp_path / "clean")
    poisoned = _copy_data(phantom_data, tmp_path / "poisoned")
    test_labels = sorted(poisoned.glob("*_labels.nrrd"))[-1]  # the last in name order is the test case
    truth = sitk.ReadImage(str(test_labels))
    noise = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 30, sitk.GetArrayViewFromImage(truth).shape)
                                   .astype(np.uint8))
    noise.CopyInformation(truth)
    sitk.WriteImage(noise, str(test_labels))

    bundles = [train(config, data, tmp_path / f"run-{data.name}", device="cpu", progress=False,
                     log=lambda *a: None, workers=0) for data in (clean, poisoned)]
    metas = [load_bundle(b)[1] for b in bundles]
    splits = json.loads((bundles[0].parent / "splits.json").read_text())
    assert splits["test"] == [test_labels.name.replace("_labels.nrrd", "")] and len(splits["validation"]) == 1
    assert not set(splits["test"]) & set(splits["validation"] + splits["train"])
    assert not list((bundles[0].parent / "cache").glob(f"{splits['test'][0]}-*"))  # never preprocessed
    a, b = (m["provenance"] for m in metas)
    assert json.dumps(a["validation_metrics"], sort_keys=True) == json.dumps(b["validation_metrics"], sort_keys=True)
    assert a["splits"] == {"train": 1, "validation": 1, "test": 1}
    assert metas[0]["postprocess"] == metas[1]["postprocess"]
    models = [load_bundle(b)[0] for b in bundles]
    for key in ("heatmap_threshold", "sos_thresholds", "snet_small"):
        assert getattr(models[0].config, key) == getattr(models[1].config, key), key
    weights = [m.state_dict() for m in models]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert a["test_metrics"]["cases"] == 1 and b["test_metrics"]["cases"] == 1
    assert a["test_metrics"]["mean_dice"] != b["test_metrics"]["mean_dice"]  # the poison is seen by the test score only
    assert (bundles[0].parent / "test" / "evaluation.md").is_file()
    card = (bundles[0].parent / "model-card.md").read_text()
    for section in ("## What it is", "## Data", "## Figures", "## Intended use", "## Limitations"):
        assert section in card
    assert f"mean Dice {a['test_metrics']['mean_dice']:.3f}" in card and "1 training, 1 validation and 1 test" in card

    given = tmp_path / "given.json"  # a split the user wrote: a case in two parts is refused by name
    given.write_text(json.dumps({"train": splits["train"], "validation": splits["train"], "test": []}))
    with pytest.raises(ValueError, match=f"given.json: case '{splits['train'][0]}' is in both train and validation"):
        train(config, clean, tmp_path / "run-given", device="cpu", progress=False, log=lambda *a: None,
              splits=given)


def test_a_run_to_watch_and_to_stop_at_a_time_limit(phantom_data, tmp_path):
    """Issue 47: history.csv (a row per iteration: stage, loss, the
    discriminator's loss, learning rate, data and step time), progress.png,
    checkpoint-best.pt at the best validation; --max-minutes stops cleanly and
    --resume ends with the weights of an uninterrupted run."""
    import csv as csv_module

    torch.set_num_threads(1)
    config = tmp_path / "watch.yaml"
    config.write_text(f"base: {TINY}\nvalidate_every: 4\nlr_schedule: cosine\n")
    whole = train(config, phantom_data, tmp_path / "whole", device="cpu", progress=False, log=lambda *a: None,
                  workers=0)
    run = tmp_path / "stopped"
    said = []
    assert train(config, phantom_data, run, device="cpu", progress=False, log=said.append, workers=0,
                 max_minutes=1e-9) is None  # out of time after the first iteration
    assert any("stopped after" in line and "--resume continues" in line for line in said)
    assert not (run / "model.pt").exists() and (run / "checkpoint.pt").is_file()
    resumed = train(config, phantom_data, run, resume=True, device="cpu", progress=False, log=lambda *a: None,
                    workers=0)
    a, b = load_bundle(whole)[0].state_dict(), load_bundle(resumed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(run / "history.csv", newline="") as handle:
        rows = list(csv_module.DictReader(handle))
    total = sum(load_config(TINY).stages[k][1] for k in range(len(load_config(TINY).stages)))
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))  # one row per iteration, none twice
    assert {r["stage"] for r in rows} == {"snet", "solnet", "aae_pretrain", "sos", "finetune"}
    assert all(float(r["lr"]) > 0 and float(r["step_s"]) > 0 for r in rows)
    assert any(r["d_loss"] not in ("nan", "") for r in rows if r["stage"] == "sos")
    assert (run / "progress.png").stat().st_size > 5000 and (run / "checkpoint-best.pt").is_file()
    # --resume on the finished run trains nothing and says what it does instead
    said = []
    again = train(config, phantom_data, run, resume=True, device="cpu", progress=False, log=said.append, workers=0)
    assert any("training had finished" in line and "written anew" in line for line in said), said
    c = load_bundle(again)[0].state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_splits_files_are_checked_and_a_short_test_split_is_said(tmp_path, capsys):
    """A user's splits file of the wrong shape is refused saying what is
    expected; asking for more test cases than the data leave room for is
    said, not silently dropped."""
    from FocusNetCore.train import choose_splits

    config = _tiny(validation_cases=1, test_cases=1)
    names = ["a", "b", "c"]
    for text in ('{"train": "a", "validation": ["b"]}', '["a", "b"]', '{"train": [1], "validation": ["b"]}'):
        given = tmp_path / "given.json"
        given.write_text(text)
        with pytest.raises(ValueError, match="given.json: not a splits file: expected"):
            choose_splits(names, config, tmp_path / "run", given)
    with pytest.raises(ValueError, match="missing.json: cannot read the splits file"):
        choose_splits(names, config, tmp_path / "run", tmp_path / "missing.json")
    splits = choose_splits(["a", "b"], config, tmp_path / "run2")
    assert splits["test"] == [] and "test_cases is 1 but 2 case(s) leave room for 0" in capsys.readouterr().out
    # a second start in that folder (a resume, or a run that failed before its first checkpoint) says whose splits
    assert choose_splits(["a", "b"], config, tmp_path / "run2") == splits
    assert "splits of the run already in this folder are used" in capsys.readouterr().out


def test_an_unreadable_test_case_is_skipped_and_the_others_scored(tmp_path):
    from FocusNetCore.bundleinfo import embedded_model_path
    from FocusNetCore.data import discover_cases
    from FocusNetCore.organs import ORGAN_SETS
    from FocusNetCore.train import evaluate_test_split

    for seed in (1000, 1001):
        write_case(generate_case(seed, "small"), tmp_path / "data", "nrrd")
    broken = sorted((tmp_path / "data").glob("*_ct.nrrd"))[0]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    sources, _ = discover_cases(tmp_path / "data")
    said = []
    scores = evaluate_test_split(embedded_model_path(), sources, ORGAN_SETS["oar22"], tmp_path / "test", "cpu",
                                 said.append)
    assert scores["cases"] == 1 and len(scores["skipped"]) == 1 and broken.name.split("_ct")[0] in scores["skipped"][0]
    assert scores["mean_dice"] > 0.7 and any("test case skipped" in line for line in said)
