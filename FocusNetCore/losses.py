"""FocusNetv2 losses (paper eqs. 1-8) as pure functions.

Shapes: logits (B, C, D, H, W) with C = organs + background; targets
(B, D, H, W) integer labels. ``present`` (B, C) booleans mark the organs a
case is contoured for: an organ missing from a case (a PDDCA patient without
a mandible) is not learned as background — its probability is merged into
the background's wherever the ground truth says background (the "marginal"
rule), and its Dice term is left out.

MONAI's FocalLoss and GeneralizedDiceLoss were considered: the paper's eq. 2
is an unweighted sum of per-class Dice terms (MONAI's generalized Dice
weights classes by inverse squared volume), and neither supports per-case
missing structures, so these are written here and tested against
hand-computed values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def _merged_log_probs(logits: torch.Tensor, present: Optional[torch.Tensor]) -> torch.Tensor:
    """log p per class; the background channel absorbs the missing organs."""
    log_p = F.log_softmax(logits.float(), dim=1)
    if present is None or bool(present.all()):
        return log_p
    missing = ~present.bool()
    missing[:, 0] = True  # background itself
    masked = log_p.masked_fill(~missing[:, :, None, None, None], float("-inf"))
    background = torch.logsumexp(masked, dim=1, keepdim=True)
    return torch.cat([background, log_p[:, 1:]], dim=1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: Optional[torch.Tensor] = None,
               gamma: float = 2.0, present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 1, mean over voxels: -alpha_t (1 - p_t)^gamma log p_t with t the true class."""
    log_p = _merged_log_probs(logits, present)
    log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)  # (B, D, H, W)
    pt = log_pt.exp()
    loss = -((1.0 - pt) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * alpha.to(loss.dtype)[target.long()]
    return loss.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 2: sum over classes of (1 - 2 sum(y p) / (sum y + sum p)), averaged over the batch;
    classes a case lacks are left out, and so are classes with no voxel in
    the sample (a crop without the mandible). Eq. 2 is constant for those
    (1 whatever p), but the smoothing term made it 0 when the class was
    predicted nowhere at all, a reward for never predicting an organ that
    few crops show: S-Net trained at lr 4e-3 collapsed the mandible and
    both TM joints to background that way, the loss still falling."""
    probs = _merged_log_probs(logits, present).exp()              # (B, C, D, H, W)
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    volume = onehot.sum(dims)
    per_class = 1.0 - (2.0 * intersection + SMOOTH) / (probs.sum(dims) + volume + SMOOTH)  # (B, C)
    counted = volume > 0
    if present is not None:
        counted = counted & present.bool()
    return (per_class * counted.to(per_class.dtype)).sum(dim=1).mean()


def segmentation_loss(logits, target, alpha=None, gamma=2.0, dice_weight=1.0, present=None):
    """Eq. 3: L_seg = L_focal + lambda L_dice (lambda = 1)."""
    return focal_loss(logits, target, alpha, gamma, present) + dice_weight * dice_loss(logits, target, present)


def binary_segmentation_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """L_seg for one SOS-Net mask (probabilities (B, 1, ...), target {0, 1}):
    binary focal loss plus the Dice term of the organ."""
    prob = prob.float().clamp(1e-6, 1.0 - 1e-6)
    target = target.to(prob.dtype)
    pt = torch.where(target > 0.5, prob, 1.0 - prob)
    focal = (-((1.0 - pt) ** gamma) * torch.log(pt)).mean()
    dims = tuple(range(1, prob.ndim))
    dice = 1.0 - (2.0 * (prob * target).sum(dims) + SMOOTH) / (prob.sum(dims) + target.sum(dims) + SMOOTH)
    return focal + dice.mean()


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, foreground_weight: float = 0.0) -> torch.Tensor:
    """SOL-Net's L2 loss between predicted and Gaussian target heat maps
    (mean over voxels). ``foreground_weight`` w > 0 weighs each voxel's
    squared error by 1 + w * target: a small organ's Gaussian covers well under
    1 % of a crop, so with plain L2 (w = 0, the paper) a SOL-Net that answers
    near 0 everywhere is already close to the minimum."""
    pred, target = pred.float(), target.float()
    if not foreground_weight:
        return F.mse_loss(pred, target)
    return ((pred - target) ** 2 * (1.0 + foreground_weight * target)).mean()


def heatmap_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SOL-Net's heat maps scored by binary cross-entropy against the same
    Gaussian targets (mean over voxels), from the logits. Its minimum is the
    same as L2's, the heat map equal to the target, but its gradient on a
    logit is (p - target), where L2's is 2 (p - target) p (1 - p): L2 leaves
    a head whose sigmoid has fallen to 0 at its organ with almost no gradient
    to climb back by (measured against L2 in configs/phantom-cpu-solnet.yaml)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def reconstruction_loss(recon_true, true_mask, recon_pred, pred_mask) -> torch.Tensor:
    """Eq. 4: |D(y) - y|^2 + |D(G(x)) - G(x)|^2 (means over voxels)."""
    return F.mse_loss(recon_true.float(), true_mask.float()) + F.mse_loss(recon_pred.float(), pred_mask.float())


def shape_loss(codes_true: Sequence[torch.Tensor], codes_pred: Sequence[torch.Tensor],
               normalized: bool = False) -> torch.Tensor:
    """Eq. 5: squared L2 distance between the latent codes and the multi-scale
    decoder features of the ground-truth and the predicted shapes (each term a
    mean over its elements, so scales weigh alike).

    ``normalized`` compares each sample's code scaled to unit length instead
    (the distance is then at most 4 per term): eq. 8 lets the autoencoder
    maximise an unbounded distance, which diverged in short CPU runs (the
    generator loss passed 1e5 within 50 fine-tuning steps)."""
    if normalized:
        unit = lambda x: F.normalize(x.float().flatten(1), dim=1)  # noqa: E731
        return sum(((unit(p) - unit(t)) ** 2).sum(dim=1).mean() for t, p in zip(codes_true, codes_pred))
    return sum(F.mse_loss(p.float(), t.float()) for t, p in zip(codes_true, codes_pred))


def generator_loss(seg: torch.Tensor, shape: torch.Tensor, weight: float = 5.0) -> torch.Tensor:
    """Eq. 7: L_G = L_seg + 5 L_shape."""
    return seg + weight * shape


def autoencoder_loss(rec: torch.Tensor, shape: torch.Tensor, weight: float = 0.001) -> torch.Tensor:
    """Eq. 8 as a minimisation: L_D = L_rec - 0.001 L_shape."""
    return rec - weight * shape


def organ_weights(mean_voxels: Sequence[float], power: float = 1.0) -> torch.Tensor:
    """Focal alpha per class (background first), inversely proportional to
    the mean size (``power`` 1, the paper's rule; a smaller power softens it),
    normalised to mean 1.

    The rule is for the organs (the paper: "the weight of each organ"); the
    background is weighted as the largest organ. By its own size it would get
    a weight hundreds of times below the smallest organ's, so that a false
    positive in the background costs almost nothing: a CPU run trained that
    way painted Ear_Internal_L over ~8 % of every slice."""
    sizes = torch.as_tensor(mean_voxels, dtype=torch.float64).clamp_min(1.0)
    if len(sizes) > 1:
        sizes = torch.cat([sizes[1:].max().reshape(1), sizes[1:]])
    alpha = sizes ** (-float(power))
    return (alpha / alpha.mean()).float()
