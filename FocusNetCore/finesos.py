"""SOS-Net's high-resolution images: a fine head per small organ.

FocusNetv2 pools "multi-scale features and high-resolution images" for
SOS-Net (section 3; appendix 6.1). The paper's grid is 1 x 1 x 3 mm; the
embedded CPU model's is 2 x 2 x 2 mm, which alone caps the small organs'
Dice at about 0.81 on the scan's grid (docs/resolution-oracle.md: 0.88 at
1 x 1 x 2 mm). A fine head gives the small organs their resolution back
where it matters, at the cost of a few small ROIs:

- its ROI (``FINE_ROI`` model voxels, 16 x 48 x 48 mm) is centred on S-Net's
  own contour of the organ (the centroid of its largest component on the
  model grid), else on SOL-Net's heat-map peak;
- its input is S-Net's features there, upsampled trilinearly by ``ZOOM``
  (1, 2, 2) to 2 x 1 x 1 mm voxels, with the CT resampled from the scan
  itself onto those voxels (not from the model grid);
- two SEResBlocks (`fine-sos --blocks` for more) and a 1x1x1 convolution,
  as SOS-Net's heads (``networks.SOSHead``), draw the organ's probability at 2 x 1 x 1 mm
  (``ZOOM``; `fine-sos --zoom` makes heads on other fine voxels); the
  organ is where it exceeds the head's threshold (largest component); on the
  scan's grid, where the probability linearly interpolated there exceeds
  it (``to_reference``).

The heads are trained on S-Net's features of phantoms with S-Net frozen
(``train_heads``; ``focusnet fine-sos``), and a bundle keeps the fine head
of an organ only where it beat what the bundle drew before on cases held
aside (``choose``). Fine voxel j of an ROI whose model-grid corner voxel is
i lies at model index i - 1/2 + (j + 1/2) / zoom along each axis: the
voxel centres F.interpolate(align_corners=False) upsamples to.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .blocks import se_stack
from .losses import autoencoder_loss, binary_segmentation_loss, reconstruction_loss, shape_loss
from .metrics import dice
from .networks import roi_pool
from .postprocess import clearly_better, largest_component as _largest_component
from .preprocess import AIR_HU, Grid, PreprocessConfig, _resample, normalise, resample_labels

ZOOM = (1, 2, 2)        # model voxels -> fine voxels per axis (z, y, x): 2 x 1 x 1 mm on the 2 mm grid
FINE_ROI = (8, 24, 24)  # model voxels (z, y, x): 16 x 48 x 48 mm
JITTER = (1, 2, 2)      # training: ROI-centre noise, model voxels either way (2 mm, 4 mm)


class FineHead(nn.Module):
    """(features ROI (B, C, d, h, w), fine CT (B, 1, d*zz, h*zy, w*zx)) -> probability on the fine grid."""

    def __init__(self, feature_channels: int, width: int, zoom: Sequence[int] = ZOOM, blocks: int = 2):
        super().__init__()
        self.zoom = tuple(int(z) for z in zoom)
        self.blocks = se_stack(feature_channels + 1, width, blocks)
        self.head = nn.Conv3d(width, 1, 1)

    def logits(self, features: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(features, scale_factor=self.zoom, mode="trilinear", align_corners=False)
        return self.head(self.blocks(torch.cat([up, ct.to(up.dtype)], dim=1)))

    def forward(self, features: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features, ct))


class FineEnsemble(nn.Module):
    """Fine heads of one organ on the same fine voxels, their probabilities
    averaged: a drop-in for one FineHead (``zoom``, ``forward``)."""

    def __init__(self, members: Sequence[FineHead]):
        super().__init__()
        zooms = {tuple(m.zoom) for m in members}
        if len(members) < 2 or len(zooms) != 1:
            raise ValueError(f"an ensemble needs two or more fine heads on the same fine voxels, got "
                             f"{len(members)} with zoom {sorted(zooms)}")
        self.zoom = zooms.pop()
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(features, ct).float() for m in self.members]).mean(dim=0)


def fine_grid(grid: Grid, start: Sequence[int], size: Sequence[int], zoom: Sequence[int] = ZOOM) -> Grid:
    """The fine voxels of the model-grid box at ``start`` (z, y, x) of ``size`` (z, y, x)."""
    zoom_xyz = np.asarray(tuple(reversed(tuple(zoom))), dtype=float)
    corner = np.asarray(tuple(reversed(tuple(start))), dtype=float) - 0.5 + 0.5 / zoom_xyz
    origin = grid.index_to_physical(corner)
    spacing = np.asarray(grid.spacing, dtype=float) / zoom_xyz
    fine_size = tuple(int(s * z) for s, z in zip(reversed(tuple(size)), zoom_xyz))
    return Grid(fine_size, tuple(float(v) for v in origin), tuple(float(v) for v in spacing), grid.direction)


def fine_ct(image: sitk.Image, grid: Grid, config: PreprocessConfig) -> np.ndarray:
    """The scan resampled onto ``grid`` (linear; air outside it), normalised as the model grid is."""
    resampled = _resample(image, grid, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)  # alive while its view is read
    return normalise(sitk.GetArrayViewFromImage(resampled), config)


def mask_on(labels: np.ndarray, reference: sitk.Image, label: int, grid: Grid) -> np.ndarray:
    """``labels == label`` (an array on ``reference``'s grid) resampled onto
    ``grid`` by signed distance (as the resolution oracle does), (z, y, x) bool."""
    where = np.argwhere(labels == label)
    if not len(where):
        return np.zeros(grid.shape, dtype=bool)
    lo = np.maximum(where.min(axis=0) - 2, 0)
    hi = np.minimum(where.max(axis=0) + 3, labels.shape)
    crop = (labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == label).astype(np.uint8)
    image = sitk.GetImageFromArray(crop)
    Grid.of(reference).sub_grid(tuple(int(v) for v in reversed(lo)), tuple(reversed(crop.shape))).apply_to(image)
    return resample_labels(image, grid) == 1


def start_around(centre: Sequence[int], size: Sequence[int] = FINE_ROI) -> Tuple[int, int, int]:
    return tuple(int(c) - s // 2 for c, s in zip(centre, size))


def snet_centre(snet_labels: np.ndarray, label: int) -> Optional[Tuple[int, int, int]]:
    """Centroid (z, y, x, rounded) of the largest component of S-Net's ``label``, or None."""
    mask = snet_labels == label
    if not mask.any():
        return None
    return _nearest_voxel(np.argwhere(largest_component(mask)).mean(axis=0))


def component_at(mask: np.ndarray, at) -> np.ndarray:
    """The connected component of ``mask`` nearest ``at`` (an index, z, y, x:
    a click); a head may answer with a second blob at the ROI's edge (a
    neighbour's organ)."""
    if not mask.any():
        return mask
    components, count = ndimage.label(mask)
    if count == 1:
        return mask
    where = np.argwhere(mask)
    nearest = where[np.argmin(((where - np.asarray(at)) ** 2).sum(axis=1))]
    return components == components[tuple(nearest)]


def _nearest_voxel(index) -> Tuple[int, int, int]:
    """Round half up, not to even: Python's round() sends 53.5 to 54 and
    128.5 to 128, so the same organ 75 slices further down a longer scan got
    an ROI one slice off (and a different mask)."""
    return tuple(int(math.floor(float(v) + 0.5)) for v in index)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """6-connected (postprocess's organs are 26-connected): the shipped
    heads' thresholds were chosen this way; changing it needs them chosen again."""
    return _largest_component(mask, faces_only=True)


@dataclass
class FineResult:
    """One organ drawn by its fine head: the fine grid, the probability on
    it, the head's threshold and the mask it gives there (largest component)."""

    label: int
    grid: Grid
    probability: np.ndarray  # (z, y, x) float32
    mask: np.ndarray         # (z, y, x) bool
    threshold: float = 0.5


def result_at(label: int, grid: Grid, probability: np.ndarray, threshold: float) -> FineResult:
    return FineResult(label, grid, probability, largest_component(probability > threshold), float(threshold))


def draw(head: FineHead, threshold: float, image: sitk.Image, features: torch.Tensor, grid: Grid,
         centre: Sequence[int], config: PreprocessConfig, label: int, roi_size: Sequence[int] = FINE_ROI) -> FineResult:
    """The organ by ``head`` around ``centre`` (model voxel, z, y, x):
    S-Net's ``features`` (1, C, D, H, W) on the model ``grid``, the scan
    ``image`` itself for the fine CT."""
    start = start_around(centre, roi_size)
    fine = fine_grid(grid, start, roi_size, head.zoom)
    device = next(head.parameters()).device
    ct = torch.as_tensor(fine_ct(image, fine, config), device=device)[None, None]
    roi = roi_pool(features, tuple(start), tuple(roi_size)).to(device, torch.float32)
    with torch.inference_mode():
        prob = head(roi, ct)[0, 0].float().cpu().numpy()
    return result_at(label, fine, prob, threshold)


def to_model_grid(result: FineResult, grid: Grid) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """The fine mask on the model grid (a model voxel is the organ's where
    most of its fine voxels are): (start (z, y, x), mask (FINE_ROI))."""
    zz, zy, zx = (int(round(m / f)) for m, f in zip(reversed(grid.spacing), reversed(result.grid.spacing)))
    d, h, w = (s // z for s, z in zip(result.mask.shape, (zz, zy, zx)))
    coarse = result.mask.reshape(d, zz, h, zy, w, zx).mean(axis=(1, 3, 5)) > 0.5
    start = grid.physical_to_index(result.grid.origin) + 0.5 - 0.5 / np.array([zx, zy, zz])
    return tuple(int(round(v)) for v in reversed(start)), coarse


def to_reference(result: FineResult, reference: sitk.Image, at=None) -> np.ndarray:
    """The organ on ``reference``'s grid, (z, y, x) bool: the fine
    probability linearly interpolated onto the scan's voxels the ROI
    reaches, above the head's threshold there (largest component). Measured
    on phantoms 2000-2019 with the first fine heads: small organs' mean Dice
    0.827 this way against 0.820 for the fine mask resampled by signed
    distance, whose zero level shrinks the thin organs between the scan's
    2.5-3.5 mm slices (best thresholds 0.02-0.1 there, 0.2-0.3 here). A
    mask that vanishes this way goes by signed distance. ``at`` (a physical
    point, LPS mm: a click): the component nearest it instead of the largest."""
    target = Grid.of(reference)
    out = np.zeros(target.shape, dtype=bool)
    lo, hi = target.box_reached_by(result.grid, margin=1)
    if np.all(hi > lo):
        image = sitk.GetImageFromArray(result.probability.astype(np.float32, copy=False))
        result.grid.apply_to(image)
        region = target.sub_grid(lo, hi - lo)
        probability = sitk.GetArrayFromImage(_resample(image, region, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        above = probability > result.threshold
        out[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = (largest_component(above) if at is None else
                                                       component_at(above, region.physical_to_index(at)[::-1]))
    if out.any() or not result.mask.any():
        return out
    image = sitk.GetImageFromArray(result.mask.astype(np.uint8))
    result.grid.apply_to(image)
    return resample_labels(image, target) == 1


@dataclass
class Sample:
    """One small organ of one training case: S-Net's features over the ROI
    grown by JITTER each way, the fine CT and the true mask over the same box."""

    features: np.ndarray  # (C, d, h, w) float32, d, h, w = FINE_ROI + 2 JITTER
    ct: np.ndarray        # (d, h, w) x ZOOM float32
    mask: np.ndarray      # like ct, bool


def true_centre(labels: np.ndarray, reference: sitk.Image, label: int, grid: Grid) -> Optional[Tuple[int, int, int]]:
    """The centroid of ``labels == label`` (on ``reference``'s grid) as a model voxel (z, y, x), or None."""
    where = np.argwhere(labels == label)
    if not len(where):
        return None
    point = Grid.of(reference).index_to_physical(where.mean(axis=0)[::-1])
    return _nearest_voxel(grid.physical_to_index(point)[::-1])


def samples_of_case(image: sitk.Image, labels: np.ndarray, features: torch.Tensor, grid: Grid,
                    config: PreprocessConfig, small: Sequence[Tuple[str, int]],
                    zoom: Sequence[int] = ZOOM) -> Dict[str, Sample]:
    """Per organ (name, label) of ``small`` the case holds, its training sample
    around the organ's true centre. ``features``: S-Net's over the whole
    model grid, (1, C, D, H, W); ``labels``: the truth on ``image``'s grid."""
    size = tuple(s + 2 * j for s, j in zip(FINE_ROI, JITTER))
    out = {}
    for name, label in small:
        centre = true_centre(labels, image, label, grid)
        if centre is None:
            continue
        start = tuple(s - j for s, j in zip(start_around(centre), JITTER))
        fine = fine_grid(grid, start, size, zoom)
        out[name] = Sample(roi_pool(features, start, size)[0].float().cpu().numpy(),
                           fine_ct(image, fine, config), mask_on(labels, image, label, fine))
    return out


def _crop(sample: Sample, offset: Sequence[int], zoom: Sequence[int]):
    (oz, oy, ox), (d, h, w) = offset, FINE_ROI
    zz, zy, zx = zoom
    features = sample.features[:, oz:oz + d, oy:oy + h, ox:ox + w]
    fine = (slice(oz * zz, (oz + d) * zz), slice(oy * zy, (oy + h) * zy), slice(ox * zx, (ox + w) * zx))
    return features, sample.ct[fine], sample.mask[fine]


def _random_crops(rows: List[Sample], batch: int, rng: np.random.Generator, zoom: Sequence[int]):
    """(picks, crops): ``batch`` samples of ``rows`` drawn with ``rng``, each
    cropped to FINE_ROI at a random offset within JITTER (``_crop``)."""
    picks = rng.integers(0, len(rows), size=batch)
    return picks, [_crop(rows[int(i)], [int(rng.integers(0, 2 * j + 1)) for j in JITTER], zoom) for i in picks]


def _cosine_rate(optimiser, lr: float, step: int, iterations: int) -> None:
    for group in optimiser.param_groups:
        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / iterations))


def train_heads(samples: Dict[str, List[Sample]], width: int, iterations: int, batch: int = 4,
                lr: float = 1e-3, seed: int = 0, zoom: Sequence[int] = ZOOM, precision: str = "float32",
                autoencoder: Optional[nn.Module] = None, shape_weight: float = 0.0,
                blocks: int = 2, adversarial: bool = False, adversarial_weight: float = 0.001,
                autoencoder_lr: float = 5e-4, ct_noise: float = 0.0, initial: Optional[Dict[str, dict]] = None,
                log=print) -> Dict[str, FineHead]:
    """One FineHead per organ of ``samples``, trained with SOS-Net's loss
    (binary focal + Dice; ``blocks`` SE residual blocks of ``width``
    channels each) on ROIs at the true centre moved by up to JITTER
    (uniform), Adam at ``lr`` with a cosine schedule; float32 weights, the
    forward pass in bfloat16 autocast for ``precision="bfloat16"`` (CPU)
    until a loss or gradient comes out non-finite, then (that step again)
    in float32; a non-finite one in float32 stops training
    (FloatingPointError). ``log`` hears which.

    With ``autoencoder`` (the bundle's shape autoencoder, frozen, in eval
    mode) and ``shape_weight`` > 0, FocusNetv2's shape term is added: the
    bounded distance (losses.shape_loss, normalized) between the
    autoencoder's codes of the predicted and the true mask, both averaged
    down to the model grid and centred in the autoencoder's ROI (an
    autoencoder made for the fine ROI itself, ``fine_autoencoder``, sees the
    fine masks as they are). The
    autoencoder is frozen: the shape prior the coarse SOS-Net was trained
    against. With ``adversarial`` a copy of it is trained against the heads
    instead, as FocusNetv2's AAE (eqs. 7-8): after each step of the heads
    (L_seg + shape_weight L_shape, the autoencoder fixed), one step of the
    autoencoder (Adam at ``autoencoder_lr``) on L_rec - adversarial_weight
    L_shape over the same ROIs, truths and the heads' (detached) predictions
    together; its running statistics stay as the bundle's.

    ``ct_noise`` (normalised CT units; 0: none): each ROI's fine CT gets
    white Gaussian noise of a standard deviation drawn uniformly from [0,
    ct_noise), from a generator of its own (the ROIs picked stay those of a
    run without it).

    ``initial`` (organ -> state_dict, as a bundle's ``fine_heads`` entry
    holds it): those heads start from these weights instead of afresh
    (``fine-sos --from-bundle-heads``: a head trained on further, e.g. on
    noisier cases, at a lower rate); they must have the same ``width``,
    ``blocks`` and ``zoom``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])
    channels = next(iter(samples.values()))[0].features.shape[0]
    heads = {name: FineHead(channels, width, zoom, blocks) for name in samples}
    for name, state in (initial or {}).items():
        if name in heads:
            heads[name].load_state_dict(state, strict=True)
    params = [p for head in heads.values() for p in head.parameters()]
    optimiser = torch.optim.Adam(params, lr=lr)
    shaped = autoencoder is not None and shape_weight > 0
    if shaped and autoencoder_roi(autoencoder) == tuple(r * z for r, z in zip(FINE_ROI, zoom)):
        zoom_of_shape = (1, 1, 1)  # an autoencoder on the fine grid (fine_autoencoder): no averaging down
    else:
        zoom_of_shape = tuple(zoom)
    critic = None
    if shaped and adversarial:
        critic = copy.deepcopy(autoencoder).float().eval()  # the bundle's own stays as it is
        critic.requires_grad_(False)  # the heads' backward pass leaves it alone; _critic_step trains it
        critic_optimiser = torch.optim.Adam(critic.parameters(), lr=autoencoder_lr)
        autoencoder = critic
    for head in heads.values():
        head.train()
    running = {name: [] for name in heads}
    step = 0
    while step < iterations:
        _cosine_rate(optimiser, lr, step, iterations)
        optimiser.zero_grad(set_to_none=True)
        state = rng.bit_generator.state
        buffers = [{k: v.clone() for k, v in head.named_buffers()} for head in heads.values()]
        bad, values, pairs = [], {}, []
        for name, head in heads.items():
            picks, crops = _random_crops(samples[name], batch, rng, zoom)
            features = torch.as_tensor(np.stack([c[0] for c in crops]))
            ct = np.stack([c[1] for c in crops])
            if ct_noise > 0:
                sigma = noise_rng.uniform(0.0, ct_noise, size=(len(crops), 1, 1, 1)).astype(np.float32)
                ct = ct + noise_rng.standard_normal(ct.shape, dtype=np.float32) * sigma
            ct = torch.as_tensor(ct)[:, None]
            target = torch.as_tensor(np.stack([c[2] for c in crops]))[:, None]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                prob = head(features, ct)
            loss = binary_segmentation_loss(prob, target)
            if shaped:
                loss = loss + shape_weight * _shape_term(autoencoder, prob, target, zoom_of_shape)
                if critic is not None:
                    pairs.append((prob.detach().float(), target.float()))
            loss.backward()
            value = float(loss.detach())
            if not (math.isfinite(value) and all(bool(torch.isfinite(p.grad).all())
                                                 for p in head.parameters() if p.grad is not None)):
                bad.append(f"{name}: {_what_is_non_finite(head, picks, features, ct, prob, value)}")
            values[name] = value
        if bad:
            if precision != "bfloat16":
                raise FloatingPointError(f"fine heads: non-finite loss or gradient at step {step} ({', '.join(bad)})")
            # bfloat16 autocast gave NaN here (seen on an AMD CPU with AVX512-BF16): the
            # weights are untouched (no step taken); this step again and the rest in float32.
            log(f"fine heads: bfloat16 gave a non-finite loss or gradient at step {step} ({', '.join(bad)}); "
                "training on in float32")
            precision = "float32"
            rng.bit_generator.state = state
            with torch.no_grad():  # BatchNorm's running statistics saw the bad forward pass
                for head, kept in zip(heads.values(), buffers):
                    for k, v in head.named_buffers():
                        v.copy_(kept[k])
            continue
        optimiser.step()
        if critic is not None:
            critic_loss = _critic_step(critic, critic_optimiser, pairs, zoom_of_shape, adversarial_weight)
            if not math.isfinite(critic_loss):
                raise FloatingPointError(f"fine heads: the shape autoencoder's loss is non-finite at step {step}")
            running.setdefault("autoencoder", []).append(critic_loss)
        for name, value in values.items():
            running[name].append(value)
        step += 1
        if step % max(iterations // 10, 1) == 0:
            log(f"fine heads step {step}/{iterations}: " +
                ", ".join(f"{n} {np.mean(v[-50:]):.3f}" for n, v in running.items()))
    for head in heads.values():
        head.eval()
    return heads


def fine_autoencoder(samples: Dict[str, List[Sample]], zoom: Sequence[int], iterations: int, width: float = 0.25,
                     batch: int = 4, lr: float = 1e-3, seed: int = 0, log=print) -> nn.Module:
    """FocusNetv2's shape autoencoder (table 9, ``networks.ShapeAutoencoder``
    of ``width``) on the fine heads' own grid: ROIs of FINE_ROI x ``zoom``
    fine voxels, pre-trained for ``iterations`` steps to reconstruct the true
    masks of ``samples`` (``batch`` ROIs per organ per step, picked and
    jittered as train_heads picks them; the MSE of the aae_pretrain stage,
    Adam at ``lr`` with a cosine schedule, float32). The bundle's own
    autoencoder sees masks averaged down to the 2 mm model grid, where a
    1 mm boundary error of a 4 mm chiasm is a fraction of one voxel; this
    one sees the fine masks themselves. Returned frozen, in eval mode."""
    from .networks import ShapeAutoencoder
    from .train import AAEPretrainStep

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    zoom = tuple(int(z) for z in zoom)
    autoencoder = ShapeAutoencoder(tuple(r * z for r, z in zip(FINE_ROI, zoom)), width=width).train()
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    reconstruction = AAEPretrainStep(autoencoder)
    running = []
    for step in range(iterations):
        _cosine_rate(optimiser, lr, step, iterations)
        masks = [crop[2] for rows in samples.values() for crop in _random_crops(rows, batch, rng, zoom)[1]]
        masks = torch.as_tensor(np.stack(masks)).float()[:, None]
        optimiser.zero_grad(set_to_none=True)
        loss = reconstruction(masks)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"fine shape autoencoder: non-finite loss at step {step}")
        loss.backward()
        optimiser.step()
        running.append(float(loss.detach()))
        if (step + 1) % max(iterations // 5, 1) == 0:
            log(f"fine shape autoencoder step {step + 1}/{iterations}: reconstruction {np.mean(running[-50:]):.4f}")
    autoencoder.eval().requires_grad_(False)
    return autoencoder


def _what_is_non_finite(head: nn.Module, picks, features: torch.Tensor, ct: torch.Tensor, prob: torch.Tensor,
                        loss: float) -> str:
    """Where a bad step's non-finite values are: in the samples (by index),
    the probabilities, the loss or the gradients (by parameter)."""
    said = []
    for k, i in enumerate(picks):
        for what, tensor in (("features", features[k]), ("CT", ct[k])):
            if not bool(torch.isfinite(tensor).all()):
                said.append(f"sample {int(i)}'s {what}")
                break
    if not bool(torch.isfinite(prob).all()):
        said.append("probabilities")
    if not math.isfinite(loss):
        said.append(f"loss ({loss})")
    grads = [n for n, p in head.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if grads:
        said.append(f"gradients of {', '.join(grads[:4])}{' ...' if len(grads) > 4 else ''}")
    return "non-finite: " + ("; ".join(said) if said else "values")


def _coarse(mask: torch.Tensor, zoom, size) -> torch.Tensor:
    """A fine mask averaged down to the model grid and centred in the autoencoder's ROI ``size``."""
    pooled = F.avg_pool3d(mask.float(), kernel_size=tuple(zoom))
    pad = []
    for have, want in zip(reversed(pooled.shape[2:]), reversed(size)):
        extra = max(want - have, 0)
        pad += [extra // 2, extra - extra // 2]
    return F.pad(pooled, pad)[..., :size[0], :size[1], :size[2]]


def _shape_term(autoencoder: nn.Module, prob: torch.Tensor, target: torch.Tensor, zoom) -> torch.Tensor:
    size = autoencoder_roi(autoencoder)
    with torch.autocast("cpu", enabled=False):
        _, z_t, f_t = autoencoder(_coarse(target, zoom, size))
        _, z_p, f_p = autoencoder(_coarse(prob, zoom, size))
    return shape_loss([z_t.detach()] + [f.detach() for f in f_t], [z_p] + list(f_p), normalized=True)


def _critic_step(autoencoder: nn.Module, optimiser, pairs, zoom, weight: float) -> float:
    """One step of the adversarial autoencoder (eq. 8 as a minimisation) on
    (prediction, truth) pairs of fine ROIs; returns its loss."""
    size = autoencoder_roi(autoencoder)
    preds = torch.cat([_coarse(p, zoom, size) for p, _ in pairs])
    truths = torch.cat([_coarse(t, zoom, size) for _, t in pairs])
    optimiser.zero_grad(set_to_none=True)
    autoencoder.requires_grad_(True)
    with torch.autocast("cpu", enabled=False):
        rec_t, z_t, f_t = autoencoder(truths)
        rec_p, z_p, f_p = autoencoder(preds)
        loss = autoencoder_loss(reconstruction_loss(rec_t, truths, rec_p, preds),
                                shape_loss([z_t] + list(f_t), [z_p] + list(f_p), normalized=True), weight)
    loss.backward()
    optimiser.step()
    autoencoder.requires_grad_(False)
    return float(loss.detach())


def autoencoder_roi(autoencoder: nn.Module) -> Tuple[int, int, int]:
    """The ROI (z, y, x) a ShapeAutoencoder was built for."""
    return tuple(int(b) * 8 for b in autoencoder.bottom)


THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)


def build_samples(segmenter, folders: Sequence, organs: Sequence[str], log=print,
                  zoom: Sequence[int] = ZOOM) -> Dict[str, List[Sample]]:
    """Training samples of ``organs`` from every case of ``folders`` (as
    `focusnet train` reads them), with S-Net's features as ``segmenter``
    computes them at inference (its own fine heads, if any, are not used)."""
    from .data import discover_cases, load_case

    config = segmenter.config
    small = [(name, config.organs.label_of(name)) for name in organs]
    kept, segmenter.fine_heads = segmenter.fine_heads, {}
    out: Dict[str, List[Sample]] = {}
    try:
        for folder in folders:
            sources, problems = discover_cases(folder)
            if not sources:
                raise ValueError(f"{folder}: no usable case ({'; '.join(problems[:3]) or 'empty'})")
            for source in sources:
                image, labels, _ = load_case(source, config.organs)
                state = segmenter.segment(image, keep_state=True).state
                for name, sample in samples_of_case(image, labels, state["features"], state["preprocessed"].grid,
                                                    config.preprocess, small, zoom).items():
                    out.setdefault(name, []).append(sample)
                log(f"{source.name}: {len(out)} organ(s) sampled")
    finally:
        segmenter.fine_heads = kept
    return out


SAMPLES_FORMAT = 1


def samples_key(segmenter, folders: Sequence, organs: Sequence[str], zoom: Sequence[int]) -> dict:
    """What a set of samples depends on: the bundle's network weights
    (their checksum, which its fine heads do not enter) and how S-Net ran
    (precision, backend: the features differ slightly), the cases (each
    file's path, size and modification time), organs, zoom and the ROI's
    size and jitter."""
    from .data import discover_cases

    cases = hashlib.sha1()
    for folder in folders:
        for source in discover_cases(folder)[0]:
            cases.update(source.fingerprint().encode())
    return {"format": SAMPLES_FORMAT, "model": segmenter.meta["checksum"], "precision": segmenter.precision,
            "backend": segmenter.backend, "cases": cases.hexdigest()[:16],
            "folders": [str(Path(f).resolve()) for f in folders], "organs": list(organs),
            "zoom": [int(z) for z in zoom], "roi": list(FINE_ROI), "jitter": list(JITTER)}


def cached_samples(path, segmenter, folders: Sequence, organs: Sequence[str], zoom: Sequence[int] = ZOOM,
                   log=print) -> Dict[str, List[Sample]]:
    """``build_samples``, kept in ``path``: read back when the file was made
    with the same bundle, cases, organs and zoom (``samples_key``), else
    built and written there (atomically). A file made otherwise is refused
    by name and left as it is: the caller gives another path or deletes it."""
    from .imageio import atomic_output

    path = Path(path)
    key = samples_key(segmenter, folders, organs, zoom)
    if path.exists():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            have = stored["key"]
        except Exception as error:
            raise ValueError(f"{path}: not a fine-sos samples file ({error})") from error
        differs = sorted(k for k in set(key) | set(have) if key.get(k) != have.get(k))
        if differs:
            raise ValueError(f"{path}: samples made with other {', '.join(differs)} than this run's; give another "
                             "samples file or delete this one")
        log(f"{path}: samples read back")
        return {name: [Sample(f.numpy(), c.numpy(), m.numpy()) for f, c, m in rows]
                for name, rows in stored["samples"].items()}
    samples = build_samples(segmenter, folders, organs, log=log, zoom=zoom)
    with atomic_output(path) as tmp:
        torch.save({"key": key, "samples": {name: [(torch.from_numpy(r.features), torch.from_numpy(r.ct),
                                                     torch.from_numpy(r.mask)) for r in rows]
                                            for name, rows in samples.items()}}, tmp)
    log(f"{path}: samples written")
    return samples


def scores_on(segmenter, heads: Dict[str, FineHead], folder, thresholds: Sequence[float] = THRESHOLDS,
              log=print) -> Dict[str, dict]:
    """Per organ of ``heads``: the Dice on the CT's grid, case by case, of
    what ``segmenter`` draws without fine heads (``pipeline``), of the fine
    head the bundle already has for it, if any, at its threshold
    (``current``), and of the new fine head at each threshold (``fine``:
    threshold -> list), its ROI centred as inference centres it. An organ
    the pipeline cannot centre an ROI on scores the pipeline's Dice for the
    fine heads too."""
    from .data import discover_cases, load_case

    config = segmenter.config
    sources, problems = discover_cases(folder)
    if not sources:
        raise ValueError(f"{folder}: no usable case ({'; '.join(problems[:3]) or 'empty'})")
    kept = segmenter.fine_heads
    scores = {name: {"pipeline": [], "fine": {t: [] for t in thresholds}, **({"current": []} if name in kept else {})}
              for name in heads}
    try:
        for source in sources:
            image, labels, _ = load_case(source, config.organs)
            segmenter.fine_heads = {}
            result = segmenter.segment(image, keep_state=True)
            drawn = sitk.GetArrayViewFromImage(result.labels)
            state = result.state
            snet_labels = state["snet_labels"]
            for name, head in heads.items():
                label = config.organs.label_of(name)
                truth = labels == label
                pipeline = dice(drawn == label, truth)
                scores[name]["pipeline"].append(pipeline)
                centre = snet_centre(snet_labels, label)
                if centre is None:  # no fine ROI: every head scores the pipeline's contour
                    for rows in list(scores[name]["fine"].values()) + [scores[name].get("current", [])]:
                        rows.append(pipeline)
                    continue
                grid = state["preprocessed"].grid
                if name in kept:
                    old_head, old_threshold = kept[name]
                    current = draw(old_head, old_threshold, image, state["features"], grid, centre,
                                   config.preprocess, label, segmenter.fine_roi)
                    scores[name]["current"].append(dice(to_reference(current, image), truth) if current.mask.any()
                                                   else pipeline)
                probe = draw(head, 0.5, image, state["features"], grid, centre, config.preprocess, label)
                for t in thresholds:
                    fine = result_at(label, probe.grid, probe.probability, t)
                    if not fine.mask.any():  # inference keeps the pipeline's contour then
                        scores[name]["fine"][t].append(pipeline)
                        continue
                    scores[name]["fine"][t].append(dice(to_reference(fine, image), truth))
            log(f"{source.name}: scored")
    finally:
        segmenter.fine_heads = kept
    return scores


def choose(scores: Dict[str, dict]) -> Dict[str, dict]:
    """Per organ: the best threshold, its mean Dice, the pipeline's, the
    bundle's current fine head's (``current``, None where it has none), the
    standard error of the paired gain over the better of those two, and
    ``fine`` (True where the new head's mean Dice is higher than both: a
    second run never replaces a better head with a worse one)."""
    report = {}
    for name, row in scores.items():
        pipeline = np.asarray(row["pipeline"], dtype=float)
        current = np.asarray(row["current"], dtype=float) if "current" in row else None
        rival = pipeline if current is None or current.mean() <= pipeline.mean() else current
        means = {t: float(np.mean(v)) for t, v in row["fine"].items()}
        best = max(means, key=lambda t: (means[t], -abs(t - 0.5)))
        _, se = clearly_better(row["fine"][best], rival, 0.0)
        report[name] = {"threshold": float(best), "dice": means[best], "pipeline": float(pipeline.mean()),
                        "current": None if current is None else float(current.mean()),
                        "gain_standard_error": se, "cases": int(len(pipeline)), "fine": means[best] > rival.mean()}
    return report
