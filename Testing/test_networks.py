import pytest
import torch

from FocusNetCore.blocks import DenseASPP, SEResBlock
from FocusNetCore.bundle import BundleError, FORMAT_VERSION, load_bundle, save_bundle
from FocusNetCore.networks import (
    FocusNetConfig, FocusNetV2, ShapeAutoencoder, SNet, argmax_3d, roi_paste, roi_pool, roi_start,
)
from FocusNetCore.preprocess import PreprocessConfig

TINY = FocusNetConfig(width=0.125, roi_size=(8, 16, 16), preprocess=PreprocessConfig(chunk_slices=8))


@pytest.mark.parametrize("size", [(6, 30, 22), (8, 32, 32), (5, 17, 19)])
def test_snet_shapes_for_sizes_not_multiple_of_4(size):
    torch.manual_seed(0)
    net = SNet(TINY).eval()
    logits, features = net(torch.randn(1, 1, *size))
    assert logits.shape == (1, 23, *size)
    assert features.shape == (1, TINY.channels(32), *size)


def test_paper_widths():
    config = FocusNetConfig()
    net = SNet(config)
    assert net.aspp.out_channels == 320  # table 10, S-Net row 8
    assert net.head.out_channels == 23
    model = FocusNetV2(config)
    assert model.solnet.head.out_channels == 6  # lenses, optic nerves, chiasm, pituitary
    assert len(model.sosnet.heads) == 6
    assert model.sosnet.heads[0].blocks[0].body[0].in_channels == 33  # features (32) + CT
    ablation = FocusNetV2(FocusNetConfig(organ_set="pddca9", sos_input="ct"))
    assert len(ablation.sosnet.heads) == 3 and ablation.sosnet.heads[0].blocks[0].body[0].in_channels == 1


def test_dilation_is_in_plane_only():
    block = SEResBlock(8, 8, dilation=2)
    assert block.body[0].dilation == (1, 2, 2)
    aspp = DenseASPP(8, 4)
    assert [layer[3].dilation for layer in aspp.layers] == [(1, 3, 3), (1, 6, 6), (1, 12, 12), (1, 18, 18)]


