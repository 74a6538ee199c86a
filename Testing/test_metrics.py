import math

import numpy as np
import pytest

from FocusNetCore.metrics import dice, hausdorff95, organ_metrics, surface_dice, surface_dice_voxels, surface_distances


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def sphere(shape, centre, radius_mm, spacing):
    idx = np.indices(shape).astype(float)
    d2 = sum(((idx[k] - centre[k]) * spacing[k]) ** 2 for k in range(3))
    return d2 <= radius_mm ** 2


def test_dice_known_values():
    a = box((10, 10, 10), (0, 0, 0), (4, 10, 10))
    b = box((10, 10, 10), (2, 0, 0), (6, 10, 10))
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_square_grown_by_one_voxel():
    """A 10 x 10 square slab grown by one voxel in-plane: every surface point
    of the grown one is 1 voxel (0.8 mm) from the original, and back."""
    spacing = (3.0, 0.8, 0.8)
    a = box((5, 20, 20), (1, 5, 5), (4, 15, 15))
    b = box((5, 20, 20), (1, 4, 4), (4, 16, 16))
    ab, ba = surface_distances(a, b, spacing)
    assert np.allclose(ab[ab > 0].min(), 0.8)
    result = hausdorff95(a, b, spacing)
    assert result["hd95_symmetric"] == pytest.approx(0.8, abs=1e-6)
    assert result["hd95_paper"] == pytest.approx(0.8, abs=1e-6)
    assert surface_dice_voxels(a, b, spacing, tolerance_mm=1.2) == pytest.approx(1.0)  # corners: 0.8 * sqrt(2)
    assert surface_dice_voxels(a, b, spacing, tolerance_mm=0.5) < 0.8  # only the shared top and bottom faces count


def test_sphere_shifted_by_2mm():
    spacing = (1.0, 1.0, 1.0)
    a = sphere((40, 40, 40), (20, 20, 20), 10.0, spacing)
    b = sphere((40, 40, 40), (20, 20, 22), 10.0, spacing)
    result = hausdorff95(a, b, spacing)
    assert 1.5 <= result["hd95_symmetric"] <= 2.3
    assert surface_dice(a, b, spacing, tolerance_mm=2.0) > 0.95
    assert surface_dice(a, b, spacing, tolerance_mm=0.5) < 0.6


def test_paper_and_symmetric_forms_differ_when_directions_do():
    spacing = (1.0, 1.0, 1.0)
    a = box((30, 30, 30), (10, 10, 10), (20, 20, 20))
    b = a.copy()
    b[13:17, 13:17, 23:27] = True  # a far-away blob only in b: >5 % of its surface
    result = hausdorff95(a, b, spacing)
    assert result["hd95_paper"] != pytest.approx(result["hd95_symmetric"])


def test_empty_masks_are_documented_values():
    empty = np.zeros((5, 5, 5), bool)
    full = box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    assert all(math.isnan(v) for v in hausdorff95(empty, full, (1, 1, 1)).values())
    for form in (surface_dice, surface_dice_voxels):
        assert form(empty, empty, (1, 1, 1)) == 1.0
        assert form(empty, full, (1, 1, 1)) == 0.0


def test_surface_dice_weights_the_surface_by_its_area():
    """Nikolov et al.'s surface Dice is a fraction of surface area. A
    60 x 60 mm slab of ten 3-mm slices whose top moves up one slice: with a
    2 mm tolerance only the two top faces (2 x 3600 mm²) are out, so the
    score is 1 - 7200 / (total area of both), up to the rounding of the
    slab's edges by marching cubes. The voxel-count form, which gives each
    boundary voxel one vote whatever its area, is far from it on 3 mm slices."""
    spacing, n = (3.0, 1.0, 1.0), 60
    a = box((20, n + 20, n + 20), (5, 10, 10), (15, 10 + n, 10 + n))
    b = box((20, n + 20, n + 20), (5, 10, 10), (16, 10 + n, 10 + n))
    areas = (4 * n * 30 + 2 * n * n) + (4 * n * 33 + 2 * n * n)
    expected = 1.0 - 2 * n * n / areas
    assert surface_dice(a, b, spacing, tolerance_mm=2.0) == pytest.approx(expected, abs=0.01)
    assert abs(surface_dice_voxels(a, b, spacing, tolerance_mm=2.0) - expected) > 0.1
    assert surface_dice(a, b, spacing, tolerance_mm=3.5) == pytest.approx(1.0)
    assert surface_dice(a, a, spacing, tolerance_mm=0.0) == pytest.approx(1.0)


def test_organ_metrics_per_label():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:5, 2:5, 2:5] = 1
    truth[6:9, 6:9, 6:9] = 2
    pred = truth.copy()
    pred[6:9, 6:9, 6:9] = 0
    out = organ_metrics(pred, truth, [1, 2], (1, 1, 1))
    assert out[1]["dice"] == 1.0 and out[1]["hd95_paper"] == 0.0
    assert out[2]["dice"] == 0.0 and math.isnan(out[2]["hd95_symmetric"])
