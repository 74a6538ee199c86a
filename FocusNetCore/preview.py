"""Overlay pictures: axial, coronal and sagittal slices of a CT with coloured
label contours, in radiological convention (patient's right on the left of
the axial and coronal views, anterior on the left of the sagittal view).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .imageio import atomic_output
from .organs import CATALOGUE, OrganSet
from .preprocess import IDENTITY_DIRECTION

WINDOW = (-160.0, 240.0)  # soft-tissue window, HU
BODY_HU = -500.0  # views are cropped to voxels denser than this
CROP_MARGIN_VOXELS = 8


def _canonical(image: sitk.Image, interpolator) -> sitk.Image:
    """Any orientation -> LPS axes, so slices are displayed the right way round."""
    if tuple(np.round(image.GetDirection(), 6)) == IDENTITY_DIRECTION:
        return image
    return sitk.DICOMOrient(image, "LPS")


def save_overlay(image: sitk.Image, labels: Optional[sitk.Image], organ_set: OrganSet, path,
                 point: Optional[Sequence[float]] = None, title: str = "", overwrite: bool = False) -> Path:
    """Write a PNG with three orthogonal slices through ``point`` (world mm;
    default: the centroid of the small organs, else the image centre)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = _canonical(image, sitk.sitkLinear)
    ct = sitk.GetArrayViewFromImage(image)
    lab = None if labels is None else sitk.GetArrayFromImage(_canonical(labels, sitk.sitkNearestNeighbor))
    if point is None:
        small = np.isin(lab, organ_set.small_labels) if lab is not None else None
        if small is not None and small.any():
            k, j, i = np.argwhere(small).mean(axis=0)
        else:
            k, j, i = (np.asarray(ct.shape) - 1) / 2.0
    else:
        i, j, k = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point))
    k, j, i = (int(round(np.clip(v, 0, n - 1))) for v, n in zip((k, j, i), ct.shape))
    sx, sy, sz = image.GetSpacing()
    views = [
        ("axial", ct[k], None if lab is None else lab[k], sy / sx, False),
        ("coronal", ct[:, j, :], None if lab is None else lab[:, j, :], sz / sx, True),
        ("sagittal", ct[:, :, i], None if lab is None else lab[:, :, i], sz / sy, True),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, (name, plane, plane_labels, aspect, flip) in zip(axes, views):
        body = np.argwhere(plane > BODY_HU)
        if len(body):  # crop to the patient, with a margin
            (r0, c0), (r1, c1) = body.min(axis=0), body.max(axis=0)
            m = CROP_MARGIN_VOXELS
            crop = (slice(max(r0 - m, 0), r1 + m + 1), slice(max(c0 - m, 0), c1 + m + 1))
            plane = plane[crop]
            plane_labels = None if plane_labels is None else plane_labels[crop]
        if flip:  # superior up
            plane = plane[::-1]
            plane_labels = None if plane_labels is None else plane_labels[::-1]
        ax.imshow(plane, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect, interpolation="bilinear")
        if plane_labels is not None:
            for label in np.unique(plane_labels):
                if label == 0 or label > len(organ_set.names):
                    continue
                color = np.asarray(CATALOGUE[organ_set.name_of(int(label))].color) / 255.0
                ax.contour(plane_labels == label, levels=[0.5], colors=[color], linewidths=0.9)
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_output(Path(path), overwrite) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    return Path(path)
