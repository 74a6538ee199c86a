"""OpenVINO runs S-Net and SOL-Net over the scan on the CPU (issue 23): the
same labels, features and heat maps as PyTorch, a converted model that is
cached and rebuilt when damaged, and plain refusals."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FocusNetCore import openvino_backend
from FocusNetCore.networks import FocusNetConfig, FocusNetV2
from FocusNetCore.phantom import generate_case
from FocusNetCore.precision import for_inference
from FocusNetCore.preprocess import PreprocessConfig, preprocess
from FocusNetCore.segment import Segmenter

pytest.importorskip("openvino")

TINY = FocusNetConfig(width=0.125, roi_size=(8, 16, 16), heatmap_threshold=0.0,
                      preprocess=PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_size=(64, 64), chunk_slices=16))


def test_the_embedded_model_draws_the_same_organs_through_openvino():
    case = generate_case(1000, "small")
    torch_run = Segmenter(device="cpu", precision="float32", backend="torch")
    openvino_run = Segmenter(device="cpu", precision="float32", backend="openvino")
    assert torch_run.model_info["backend"] == "torch" and openvino_run.model_info["backend"] == "openvino"
    expected = sitk.GetArrayFromImage(torch_run.segment(case.image).labels)
    got = sitk.GetArrayFromImage(openvino_run.segment(case.image).labels)
    # float32 sums in another order: a voxel where two organs tie may fall the
    # other way (2 voxels of 1.36 million measured), nothing more
    assert int((got != expected).sum()) <= 20
    # and what the small-organ branch and click to find read: features and heat maps
    pre = preprocess(case.image, torch_run.config.preprocess)
    volume = torch.as_tensor(pre.image)[None, None]
    with torch.inference_mode():
        a = torch_run.model.segment(volume, keep_features=True)
        b = openvino_run.model.segment(volume, keep_features=True)
    for name in ("features", "heatmaps"):
        assert a[name].shape == b[name].shape
        # float32 sums in another order: equal to the fourth digit (measured: 1.6e-4 of the largest heat-map
        # value with the 80-slice chunks of the current bundle, a few units in the fifth digit before)
        assert float((a[name] - b[name]).abs().max()) <= 1e-3 * float(a[name].abs().max()), name
    # what the branch and click to find take from the heat maps: each small organ's peak, the same voxel
    for k in range(a["heatmaps"].shape[1]):
        assert int(a["heatmaps"][0, k].argmax()) == int(b["heatmaps"][0, k].argmax()), k
    changed = (a["labels"] != b["labels"])[0].nonzero().tolist()
    assert len(changed) <= 5, len(changed)
    for z, y, x in changed:  # each a near-tie of S-Net's soft-max in PyTorch's own run
        mine, theirs = int(a["labels"][0, z, y, x]), int(b["labels"][0, z, y, x])
        p = a["probabilities"][0, :, z, y, x].int()
        assert abs(int(p[mine]) - int(p[theirs])) <= 3, (z, y, x, mine, theirs, p.tolist())


def test_the_converted_model_is_cached_and_a_damaged_entry_converted_again(tmp_path, capfd):
    torch.manual_seed(0)
    model = for_inference(FocusNetV2(TINY), "float32")
    piece = torch.randn(1, 1, 16, 64, 64)
    with torch.inference_mode():
        logits, features = model.snet(piece)
        heatmaps = model.solnet(features)

    def chunks():
        return openvino_backend.OpenVINOChunks(model.snet, model.solnet, "tiny-weights", TINY.to_dict(),
                                               "float32", folder=tmp_path)

    first = chunks()
    assert first.source == "converted"
    entries = list((tmp_path / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "chunk.xml").is_file()
    second = chunks()
    assert second.source == "cache"
    for got in (first(piece), second(piece)):
        for expected, value in zip((logits, features, heatmaps), got):
            assert value.shape == expected.shape
            assert float((value - expected).abs().max()) < 1e-4
    (entries[0] / "chunk.xml").write_text("<not a model")
    third = chunks()
    assert third.source == "converted"
    assert "unreadable" in capfd.readouterr().err
    assert float((third(piece)[2] - heatmaps).abs().max()) < 1e-4
    # another network configuration (or other weights) is another entry
    other = openvino_backend.OpenVINOChunks(model.snet, model.solnet, "other-weights", TINY.to_dict(), "float32",
                                            folder=tmp_path)
    assert other.source == "converted" and len(list((tmp_path / "openvino").iterdir())) == 2


def test_backend_choice_and_refusals(monkeypatch):
    assert openvino_backend.resolve("auto", "cpu") == "openvino"
    assert openvino_backend.resolve("auto", "cuda") == "torch"
    assert openvino_backend.resolve("torch", "cpu") == "torch"
    with pytest.raises(openvino_backend.BackendError, match="CPU only"):
        openvino_backend.resolve("openvino", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        openvino_backend.resolve("tensorrt", "cpu")
    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    assert openvino_backend.resolve("auto", "cpu") == "torch"
    with pytest.raises(openvino_backend.BackendError, match="pip install openvino"):
        openvino_backend.resolve("openvino", "cpu")


def test_segment_command_reports_its_backend(tmp_path, tiny_bundle):
    """The CLI's --backend reaches the segmenter and its report (the embedded
    model through each backend is the first test's)."""
    import subprocess
    import sys

    from FocusNetCore.phantom import write_case

    write_case(generate_case(401, "small"), tmp_path / "in", "nrrd")
    ct = next((tmp_path / "in").glob("*_ct.nrrd"))
    for backend in ("torch", "auto"):
        out = subprocess.run([sys.executable, "-m", "FocusNetCore", "segment", str(ct), "--out",
                              str(tmp_path / backend), "--backend", backend, "--device", "cpu",
                              "--model", str(tiny_bundle)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        report = json.loads(next((tmp_path / backend).glob("*.json")).read_text())
        assert report["model"]["backend"] == ("torch" if backend == "torch" else "openvino")


def test_bfloat16_is_measured_before_it_is_used(tmp_path):
    """As on the PyTorch path, bfloat16 is checked on a fixed input against
    float32 before use, and off-tolerance answers fall back to float32 (here
    a reference network with other weights stands in for a machine whose
    bfloat16 is wrong)."""
    torch.manual_seed(0)
    model = for_inference(FocusNetV2(TINY), "float32")
    chunks = openvino_backend.OpenVINOChunks(model.snet, model.solnet, "tiny-weights", TINY.to_dict(), "bfloat16",
                                             folder=tmp_path)
    assert chunks.check_bfloat16() == "" and chunks.precision == "bfloat16"
    chunks.snet = for_inference(FocusNetV2(TINY), "float32").snet  # other weights: far from what OpenVINO computes
    problem = chunks.check_bfloat16()
    assert "differs from float32" in problem
    assert chunks.precision == "float32" and chunks.settings["INFERENCE_PRECISION_HINT"] == "f32"
    assert openvino_backend.OpenVINOChunks(model.snet, model.solnet, "tiny-weights", TINY.to_dict(), "float32",
                                           folder=tmp_path).check_bfloat16() == ""
