"""SOS-Net heads moved between bundles: click-to-find's own heads (issue 22),
chosen per small organ at the organs' true centres, stored in the bundle
beside the pipeline's heads and used by ``focusnet worker``'s ``refine``
only; and the pipeline's heads taken from a bundle trained further
(with_sos_heads)."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FocusNetCore.bundle import BundleError, load_bundle, save_bundle, with_click_heads, with_sos_heads
from FocusNetCore.cli import main
from FocusNetCore.networks import FocusNetConfig, FocusNetV2
from FocusNetCore.phantom import generate_case, write_case
from FocusNetCore.postprocess import choose_click_heads
from FocusNetCore.preprocess import PreprocessConfig
from FocusNetCore.segment import EMBEDDED_MODEL, Segmenter
from FocusNetCore.worker import Worker

SMALL = ("Lens_L", "Lens_R", "OpticNrv_L", "OpticNrv_R", "OpticChiasm", "Pituitary")


def test_a_click_head_is_chosen_only_where_it_beats_the_pipeline():
    """Per organ: the pipeline's head at its own threshold is the bar; a
    candidate (the bundle's own head at a better threshold, or a donor's)
    must clear it consistently over the cases, not on average alone; an
    organ no case holds gets nothing."""
    thresholds = (0.3, 0.5, 0.7)
    rows = lambda *r: np.array(r, dtype=float)  # noqa: E731  (cases x thresholds)
    own = {"Lens_L": rows([0.5, 0.60, 0.80], [0.5, 0.62, 0.85], [0.4, 0.58, 0.79], [0.5, 0.61, 0.81]),
           "Lens_R": rows([0.5, 0.60, 0.50], [0.5, 0.62, 0.50], [0.4, 0.58, 0.50], [0.5, 0.61, 0.50]),
           "OpticNrv_L": rows([0.5, 0.50, 0.5], [0.5, 0.50, 0.5], [0.5, 0.50, 0.5], [0.5, 0.50, 0.5]),
           "Pituitary": rows([0.5, 0.80, 0.5], [0.5, 0.80, 0.5], [0.5, 0.80, 0.5], [0.5, 0.80, 0.5])}
    donor = {"Lens_L": own["Lens_L"], "Pituitary": own["Pituitary"],
             "Lens_R": rows([0.5, 0.80, 0.5], [0.5, 0.83, 0.5], [0.4, 0.79, 0.5], [0.5, 0.80, 0.5]),
             "OpticNrv_L": rows([0.5, 1.00, 0.5], [0.5, 0.20, 0.5], [0.5, 0.90, 0.5], [0.5, 0.30, 0.5])}  # +0.1, noisy
    chosen, report = choose_click_heads([own, donor], thresholds, (0.5,) * 6, SMALL)
    assert chosen == {"Lens_L": (0, 0.7), "Lens_R": (1, 0.5)}  # a tie goes to the bundle's own head
    assert report["Lens_L"]["pipeline"] == pytest.approx(0.6025) and report["Lens_L"]["candidates"][0]["threshold"] == 0.7
    assert report["OpticNrv_L"]["candidates"][1]["dice"] == pytest.approx(0.6) and "chosen" not in report["OpticNrv_L"]
    assert report["OpticNrv_L"]["gain_standard_error"] > 0.05
    assert "chosen" not in report["Pituitary"] and "OpticChiasm" not in report


def base_and_donor(folder, donor_thresholds, change):
    """A tiny base bundle (folder/base.pt) and a donor "trained further" from
    it (folder/donor.pt): the same S-Net and SOL-Net, each SOS-Net head
    changed by ``change(head, k)``, the donor's thresholds as given."""
    config = FocusNetConfig(width=0.125, roi_size=(8, 16, 16), sos_thresholds=(0.5,) * 6,
                            preprocess=PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_size=(64, 64), chunk_slices=16))
    torch.manual_seed(0)
    base = FocusNetV2(config)
    save_bundle(base, folder / "base.pt", {"name": "base"})
    donor = FocusNetV2(dataclasses.replace(config, sos_thresholds=tuple(donor_thresholds)))
    donor.load_state_dict(base.state_dict())
    with torch.no_grad():
        for k, head in enumerate(donor.sosnet.heads):
            change(head, k)
    save_bundle(donor, folder / "donor.pt", {"name": "donor"})
    return base, donor


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Base and donor (Lens_L's threshold 0.6) and the base with the donor's
    Lens_L head as its click-to-find head."""
    folder = tmp_path_factory.mktemp("click-heads")
    generator = torch.Generator().manual_seed(1)

    def noisy(head, k):
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
        if k == 0:
            head.head.bias.fill_(0.4)  # probabilities about the threshold 0.6: a mask to compare

    base_and_donor(folder, (0.6, 0.5, 0.5, 0.5, 0.5, 0.5), noisy)
    out = with_click_heads(folder / "base.pt", {"Lens_L": (folder / "donor.pt", 0.6)}, folder / "click.pt",
                           note="test", scores={"Lens_L": {"dice": 0.9}})
    case = generate_case(1700, "small")
    write_case(case, folder, "nrrd")
    return folder, out, case


def test_click_heads_travel_in_the_bundle_and_leave_the_pipeline_as_it_was(bundles):
    folder, out, _ = bundles
    model, meta = load_bundle(out)
    base, base_meta = load_bundle(folder / "base.pt")
    donor, donor_meta = load_bundle(folder / "donor.pt")
    assert meta["checksum"] == base_meta["checksum"]  # the segmentation's weights are the base's, unchanged
    entry = meta["click_heads"]["Lens_L"]
    assert set(meta["click_heads"]) == {"Lens_L"} and entry["threshold"] == 0.6
    for name, tensor in donor.sosnet.heads[0].state_dict().items():
        assert torch.equal(entry["state_dict"][name], tensor), name
    assert entry["from"]["checksum"] == donor_meta["checksum"] and entry["from"]["chosen_on"] == {"dice": 0.9}
    # further bundle edits keep them
    again = with_sos_heads(out, {"Pituitary": folder / "donor.pt"}, folder / "click+sos.pt")
    assert set(load_bundle(again)[1]["click_heads"]) == {"Lens_L"}
    # a changed click head is refused by name, as changed weights are
    payload = torch.load(out, weights_only=True)
    payload["click_heads"]["Lens_L"]["state_dict"]["head.bias"] += 1.0
    torch.save(payload, folder / "tampered.pt")
    with pytest.raises(BundleError, match="click-to-find head Lens_L: weights checksum mismatch"):
        load_bundle(folder / "tampered.pt")
    # a donor over another S-Net, a threshold outside (0, 1): refused, nothing written
    save_bundle(FocusNetV2(base.config), folder / "stranger.pt")
    with pytest.raises(BundleError, match="S-Net or SOL-Net weights differ"):
        with_click_heads(folder / "base.pt", {"Lens_L": (folder / "stranger.pt", 0.5)}, folder / "bad.pt")
    with pytest.raises(BundleError, match="threshold for Lens_L must lie in"):
        with_click_heads(folder / "base.pt", {"Lens_L": (folder / "donor.pt", 1.0)}, folder / "bad.pt")
    assert not (folder / "bad.pt").exists()


def test_refine_answers_with_the_click_head_as_its_donor_would(bundles):
    """The worker on the bundle with a click head for Lens_L places Lens_L
    exactly as the donor's own pipeline head would (same features, same
    head, same threshold) and every other organ as the base would."""
    folder, out, case = bundles
    ct = str(folder / f"{case.name}_ct.nrrd")
    workers = {}
    for name, path in (("click", out), ("base", folder / "base.pt"), ("donor", folder / "donor.pt")):
        workers[name] = Worker(Segmenter(path, device="cpu", precision="float32", backend="torch"))
        workers[name].open(ct)
    point = case.image.TransformContinuousIndexToPhysicalPoint([v / 2 for v in case.image.GetSize()])
    point = [point[0] + 30.0, point[1] - 60.0, point[2] + 20.0]  # somewhere in the head; the heads differ anywhere

    def mask(name, organ):
        image, region, _ = workers[name].place(organ, point)
        return sitk.GetArrayFromImage(image), region

    click, region = mask("click", "Lens_L")
    donor, donor_region = mask("donor", "Lens_L")
    base, _ = mask("base", "Lens_L")
    assert region == donor_region and np.array_equal(click, donor)
    assert click.any() and not np.array_equal(click, base)  # the click head, not the pipeline's, answered
    assert np.array_equal(mask("click", "Lens_R")[0], mask("base", "Lens_R")[0])
    answer = workers["click"].refine("Lens_L", point, str(folder / "lens.nrrd"))
    assert answer["head"] == "click"
    assert workers["click"].refine("Lens_R", point, str(folder / "lens_r.nrrd"))["head"] == "pipeline"


def test_click_heads_command_writes_the_chosen_heads(tmp_path, capsys):
    """`focusnet click-heads` on the embedded model with a donor over its
    S-Net: every small organ scored and reported, the bundle written with
    the segmentation's weights unchanged; a donor over another S-Net is
    refused by name, before any work and with nothing written."""
    base, _ = load_bundle(EMBEDDED_MODEL)
    donor = FocusNetV2(base.config)
    donor.load_state_dict(base.state_dict())
    with torch.no_grad():
        donor.sosnet.heads[1].head.bias.add_(-2.0)  # a worse right lens
    save_bundle(donor, tmp_path / "donor.pt")
    write_case(generate_case(1701, "small"), tmp_path / "cases", "nrrd")
    command = [sys.executable, "-m", "FocusNetCore", "click-heads", "--donor", str(tmp_path / "donor.pt"),
               "--data", str(tmp_path / "cases")]
    run = subprocess.run(command + ["--out", str(tmp_path / "click.pt")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in SMALL[:2]:
        assert f"{name}: Dice at the true centre (CT grid) over 1 case(s)" in run.stdout
    model, meta = load_bundle(tmp_path / "click.pt")
    assert meta["checksum"] == load_bundle(EMBEDDED_MODEL)[1]["checksum"]
    assert "Lens_R" not in (meta.get("click_heads") or {})  # the worse head is never chosen
    save_bundle(FocusNetV2(base.config), tmp_path / "stranger.pt")
    # refused in this process (the command's own error path, without another start-up)
    assert main(command[3:5] + [str(tmp_path / "stranger.pt")] + command[6:] + ["--out", str(tmp_path / "x.pt")]) == 2
    assert "stranger.pt: its S-Net or SOL-Net weights differ" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_an_sos_head_moves_between_bundles_only_over_the_same_s_net(tmp_path):
    """with_sos_heads: the donor's head for the named organ and its threshold
    come over exactly; every other weight stays the base's; a donor whose
    S-Net differs is refused (its head would read other features)."""
    def shifted(head, _):
        for p in head.parameters():
            p.data.add_(1.0)

    base, donor = base_and_donor(tmp_path, (0.5, 0.5, 0.5, 0.5, 0.8, 0.5), shifted)
    config = base.config
    out = with_sos_heads(tmp_path / "base.pt", {"OpticChiasm": tmp_path / "donor.pt"}, tmp_path / "mixed.pt",
                         note="test")
    mixed, meta = load_bundle(out)
    k = config.organs.small_names.index("OpticChiasm")
    assert mixed.config.sos_thresholds == (0.5, 0.5, 0.5, 0.5, 0.8, 0.5)
    got, was, given = mixed.state_dict(), base.state_dict(), donor.state_dict()
    for name in got:
        expected = given if name.startswith(f"sosnet.heads.{k}.") else was
        assert torch.equal(got[name], expected[name]), name
    assert meta["provenance"]["name"] == "base"
    assert meta["provenance"]["sos_heads_from"]["OpticChiasm"]["checksum"] == load_bundle(tmp_path / "donor.pt")[1]["checksum"]
    stranger = FocusNetV2(config)  # other S-Net weights
    save_bundle(stranger, tmp_path / "stranger.pt")
    with pytest.raises(BundleError, match="S-Net or SOL-Net weights differ"):
        with_sos_heads(tmp_path / "base.pt", {"Lens_L": tmp_path / "stranger.pt"}, tmp_path / "bad.pt")
    with pytest.raises(BundleError, match="not one of the small organs"):
        with_sos_heads(tmp_path / "base.pt", {"Brainstem": tmp_path / "donor.pt"}, tmp_path / "bad.pt")
    with pytest.raises(FileExistsError):
        with_sos_heads(tmp_path / "base.pt", {"OpticChiasm": tmp_path / "donor.pt"}, out)
    assert not (tmp_path / "bad.pt").exists()


def test_sos_heads_command_takes_the_named_heads(tmp_path, capsys):
    """`focusnet sos-heads`: the named organ's head and threshold from the
    donor, the rest the base's, written to --out; a malformed --head, a
    donor over another S-Net and an existing --out are refused by name,
    with nothing written."""
    def shifted(head, _):
        for p in head.parameters():
            p.data.add_(1.0)

    base, donor = base_and_donor(tmp_path, (0.5, 0.5, 0.7, 0.5, 0.5, 0.5), shifted)
    command = [sys.executable, "-m", "FocusNetCore", "sos-heads", "--model", str(tmp_path / "base.pt")]
    run = subprocess.run(command + ["--head", f"OpticNrv_L={tmp_path / 'donor.pt'}", "--note", "trained on",
                                    "--out", str(tmp_path / "mixed.pt")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    mixed, meta = load_bundle(tmp_path / "mixed.pt")
    k = base.config.organs.small_names.index("OpticNrv_L")
    assert mixed.config.sos_thresholds == (0.5, 0.5, 0.7, 0.5, 0.5, 0.5)
    got, was, given = mixed.state_dict(), base.state_dict(), donor.state_dict()
    for name in got:
        assert torch.equal(got[name], (given if name.startswith(f"sosnet.heads.{k}.") else was)[name]), name
    assert meta["provenance"]["sos_heads_from"]["OpticNrv_L"]["note"] == "trained on"

    save_bundle(FocusNetV2(base.config), tmp_path / "stranger.pt")
    for head, out, message in ((f"OpticNrv_L{tmp_path / 'donor.pt'}", "a.pt", "expected ORGAN=BUNDLE"),
                               (f"Lens_L={tmp_path / 'stranger.pt'}", "b.pt", "stranger.pt: its S-Net or SOL-Net"),
                               (f"Lens_L={tmp_path / 'donor.pt'}", "mixed.pt", "mixed.pt")):
        # refusals in this process (the command's own parser and error path, without another start-up)
        assert main(command[3:] + ["--head", head, "--out", str(tmp_path / out)]) == 2
        stderr = capsys.readouterr().err
        assert message in stderr, stderr[-2000:]
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()
    assert load_bundle(tmp_path / "mixed.pt")[1]["checksum"] == meta["checksum"]  # not overwritten
