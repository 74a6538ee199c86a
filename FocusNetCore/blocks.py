"""Network building blocks of FocusNetv2 (Gao et al., MedIA 2021, fig. 3, table 10).

Tensors are (B, C, D, H, W) with D the slice (z) axis. Dilation acts in-plane
only (H, W); the slice axis keeps rate 1 because small organs span only a few
slices (paper section 3.1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def in_plane(rate: int):
    """Kernel-3 dilation and padding that dilate H and W only."""
    return (1, rate, rate), (1, rate, rate)


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): global pool -> FC/r -> ReLU -> FC -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(channels, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv3d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)  # (B, C, D, H, W) * (B, C, 1, 1, 1)


class SEResBlock(nn.Module):
    """Fig. 3 SEResBlock: conv3-BN-ReLU-conv3-BN, squeeze-excitation, residual add, ReLU.

    A 1x1x1 convolution matches channels on the shortcut when they differ.
    ``dilation`` is the in-plane rate (table 10, S-Net row 7: rate 2).
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__()
        dil, pad = in_plane(dilation)
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=pad, dilation=dil, bias=False),
            nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=pad, dilation=dil, bias=False),
            nn.BatchNorm3d(out_channels),
            SqueezeExcitation(out_channels),
        )
        self.shortcut = (nn.Identity() if in_channels == out_channels else
                         nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False), nn.BatchNorm3d(out_channels)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))  # (B, out, D, H, W)


def se_stack(in_channels: int, out_channels: int, count: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(*[SEResBlock(in_channels if k == 0 else out_channels, out_channels, dilation)
                           for k in range(count)])


class DenseASPP(nn.Module):
    """Densely connected atrous spatial pyramid pooling (Yang et al. 2018), table 10 S-Net row 8.

    Each layer sees the block input concatenated with every earlier layer's
    output, reduces it with a 1x1x1 convolution, and adds ``growth`` channels
    through a 3x3x3 convolution dilated in-plane by its rate::

        x ──┬───────────────┬──────────────┬─── ... ──► concat (in + 4 growth)
            └► 1x1 ► 3x3 r3 ┴► 1x1 ► 3x3 r6 ┴► ...

    With 64 input channels and growth 64 the output has 320 channels, as in
    the paper (the authors' code has 192).
    """

    def __init__(self, in_channels: int, growth: int, rates: Sequence[int] = (3, 6, 12, 18),
                 bottleneck: int = None):
        super().__init__()
        bottleneck = bottleneck or 2 * growth
        self.layers = nn.ModuleList()
        channels = in_channels
        for rate in rates:
            dil, pad = in_plane(rate)
            self.layers.append(nn.Sequential(
                nn.Conv3d(channels, bottleneck, 1, bias=False), nn.BatchNorm3d(bottleneck), nn.ReLU(inplace=True),
                nn.Conv3d(bottleneck, growth, 3, padding=pad, dilation=dil, bias=False),
                nn.BatchNorm3d(growth), nn.ReLU(inplace=True)))
            channels += growth
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)  # (B, in + len(rates) * growth, D, H, W)
