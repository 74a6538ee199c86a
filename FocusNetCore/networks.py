"""FocusNetv2 networks: S-Net, SOL-Net, SOS-Net (paper section 3, table 10)
and the adversarial shape autoencoder (table 9).

Shapes: (B, C, D, H, W), D the slice axis. The configuration is one frozen
dataclass that the model bundle stores; a width multiplier makes a small CPU
model and the paper model from the same code.

The authors' code differs from the paper (DenseASPP 192 channels, SOS-Net on
the CT crop alone); the paper is implemented, the CT-only crop is the
``sos_input="ct"`` option (table 6, "no concat").
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DenseASPP, SEResBlock, se_stack
from .organs import get_organ_set
from .preprocess import PreprocessConfig

# S-Net downsamples by (1, 2, 2) then (2, 2, 2): inputs are padded to these multiples.
S_NET_MULTIPLE = (2, 4, 4)
# Slices soft-maxed at once in the whole-volume pass (bounds its temporaries).
SOFTMAX_SLICES = 8
# The whole-volume pass keeps S-Net's class probabilities as uint8: p x 255.
PROBABILITY_SCALE = 255.0
SOS_INPUTS = ("features+ct", "ct")
BELOW_THRESHOLD = ("absent", "snet")


@dataclass(frozen=True)
class FocusNetConfig:
    organ_set: str = "oar22"
    width: float = 1.0  # multiplies every channel count of table 10
    roi_size: Tuple[int, int, int] = (8, 64, 64)  # D, H, W voxels (24 x 64 x 64 mm at 3 mm)
    sos_input: str = "features+ct"
    aspp_rates: Tuple[int, ...] = (3, 6, 12, 18)
    heatmap_threshold: float = 0.3  # below it SOL-Net has not found the small organ
    # SOL-Net's peak below the threshold: "absent" gives the organ no contour
    # (a scan without it); "snet" keeps what S-Net drew for it, if anything.
    below_threshold: str = "absent"
    # SOS-Net's probability threshold per small organ (in organs.small_names
    # order), chosen on the validation cases at the end of training
    # (postprocess.choose_sos_thresholds); empty: 0.5 for each.
    sos_thresholds: Tuple[float, ...] = ()
    # Small organs whose contour is S-Net's own, not the small-organ
    # branch's: those for which S-Net alone scored higher on the validation
    # cases (postprocess.choose_snet_small, at the end of training and by
    # `focusnet postprocess`). Empty: the branch draws every small organ.
    snet_small: Tuple[str, ...] = ()
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self):
        get_organ_set(self.organ_set)
        if self.below_threshold not in BELOW_THRESHOLD:
            raise ValueError(f"below_threshold must be one of {BELOW_THRESHOLD}, got {self.below_threshold!r}")
        if self.sos_input not in SOS_INPUTS:
            raise ValueError(f"sos_input must be one of {SOS_INPUTS}, got {self.sos_input!r}")
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.sos_thresholds and (len(self.sos_thresholds) != len(self.organs.small_names)
                                    or not all(0.0 < t < 1.0 for t in self.sos_thresholds)):
            raise ValueError(f"sos_thresholds must be one probability in (0, 1) per small organ "
                             f"({len(self.organs.small_names)}), got {self.sos_thresholds}")
        unknown = [name for name in self.snet_small if name not in self.organs.small_names]
        if unknown:
            raise ValueError(f"snet_small must name small organs ({', '.join(self.organs.small_names)}), "
                             f"got {', '.join(map(repr, unknown))}")
        if any(s % 8 for s in self.roi_size[1:]) or self.roi_size[0] % 8:
            raise ValueError(f"roi_size must be multiples of 8 (autoencoder strides), got {self.roi_size}")

    def sos_threshold(self, k: int) -> float:
        """SOS-Net's probability threshold for the k-th small organ."""
        return float(self.sos_thresholds[k]) if self.sos_thresholds else 0.5

    def channels(self, n: int) -> int:
        return max(4, int(round(n * self.width)))

    @property
    def organs(self):
        return get_organ_set(self.organ_set)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "FocusNetConfig":
        from .configdict import from_dict

        return from_dict(cls, data, "network configuration", tuples=("roi_size", "aspp_rates", "sos_thresholds", "snet_small"),
                         nested={"preprocess": PreprocessConfig.from_dict})