@pytest.mark.parametrize("centre", [(4, 16, 16), (0, 0, 0), (7, 31, 2), (3, 20, 30)])
def test_roi_pool_then_paste_reproduces_the_region(centre):
    volume = torch.randn(1, 3, 8, 32, 32)
    start = roi_start(centre, (8, 16, 16))
    roi = roi_pool(volume, start, (8, 16, 16))
    assert roi.shape == (1, 3, 8, 16, 16)
    target = torch.zeros_like(volume)
    roi_paste(target, roi, start)
    inside = target != 0
    assert torch.equal(target[inside], volume[inside])
    # Everything the ROI covered inside the volume came back, nothing else changed.
    expected = torch.zeros_like(volume, dtype=torch.bool)
    lo = [max(s, 0) for s in start]
    hi = [min(s + k, n) for s, k, n in zip(start, (8, 16, 16), volume.shape[-3:])]
    expected[..., lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    assert torch.equal(inside, expected)
    # Outside the volume the ROI is zero-padded.
    assert roi.abs().sum() > 0 and (roi == 0).sum() >= roi.numel() - expected.sum()


def test_argmax_3d():
    volume = torch.zeros(5, 7, 9)
    volume[3, 2, 8] = 1.0
    assert argmax_3d(volume) == (3, 2, 8)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = FocusNetV2(TINY).train()
    out = model(torch.randn(1, 1, 8, 24, 24))
    loss = out["logits"].mean() + out["heatmaps"].mean() + sum(m.mean() for m in out["masks"])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    aae = ShapeAutoencoder((8, 16, 16), width=0.125)
    recon, latent, feats = aae(torch.rand(2, 1, 8, 16, 16))
    assert recon.shape == (2, 1, 8, 16, 16) and latent.shape == (2, 512)
    (recon.mean() + latent.mean() + sum(f.mean() for f in feats)).backward()
    assert all(p.grad is not None for p in aae.parameters())


def test_autoencoder_paper_roi():
    aae = ShapeAutoencoder((8, 64, 64))
    recon, latent, feats = aae(torch.rand(1, 1, 8, 64, 64))
    assert recon.shape == (1, 1, 8, 64, 64) and latent.shape == (1, 512)
    assert [f.shape[1] for f in feats] == [128, 64]
    assert 0.0 <= float(recon.detach().min()) and float(recon.detach().max()) <= 1.0


def _tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    return FocusNetV2(FocusNetConfig(**{**TINY.__dict__, **changes})).eval()


def test_chunk_size_does_not_change_which_small_organs_are_found():
    model = _tiny_model(heatmap_threshold=0.0)
    volume = torch.randn(1, 1, 16, 24, 24)
    chunked = model.segment(volume)
    big = _tiny_model(heatmap_threshold=0.0, preprocess=PreprocessConfig(chunk_slices=16))
    big.load_state_dict(model.state_dict())
    whole = big.segment(volume)
    # BatchNorm in eval mode and per-chunk S-Net: features agree exactly only
    # where a chunk sees the same context; ROI pooling and paste must not add
    # differences of their own: the small-organ decisions use the same centre.
    assert chunked["labels"].shape == (1, 16, 24, 24)
    assert torch.equal(chunked["present"], whole["present"])


class _PeakAt(torch.nn.Module):
    """Stand-in SOL-Net: one heat-map peak for the first small organ at a
    chosen whole-volume position, whichever chunk holds it."""

    def __init__(self, where, chunk, organs, first=0):
        super().__init__()
        self.where, self.chunk, self.organs, self.calls, self.first = where, chunk, organs, 0, first

    def forward(self, features):
        maps = torch.zeros(1, self.organs, *features.shape[2:])
        z = self.where[0] - (self.first + self.calls * self.chunk)  # index in this chunk
        if 0 <= z < features.shape[2]:
            maps[0, 0, z, self.where[1], self.where[2]] = 1.0
        self.calls += 1
        return maps


def test_roi_across_a_chunk_border_reads_the_stitched_volume():
    model = _tiny_model(heatmap_threshold=0.5)
    chunk, roi = model.config.preprocess.chunk_slices, model.config.roi_size
    volume = torch.randn(1, 1, 20, 24, 24)
    # Chunks are counted from the top: the lowest one holds 20 % 8 = 4 slices
    # of the volume below 4 of air, so the borders are at slices 4 and 12.
    short = (-20) % chunk
    centre = (chunk - short - 1, 5, 20)  # ROI slices -1..6 straddle the border at 4, and cross two borders in-plane
    model.solnet = _PeakAt(centre, chunk, len(model.sosnet.heads), first=-short)
    result = model.segment(volume)
    assert result["present"].tolist() == [True] + [False] * (len(model.sosnet.heads) - 1)
    # The expected mask: the SOS head on the ROI of the chunk-by-chunk features, stitched.
    with torch.no_grad():
        pieces = []
        for start in range(-short, 20, chunk):
            piece = volume[:, :, max(start, 0):start + chunk]
            below = max(-start, 0)
            piece = torch.nn.functional.pad(piece, (0, 0, 0, 0, below, 0), value=float(volume.min()))
            pieces.append(model.snet(piece)[1][:, :, below:])
        features = torch.cat(pieces, dim=2)
        start = roi_start(centre, roi)
        # SOS-Net's input: features and CT, and past the volume's edge air (not 0, which is water), as training pools it
        joined = torch.cat([roi_pool(features, start, roi), roi_pool(volume, start, roi, fill=float(volume.min()))], 1)
        assert torch.equal(model.sos_roi(volume, features, start), joined)
        assert float(joined[0, -1, 0].max()) == float(volume.min())  # ROI slice -1: outside the volume
        mask = model.sosnet.heads[0](joined)[0, 0] > 0.5
    label = model.config.organs.small_labels[0]
    got = roi_pool((result["labels"] == label).unsqueeze(1).float(), start, roi)[0, 0] > 0.5
    inside = roi_pool(torch.ones_like(volume), start, roi)[0, 0] > 0.5
    assert torch.equal(got[inside], mask[inside])
    # Nowhere outside its ROI does the small organ appear.
    outside = torch.ones(1, 1, 20, 24, 24)
    roi_paste(outside, torch.zeros(1, 1, *roi), start)
    assert not ((result["labels"] == label) & (outside[:, 0] > 0)).any()


class _Peaks(torch.nn.Module):
    """Stand-in SOL-Net: equal heat-map peaks for the first small organ at
    whole-volume positions, and the real SOL-Net's maps for the others."""

    def __init__(self, solnet, where, chunk, first):
        super().__init__()
        self.solnet, self.where, self.chunk, self.first, self.calls = solnet, where, chunk, first, 0

    def forward(self, features):
        maps = self.solnet(features).clone()
        maps[0, 0] = 0.0
        for z, y, x in self.where:
            z -= self.first + self.calls * self.chunk
            if 0 <= z < features.shape[2]:
                maps[0, 0, z, y, x] = 1.0
        self.calls += 1
        return maps


@pytest.mark.parametrize("depth, where", [
    (20, [(3, 5, 20)]), (20, [(4, 10, 10)]), (20, [(11, 2, 2)]), (20, [(12, 23, 23)]), (17, [(0, 0, 0)]),
    (33, [(32, 12, 12)]), (9, [(8, 5, 5)]), (20, [(13, 4, 4), (3, 20, 20)]),  # a tie: the lower slice wins
    (33, [(24, 1, 1), (25, 1, 1)])])
def test_features_gathered_at_the_peaks_are_the_whole_volumes(depth, where):
    """Without keep_features S-Net's features are gathered chunk by chunk at
    the running heat-map peaks instead of kept whole: labels and SOS-Net's
    masks are exactly those pooled from the whole volume's features, with
    ROIs across chunk borders, at the volume's ends and on tied peaks."""
    torch.manual_seed(1)
    model = _tiny_model(heatmap_threshold=0.0)
    chunk = model.config.preprocess.chunk_slices
    model.solnet = _Peaks(model.solnet, where, chunk, first=-((-depth) % chunk))
    volume = torch.randn(1, 1, depth, 24, 24)
    with torch.no_grad():
        gathered = model.segment(volume)
        model.solnet.calls = 0
        whole = model.segment(volume, keep_features=True)
    assert "features" not in gathered and whole["features"].shape[2] == depth
    assert torch.equal(gathered["labels"], whole["labels"])
    assert torch.equal(gathered["present"], whole["present"])
    for a, b in zip(gathered["small"], whole["small"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert whole["small"][0][0] == roi_start(min(where), model.config.roi_size)
    # inference keeps no whole-volume heat maps: the same answer from the gathered peaks
    model.solnet.calls = 0
    with torch.no_grad():
        lean = model.segment(volume, keep_heatmaps=False)
    assert lean["heatmaps"] is None and torch.equal(lean["labels"], whole["labels"])


def test_absent_small_organ_gets_no_contour():
    model = _tiny_model(heatmap_threshold=1.01)  # no heat map can reach it
    result = model.segment(torch.randn(1, 1, 8, 24, 24))
    assert not result["present"].any()
    for label in model.config.organs.small_labels:
        assert not (result["labels"] == label).any()


def test_eval_mode_is_deterministic():
    model = _tiny_model()
    volume = torch.randn(1, 1, 12, 24, 24)
    a, b = model.segment(volume), model.segment(volume)
    assert torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["probabilities"], b["probabilities"])


def test_bundle_round_trip(tmp_path):
    model = _tiny_model()
    path = save_bundle(model, tmp_path / "tiny.pt", provenance={"dataset": "unit test", "cases": 0})
    loaded, meta = load_bundle(path)
    assert loaded.config == model.config
    assert meta["organs"]["Lens_L"] == 3 and meta["provenance"]["dataset"] == "unit test"
    volume = torch.randn(1, 1, 8, 24, 24)
    assert torch.equal(loaded.segment(volume)["labels"], model.segment(volume)["labels"])
    # weights_only loading is what makes a foreign file safe: it holds no code.
    torch.load(path, weights_only=True)


def test_bundle_refuses_tampered_truncated_and_newer(tmp_path):
    model = _tiny_model()
    path = save_bundle(model, tmp_path / "tiny.pt")
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1.0
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(tmp_path / "tampered.pt")
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated.pt: not a readable"):
        load_bundle(tmp_path / "truncated.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(BundleError, match="newer than this FocusNet"):
        load_bundle(tmp_path / "newer.pt")
    with pytest.raises(FileExistsError):
        save_bundle(model, path)


class _VotesFor(torch.nn.Module):
    """Stand-in S-Net: the real one, with one organ winning in a block."""

    def __init__(self, snet, label):
        super().__init__()
        self.snet, self.label = snet, label

    def forward(self, x):
        logits, features = self.snet(x)
        logits = logits.clone()
        logits[:, self.label, 2:5, 8:12, 8:12] += 1e3
        return logits, features


def test_a_small_organ_sol_net_misses_keeps_s_nets_contour_only_when_asked():
    """heatmap_threshold above every peak: SOL-Net finds no small organ.
    "absent" (the default) gives them no contour; "snet" keeps what S-Net
    drew for each, exactly."""
    volume = torch.randn(1, 1, 16, 24, 24)
    small = _tiny_model().config.organs.small_labels

    def model(**changes):
        m = _tiny_model(heatmap_threshold=1e9, **changes)
        m.snet = _VotesFor(m.snet, small[0])
        return m

    snet_alone = model().segment(volume, small_organ_branch=False)["labels"]
    drawn = [label for label in small if bool((snet_alone == label).any())]
    assert small[0] in drawn
    absent = model().segment(volume)
    assert not any(bool((absent["labels"] == label).any()) for label in small)
    assert not absent["present"].any()
    kept = model(below_threshold="snet").segment(volume)
    for label in small:
        assert torch.equal(kept["labels"] == label, snet_alone == label)
    assert kept["present"].tolist() == [label in drawn for label in small]
    with pytest.raises(ValueError, match="below_threshold"):
        _tiny_model(below_threshold="maybe")
