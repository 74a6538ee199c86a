"""bfloat16 decided by measurement, not by CPU flags: the probe, the fallback
at inference, and refusing to write non-finite models."""
import math

import pytest
import torch
from torch import nn

from FocusNetCore import networks
from FocusNetCore.bundle import BundleError, save_bundle
from FocusNetCore.networks import FocusNetConfig, FocusNetV2
from FocusNetCore.precision import probe_bfloat16


class NaNGradientInBFloat16(torch.autograd.Function):
    """Identity whose backward is NaN for a bfloat16 input: what oneDNN's
    bfloat16 convolution backward did on an AMD Zen 4 (AVX512-BF16, no AMX)."""

    @staticmethod
    def forward(ctx, x):
        ctx.bf16 = x.dtype == torch.bfloat16
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan") if ctx.bf16 else grad


class Faulty(nn.Module):
    def __init__(self, fault):
        super().__init__()
        self.linear, self.fault = nn.Linear(8, 8), fault

    def forward(self, x):
        y = self.linear(x)
        if self.fault == "gradient":
            return NaNGradientInBFloat16.apply(y)
        if self.fault == "offset" and y.dtype == torch.bfloat16:
            return y + 10.0
        return y


def test_probe_accepts_a_network_bfloat16_computes_well():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert probe_bfloat16(net, [torch.randn(4, 8)], "cpu", backward=True) == ""


def test_probe_catches_non_finite_gradients_and_off_tolerance_outputs():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    reason = probe_bfloat16(Faulty("gradient"), [x], "cpu", backward=True)
    assert reason == "the gradient of linear.weight is not finite in bfloat16"
    assert probe_bfloat16(Faulty("gradient"), [x], "cpu", backward=False) == ""  # forward alone is fine
    assert "output 0 differs from float32" in probe_bfloat16(Faulty("offset"), [x], "cpu")


def test_probe_leaves_the_network_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    probe_bfloat16(net, [torch.randn(6, 8)], "cpu", backward=True)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_inference_falls_back_to_float32_when_bfloat16_measures_wrong(monkeypatch, capsys):
    from FocusNetCore.segment import Segmenter

    original = networks.SNet.forward

    def broken_in_bfloat16(self, x):
        logits, features = original(self, x)
        return (logits * float("nan"), features) if x.dtype == torch.bfloat16 else (logits, features)

    monkeypatch.setattr(networks.SNet, "forward", broken_in_bfloat16)
    segmenter = Segmenter(device="cpu", precision="bfloat16")
    assert segmenter.precision == "float32"
    assert segmenter.precision_note == "S-Net's output is not finite in bfloat16"
    assert "bfloat16 measured wrong on this machine" in capsys.readouterr().err
    monkeypatch.setattr(networks.SNet, "forward", original)
    assert Segmenter(device="cpu", precision="bfloat16").precision == "bfloat16"


def test_a_model_with_non_finite_values_is_never_written(tmp_path):
    model = FocusNetV2(FocusNetConfig(width=0.125, roi_size=(8, 16, 16)))
    with torch.no_grad():
        model.snet.stem[0].weight[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(BundleError, match=r"bad.pt: refusing to write a model with non-finite values: snet.stem.0.weight"):
        save_bundle(model, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    model = FocusNetV2(FocusNetConfig(width=0.125, roi_size=(8, 16, 16), heatmap_threshold=math.nan))
    with pytest.raises(BundleError, match="heatmap_threshold = nan"):
        save_bundle(model, tmp_path / "threshold.pt")
    assert save_bundle(FocusNetV2(FocusNetConfig(width=0.125, roi_size=(8, 16, 16))), tmp_path / "ok.pt").is_file()
