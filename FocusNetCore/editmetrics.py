"""How much a reviewer changed an AI contour, per organ (numpy + scipy).

Beside Dice, 95HD and surface Dice, the added path length (APL; Vaassen et
al., Phys Imaging Radiat Oncol 2020) tracks correction time best: the length
of the final contour, slice by slice, that is not on the AI contour. Here a
contour is the in-plane boundary pixels of the mask on each slice; a final
boundary pixel farther than ``tolerance_mm`` from every AI boundary pixel of
the same slice is added, and counts one in-plane pixel width of length.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from scipy import ndimage

from .metrics import dice, hausdorff95, surface_dice, surface_dice_voxels

_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def slice_boundaries(mask: np.ndarray) -> np.ndarray:
    """Pixels of each slice's mask that touch the outside in-plane (4-connectivity)."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_IN_PLANE, border_value=0)


def added_path_length(ai: np.ndarray, final: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 0.0) -> float:
    """APL in mm for (z, y, x) masks with spacing in array order."""
    ai_edge, final_edge = slice_boundaries(ai), slice_boundaries(final)
    pixel_mm = float(np.mean(spacing[1:]))
    total = 0
    for k in np.nonzero(final_edge.any(axis=(1, 2)))[0]:
        if not ai_edge[k].any():
            total += int(final_edge[k].sum())
            continue
        if tolerance_mm <= 0:
            total += int((final_edge[k] & ~ai_edge[k]).sum())
            continue
        distance = ndimage.distance_transform_edt(~ai_edge[k], sampling=spacing[1:])
        total += int((final_edge[k] & (distance > tolerance_mm)).sum())
    return total * pixel_mm


# APL counts a final boundary pixel as added when it is not on the AI
# boundary at all (Vaassen et al. 2020 report APL at 0 mm); surface Dice
# tolerates 2 mm. Both tolerances go into each record.
APL_TOLERANCE_MM = 0.0
SURFACE_DICE_TOLERANCE_MM = 2.0


def edit_metrics(ai: np.ndarray, final: np.ndarray, spacing: Sequence[float],
                 tolerance_mm: float = SURFACE_DICE_TOLERANCE_MM, apl_tolerance_mm: float = APL_TOLERANCE_MM
                 ) -> Dict[str, float]:
    """One organ: AI proposal vs the reviewer's final contour; ``tolerance_mm``
    is surface Dice's, ``apl_tolerance_mm`` APL's, both stated in the result."""
    ai, final = ai.astype(bool), final.astype(bool)
    voxel_cc = float(np.prod(spacing)) / 1000.0
    added = int((final & ~ai).sum())
    removed = int((ai & ~final).sum())
    return {"dice": dice(ai, final), **hausdorff95(ai, final, spacing),
            "surface_dice": surface_dice(ai, final, spacing, tolerance_mm),
            "surface_dice_voxels": surface_dice_voxels(ai, final, spacing, tolerance_mm),
            "apl_mm": added_path_length(ai, final, spacing, apl_tolerance_mm),
            "apl_tolerance_mm": float(apl_tolerance_mm), "surface_dice_tolerance_mm": float(tolerance_mm),
            "voxels_added": added, "voxels_removed": removed,
            "cc_added": round(added * voxel_cc, 4), "cc_removed": round(removed * voxel_cc, 4),
            "edited": bool(added or removed)}


def organ_edit_metrics(ai_labels: np.ndarray, final_labels: np.ndarray, names_by_label: Dict[int, str],
                       spacing: Sequence[float]) -> Dict[str, Dict[str, float]]:
    return {name: edit_metrics(ai_labels == label, final_labels == label, spacing)
            for label, name in names_by_label.items()}