def pad_to_multiple(x: torch.Tensor, multiple=S_NET_MULTIPLE, value: float = 0.0):
    """Pad D, H, W at the end up to multiples; returns the padded tensor and the original size."""
    size = x.shape[-3:]
    pad = []
    for n, m in reversed(list(zip(size, multiple))):
        pad += [0, (-n) % m]
    return (F.pad(x, pad, value=value) if any(pad) else x), tuple(size)


class SNet(nn.Module):
    """Table 10, S-Net. Returns logits (B, K+1, D, H, W) and the last decoder
    features (B, c32, D, H, W) that SOL-Net and SOS-Net read."""

    def __init__(self, config: FocusNetConfig):
        super().__init__()
        c = config.channels
        classes = config.organs.num_classes
        self.stem = nn.Sequential(nn.Conv3d(1, c(32), 3, padding=1, bias=False), nn.BatchNorm3d(c(32)),
                                  nn.ReLU(inplace=True))                       # row 1
        self.enc1 = se_stack(c(32), c(32), 1)                                  # row 2
        self.pool1 = nn.MaxPool3d((1, 2, 2))                                   # row 3
        self.enc2 = se_stack(c(32), c(48), 2)                                  # row 4
        self.pool2 = nn.MaxPool3d((2, 2, 2))                                   # row 5
        self.enc3 = se_stack(c(48), c(64), 2)                                  # row 6
        self.dilated = se_stack(c(64), c(64), 2, dilation=2)                   # row 7
        # Growth c(64) on c(64) input: 64 + 4 x 64 = 320 at width 1 (row 8).
        self.aspp = DenseASPP(c(64), c(64), config.aspp_rates)
        self.dec2 = SEResBlock(self.aspp.out_channels + c(48), c(48))          # rows 9-10, skip from enc2
        self.dec1 = SEResBlock(c(48) + c(32), c(32))                           # rows 11-12, skip from enc1
        self.head = nn.Conv3d(c(32), classes, 1)                               # row 13

    def forward(self, ct: torch.Tensor):
        x, size = pad_to_multiple(ct, value=float(ct.min()) if ct.numel() else 0.0)
        s1 = self.enc1(self.stem(x))                                 # (B, 32, D, H, W)
        s2 = self.enc2(self.pool1(s1))                               # (B, 48, D, H/2, W/2)
        deep = self.aspp(self.dilated(self.enc3(self.pool2(s2))))    # (B, 320, D/2, H/4, W/4)
        up = F.interpolate(deep, size=s2.shape[-3:], mode="trilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up, s2], dim=1))                   # (B, 48, D, H/2, W/2)
        up = F.interpolate(d2, size=s1.shape[-3:], mode="trilinear", align_corners=False)
        features = self.dec1(torch.cat([up, s1], dim=1))             # (B, 32, D, H, W)
        d, h, w = size
        features = features[..., :d, :h, :w]
        return self.head(features), features


class SOLNet(nn.Module):
    """Table 10, SOL-Net: one sigmoid heat map per small organ, (B, S, D, H, W)."""

    def __init__(self, config: FocusNetConfig):
        super().__init__()
        c = config.channels
        self.block = SEResBlock(c(32), c(32))
        self.head = nn.Conv3d(c(32), len(config.organs.small_names), 1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The heat maps before the sigmoid (for the cross-entropy heat-map loss)."""
        return self.head(self.block(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features))


class SOSHead(nn.Module):
    """Table 10, SOS-Net for one small organ: ROI (B, C, 8, 64, 64) -> mask probability (B, 1, 8, 64, 64)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.blocks = se_stack(in_channels, width, 2)
        self.head = nn.Conv3d(width, 1, 1)

    def forward(self, roi: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.blocks(roi)))


class SOSNet(nn.Module):
    def __init__(self, config: FocusNetConfig):
        super().__init__()
        c = config.channels
        in_channels = 1 if config.sos_input == "ct" else c(32) + 1
        self.heads = nn.ModuleList([SOSHead(in_channels, c(32)) for _ in config.organs.small_names])


def roi_start(centre: Tuple[int, int, int], roi_size: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Corner of an ROI centred on ``centre`` (it may lie outside the volume)."""
    return tuple(int(c) - s // 2 for c, s in zip(centre, roi_size))


def roi_pool(volume: torch.Tensor, start: Tuple[int, int, int], roi_size: Tuple[int, int, int],
             fill: float = 0.0) -> torch.Tensor:
    """Crop (B, C, D, H, W) -> (B, C, *roi_size) at ``start``; ``fill`` outside the volume."""
    out = volume.new_full(volume.shape[:2] + tuple(roi_size), fill)
    src, dst = _overlap(volume.shape[-3:], start, roi_size)
    out[(..., *dst)] = volume[(..., *src)]
    return out


def roi_paste(target: torch.Tensor, roi: torch.Tensor, start: Tuple[int, int, int]) -> torch.Tensor:
    """Write ``roi`` back into ``target`` at ``start`` (the inverse of roi_pool inside the volume)."""
    src, dst = _overlap(target.shape[-3:], start, roi.shape[-3:])
    target[(..., *src)] = roi[(..., *dst)]
    return target


def _overlap(shape, start, size):
    """Slices of the volume and of the ROI where they overlap."""
    vol, roi = [], []
    for n, s, k in zip(shape, start, size):
        lo, hi = max(s, 0), min(s + k, n)
        hi = max(hi, lo)
        vol.append(slice(lo, hi))
        roi.append(slice(lo - s, hi - s))
    return tuple(vol), tuple(roi)


class FocusNetV2(nn.Module):
    """S-Net + SOL-Net + SOS-Net."""

    def __init__(self, config: FocusNetConfig):
        super().__init__()
        self.config = config
        self.snet = SNet(config)
        self.solnet = SOLNet(config)
        self.sosnet = SOSNet(config)
        # The whole-volume pass's S-Net + SOL-Net on one chunk, when another
        # runtime computes it (FocusNetCore/openvino_backend.py): a callable
        # (1, 1, D, H, W) -> (logits, features, heat maps). None: PyTorch.
        self.chunk_forward = None

    @contextlib.contextmanager
    def branch_for_every_small_organ(self):
        """Within the block the small-organ branch draws every small organ
        (``config.snet_small`` empty), as in the paper; the configuration is
        restored afterwards."""
        kept = self.config
        self.config = dataclasses.replace(kept, snet_small=())
        try:
            yield self
        finally:
            self.config = kept

    def sos_input(self, ct: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return ct if self.config.sos_input == "ct" else torch.cat([features, ct], dim=1)

    def sos_roi(self, ct: torch.Tensor, features: Optional[torch.Tensor], start,
                features_roi: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SOS-Net's input at ``start``: the ROI of S-Net's features and of the
        CT, pooled apart (no whole-volume join). Past the volume's edge the CT
        is air (its minimum: after normalisation 0 would be water) and the
        features 0; training pools a crop the same way. ``features_roi``:
        the features' ROI already pooled (then ``features`` is not read)."""
        roi = roi_pool(ct, start, self.config.roi_size, fill=float(ct.min()) if ct.numel() else 0.0)
        if self.config.sos_input == "ct":
            return roi
        if features_roi is None:
            features_roi = roi_pool(features, start, self.config.roi_size)
        return torch.cat([features_roi, roi.to(features_roi.dtype)], dim=1)

    def forward(self, ct: torch.Tensor, centres: List[Tuple[int, int, int]] = None) -> Dict[str, torch.Tensor]:
        """Training forward on a chunk (B=1): logits, heat maps, and for each
        small organ its ROI mask at ``centres`` (default: the heat-map arg-max)."""
        logits, features = self.snet(ct)
        heatmaps = self.solnet(features)                          # (1, S, D, H, W)
        if centres is None:
            centres = [argmax_3d(heatmaps[0, k]) for k in range(heatmaps.shape[1])]
        starts = [roi_start(c, self.config.roi_size) for c in centres]
        masks = [head(self.sos_roi(ct, features, s)) for head, s in zip(self.sosnet.heads, starts)]
        return {"logits": logits, "features": features, "heatmaps": heatmaps, "masks": masks, "starts": starts}

    @torch.no_grad()
    def segment(self, volume: torch.Tensor, small_organ_branch: bool = True,
                progress: Optional[Callable[[float], None]] = None,
                keep_features: bool = False, keep_heatmaps: bool = True) -> Dict[str, torch.Tensor]:
        """Whole-volume inference on (1, 1, D, H, W): non-overlapping chunks
        through S-Net and SOL-Net, then each small organ's centre is the
        arg-max of its heat map over the *whole* volume, and its ROI is pooled
        from the whole volume's features, so an ROI across a chunk border is
        the same as on one big chunk. A heat-map maximum below the threshold
        means the organ is not in the scan; it gets no contour. The small
        organs of ``config.snet_small`` keep S-Net's own contour instead.
        ``small_organ_branch=False`` returns the S-Net's labels alone (the
        ablation's "S-Net" row). ``keep_features``: the result holds S-Net's
        whole-volume features too (``features``), for SOS-Net at other
        points later (``focusnet worker``'s refine). ``keep_heatmaps=False``
        (inference, which reads only each heat map's peak, gathered during
        the pass): no whole-volume heat maps in the result (``heatmaps`` is
        None). ``probabilities``: S-Net's soft-max per
        class as uint8, probability x PROBABILITY_SCALE rounded (for the
        organs' confidence; a quarter of float32's memory)."""
        chunk = self.config.preprocess.chunk_slices
        depth = volume.shape[2]
        # Chunks are counted from the top slice down (the model grid is
        # anchored at the head's top): the lowest chunk is padded with air
        # below, so a scan that goes on further below has the same chunks.
        # Each chunk's results go straight into whole-volume tensors (no
        # list-then-concatenate copies); the class probabilities are kept
        # in uint8 (for the organs' confidence) and S-Net's logits not at all.
        short = (-depth) % chunk
        features = heatmaps = probabilities = labels = None
        # SOS-Net reads S-Net's features only inside each small organ's ROI:
        # they are gathered at the running heat-map peaks chunk by chunk, and
        # kept whole only for keep_features (0.8 GB less at 107 slices in the
        # paper configuration; the same ROIs).
        gathered = _FeaturesAtPeaks(len(self.sosnet.heads), self.config.roi_size) if small_organ_branch else None
        for start in range(-short, depth, chunk):
            piece = volume[:, :, max(start, 0):start + chunk]
            if start < 0:  # every chunk sees 40 slices
                piece = F.pad(piece, (0, 0, 0, 0, -start, 0), value=float(volume.min()))
            if self.chunk_forward is not None:
                lg, ft, hm = (t.to(piece.dtype) for t in self.chunk_forward(piece))
            else:
                lg, ft = self.snet(piece)
                hm = self.solnet(ft)
            drop, lo, hi = max(-start, 0), max(start, 0), start + chunk
            if labels is None:
                whole = (depth, *ft.shape[3:])
                if keep_features:
                    features = ft.new_empty((1, ft.shape[1], *whole))
                if keep_heatmaps:
                    heatmaps = hm.new_empty((1, hm.shape[1], *whole))
                probabilities = torch.empty((1, lg.shape[1], *whole), dtype=torch.uint8, device=lg.device)
                labels = torch.empty((1, *whole), dtype=torch.long, device=lg.device)
            # soft-max a few slices at a time: no whole-chunk float32 copy of the logits
            for z in range(drop, lg.shape[2], SOFTMAX_SLICES):
                part = torch.softmax(lg[:, :, z:z + SOFTMAX_SLICES].float(), dim=1)
                at = lo + z - drop
                labels[:, at:at + part.shape[2]] = part.argmax(dim=1)
                probabilities[:, :, at:at + part.shape[2]] = (part * PROBABILITY_SCALE).round_()
            if features is not None:
                features[:, :, lo:hi] = ft[:, :, drop:]
            if gathered is not None:
                gathered.add(ft[:, :, drop:], hm[:, :, drop:], lo)
            if heatmaps is not None:
                heatmaps[:, :, lo:hi] = hm[:, :, drop:]
            del lg, ft, hm
            if progress is not None:
                progress(min(start + chunk, depth) / depth)
        kept = {"features": features} if keep_features else {}
        if not small_organ_branch:
            return {"labels": labels, "probabilities": probabilities, "heatmaps": heatmaps,
                    "present": torch.ones(len(self.sosnet.heads), dtype=torch.bool), "small": [], **kept}
        small_labels = self.config.organs.small_labels
        present, small = [], []
        for k, (head, label, name) in enumerate(zip(self.sosnet.heads, small_labels, self.config.organs.small_names)):
            if name in self.config.snet_small:  # S-Net's own contour (it did better on validation)
                present.append(bool((labels == label).any()))
                small.append(None)
                continue
            best = gathered.best[k]
            if best is None or best[0] < self.config.heatmap_threshold:  # None: no finite peak
                if self.config.below_threshold == "snet" and bool((labels == label).any()):
                    present.append(True)  # SOL-Net missed it, S-Net did not: S-Net's contour stays
                else:
                    labels[labels == label] = 0
                    present.append(False)
                small.append(None)
                continue
            # A small organ lies inside its ROI only: S-Net's votes for it
            # elsewhere are false positives.
            labels[labels == label] = 0
            start = roi_start(best[1], self.config.roi_size)
            prob = head(self.sos_roi(volume, None, start, gathered.rois[k]))[:, 0]               # (1, 8, 64, 64)
            mask = prob > self.config.sos_threshold(k)
            small.append((start, prob))
            region = roi_pool(labels.unsqueeze(1).float(), start, self.config.roi_size)[:, 0].long()
            region[mask] = label
            roi_paste(labels, region, start)
            present.append(True)
        return {"labels": labels, "probabilities": probabilities, "heatmaps": heatmaps,
                "present": torch.tensor(present), "small": small, **kept}


class _FeaturesAtPeaks:
    """S-Net's features in the ROI around each small organ's heat-map peak,
    gathered while the chunks go by, so the whole volume's features need
    not be kept. Each chunk may raise an organ's running peak (strictly
    greater: on ties the lowest slice wins, as the whole volume's arg-max
    does); its ROI is pooled from this chunk and the last ROI-depth slices
    of the ones before, and pooled again after the next chunk when it
    reaches into it. The result is the same ROI as pooled from the whole
    volume's features."""

    def __init__(self, organs: int, roi_size: Tuple[int, int, int]):
        self.roi_size = tuple(roi_size)
        self.best: List[Optional[Tuple[float, Tuple[int, int, int]]]] = [None] * organs
        self.rois: List[Optional[torch.Tensor]] = [None] * organs
        self.pending = set()
        self.tail, self.tail_lo = None, 0  # features of the slices just before the next chunk

    def add(self, features: torch.Tensor, heatmaps: torch.Tensor, lo: int) -> None:
        """A chunk's features (1, C, n, H, W) and heat maps (1, S, n, H, W), slices lo .. lo + n - 1."""
        n = features.shape[2]
        for k in range(heatmaps.shape[1]):
            value = float(heatmaps[0, k].max())
            if self.best[k] is None or value > self.best[k][0]:
                z, y, x = argmax_3d(heatmaps[0, k])
                self.best[k] = (value, (lo + z, y, x))
                self.pending.add(k)
        for k in sorted(self.pending):
            start = roi_start(self.best[k][1], self.roi_size)
            roi = roi_pool(features, (start[0] - lo, start[1], start[2]), self.roi_size)
            if self.tail is not None:  # disjoint slices: each pooled part is 0 where the other has data
                roi += roi_pool(self.tail, (start[0] - self.tail_lo, start[1], start[2]), self.roi_size)
            self.rois[k] = roi
            if start[0] + self.roi_size[0] <= lo + n:
                self.pending.discard(k)
        depth = self.roi_size[0]
        tail = features[:, :, -depth:] if self.tail is None else torch.cat([self.tail, features[:, :, -depth:]], 2)
        self.tail = tail[:, :, -depth:].clone()  # a copy: the chunk's own buffer is reused
        self.tail_lo = lo + n - self.tail.shape[2]


def argmax_3d(volume: torch.Tensor) -> Tuple[int, int, int]:
    """(D, H, W) index of the maximum."""
    flat = int(torch.argmax(volume))
    d, rest = divmod(flat, volume.shape[1] * volume.shape[2])
    h, w = divmod(rest, volume.shape[2])
    return d, h, w


class ShapeAutoencoder(nn.Module):
    """Table 9, the adversarial shape autoencoder, on one small organ's ROI mask
    (B, 1, 8, 64, 64).

    Encoder: Conv k5 s2 64 -> k5 s2 128 -> k5 s1 128 -> k5 s2 256 (BN before
    each ReLU) -> FC 512 = the latent code (no activation).
    Decoder: FC 256 + ReLU, reshaped to (4, D/8, H/8, W/8) — table 9 leaves the
    reshape open; 4 x 1 x 8 x 8 = 256 for the 8 x 64 x 64 ROI — then
    upsample x2 -> conv 128 -> conv 128 -> upsample x2 -> conv 64 -> upsample
    x2 -> conv 1. Table 9 gives the last layer a ReLU; a mask is a
    probability, so the last activation here is a sigmoid.
    Returns the reconstruction, the latent code and the decoder features at
    two scales, which the shape loss compares.
    """

    def __init__(self, roi_size=(8, 64, 64), width: float = 1.0):
        super().__init__()
        c = lambda n: max(4, int(round(n * width)))  # noqa: E731
        self.bottom = tuple(s // 8 for s in roi_size)
        bottom_voxels = self.bottom[0] * self.bottom[1] * self.bottom[2]
        self.seed_channels = max(1, 256 // bottom_voxels)

        def conv(i, o, stride):
            return nn.Sequential(nn.Conv3d(i, o, 5, stride=stride, padding=2, bias=False), nn.BatchNorm3d(o),
                                 nn.ReLU(inplace=True))

        self.encoder = nn.Sequential(conv(1, c(64), 2), conv(c(64), c(128), 2), conv(c(128), c(128), 1),
                                     conv(c(128), c(256), 2))
        self.to_latent = nn.Linear(c(256) * bottom_voxels, 512)
        self.from_latent = nn.Linear(512, self.seed_channels * bottom_voxels)
        self.dec3 = nn.Sequential(conv(self.seed_channels, c(128), 1), conv(c(128), c(128), 1))
        self.dec2 = conv(c(128), c(64), 1)
        self.out = nn.Conv3d(c(64), 1, 5, padding=2)

    # Set by training when bfloat16 measured wrong for this network on this
    # machine (precision.probe_bfloat16): it then computes in float32 even
    # inside a bfloat16 autocast region.
    float32_only = False

    def forward(self, mask: torch.Tensor):
        if self.float32_only:
            with torch.autocast(mask.device.type, enabled=False):
                return self._forward(mask.float())
        return self._forward(mask)

    def _forward(self, mask: torch.Tensor):
        z = self.to_latent(self.encoder(mask).flatten(1))                      # (B, 512)
        x = F.relu(self.from_latent(z)).view(-1, self.seed_channels, *self.bottom)
        f3 = self.dec3(F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False))   # (B, 128, D/4, ...)
        f2 = self.dec2(F.interpolate(f3, scale_factor=2, mode="trilinear", align_corners=False))  # (B, 64, D/2, ...)
        recon = torch.sigmoid(self.out(F.interpolate(f2, scale_factor=2, mode="trilinear", align_corners=False)))
        return recon, z, [f3, f2]
