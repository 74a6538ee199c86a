import numpy as np
import pytest
import SimpleITK as sitk

from FocusNetCore.preprocess import (
    Grid, PreprocessConfig, chunk_bounds, find_head_centre, iter_chunks, labels_to_model_grid,
    labels_to_original, preprocess, stack_chunks,
)

from conftest import GEOMETRIES, make_grid, render

MIN_VOXELS = 500


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def physical_centroid(image, mask):
    zyx = np.argwhere(mask).mean(axis=0)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))


def test_round_trip_keeps_every_organ(oriented_volume):
    name, ct, labels = oriented_volume
    pre = preprocess(ct)
    model_labels = labels_to_model_grid(labels, pre.grid)
    back = labels_to_original(model_labels, pre.grid, labels)
    # Geometry of the result is the input's, exactly.
    assert back.GetOrigin() == labels.GetOrigin()
    assert back.GetSpacing() == labels.GetSpacing()
    assert back.GetDirection() == labels.GetDirection()
    original = sitk.GetArrayViewFromImage(labels)
    restored = sitk.GetArrayViewFromImage(back)
    spacing = np.asarray(labels.GetSpacing())
    for label in range(1, int(original.max()) + 1):
        truth, got = original == label, restored == label
        if truth.sum() < MIN_VOXELS:
            continue
        assert dice(truth, got) >= 0.95, (name, label, dice(truth, got))
        shift = np.abs(np.asarray(labels.TransformPhysicalPointToContinuousIndex(
            tuple(physical_centroid(back, got)))) - np.asarray(labels.TransformPhysicalPointToContinuousIndex(
            tuple(physical_centroid(labels, truth)))))
        assert np.all(shift <= 1.0), (name, label, shift, spacing)


def test_left_object_stays_on_patient_left(oriented_volume):
    name, ct, labels = oriented_volume
    pre = preprocess(ct)
    model_labels = labels_to_model_grid(labels, pre.grid)
    # On the canonical grid, x index grows towards the patient's left.
    left_x = np.argwhere(model_labels == 1)[:, 2].mean()
    right_x = np.argwhere(model_labels == 2)[:, 2].mean()
    assert left_x > right_x, name
    # And the CT itself is canonical: the bright left object is at the same place.
    ct_left = pre.image[model_labels == 1].mean()
    assert ct_left == pytest.approx((40.0 + 30.0) / 1000.0, abs=0.01)


def test_orientations_give_the_same_model_image():
    """Flipped and permuted acquisitions of the same head put every organ at
    the same physical place and volume on the model grid."""
    found = {}
    for name in ("identity", "flipped_x", "flipped_xy", "permuted"):
        direction, _ = GEOMETRIES[name]
        ct, labels = render(*make_grid(direction, (1.0, 1.0, 3.0) if name != "permuted" else (3.0, 1.0, 1.0)))
        pre = preprocess(ct)
        model_labels = labels_to_model_grid(labels, pre.grid)
        for label in (1, 2, 3):
            voxels = np.argwhere(model_labels == label)[:, ::-1]  # (x, y, z)
            found.setdefault(label, []).append((pre.grid.index_to_physical(voxels.mean(axis=0)), len(voxels)))
    for label, entries in found.items():
        centre0, volume0 = entries[0]
        for centre, volume in entries[1:]:
            assert np.all(np.abs(centre - centre0) <= 1.5), (label, centre, centre0)
            assert abs(volume - volume0) <= 0.06 * volume0, (label, volume, volume0)


def test_crop_centres_on_head_not_image_centre():
    # Head placed 50 mm to the patient's right and 30 mm anterior of the image centre.
    offset = (-50.0, -30.0, 0.0)
    objects = [(label, tuple(np.add(c, offset)), r) for label, c, r in
               ((1, (40.0, 0.0, 0.0), (14.0, 11.0, 10.0)), (2, (-40.0, 5.0, 5.0), (11.0, 13.0, 12.0)))]
    ct, labels = render(*make_grid(np.eye(3), (1.0, 1.0, 3.0), extent=(380.0, 380.0, 150.0)),
                        objects=objects, head_offset=offset)
    cx, cy = find_head_centre(ct)
    assert cx == pytest.approx(offset[0], abs=4.0)
    assert cy == pytest.approx(offset[1], abs=4.0)
    pre = preprocess(ct)
    assert pre.image.shape[1:] == (240, 240)
    model_labels = labels_to_model_grid(labels, pre.grid)
    # Both organs survive the crop whole.
    for label in (1, 2):
        assert dice(sitk.GetArrayFromImage(labels_to_original(model_labels, pre.grid, labels)) == label,
                    sitk.GetArrayViewFromImage(labels) == label) > 0.95
    # Outside the scan is padded with air.
    assert pre.image.min() == pytest.approx(-1.0)


def test_preprocess_output_contract():
    ct, _ = render(*make_grid(np.eye(3), (0.7, 0.7, 2.5)))
    config = PreprocessConfig(spacing=(1.0, 1.0, 2.5), crop_size=(200, 180))
    pre = preprocess(ct, config)
    assert pre.image.dtype == np.float32
    assert pre.image.shape[1:] == (180, 200)  # (y, x)
    assert pre.grid.spacing == (1.0, 1.0, 2.5)
    assert pre.grid.direction == Grid.of(sitk.Image(1, 1, 1, sitk.sitkUInt8)).direction
    assert pre.image.max() <= config.hu_max / config.hu_scale


@pytest.mark.parametrize("num_slices,chunk,expected", [
    (40, 40, [(0, 40)]), (41, 40, [(0, 40), (40, 41)]), (95, 40, [(0, 40), (40, 80), (80, 95)]),
])
def test_chunk_bounds(num_slices, chunk, expected):
    assert chunk_bounds(num_slices, chunk) == expected


def test_chunks_stack_back():
    array = np.random.default_rng(0).normal(size=(2, 95, 8, 6)).astype(np.float32)
    chunks = list(iter_chunks(array, 40, value=-1.0))
    assert [c.shape[-3] for c in chunks] == [40, 40, 40]
    assert np.all(chunks[-1][:, 15:] == -1.0)
    assert np.array_equal(stack_chunks(chunks, 95), array)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="spacing"):
        PreprocessConfig(spacing=(1.0, 0.0, 3.0))
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessConfig.from_dict({"spacingg": [1, 1, 3]})
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()) == PreprocessConfig()


def _slab_model(margins_x):
    """A 2 mm model grid, 6 x 6 x n voxels along x; organ 1 where the margin
    (its probability minus the background's, per x index) is positive."""
    n = len(margins_x)
    grid = Grid((n, 6, 6), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    margin = np.broadcast_to(np.asarray(margins_x, dtype=np.float32), (6, 6, n))
    probabilities = np.stack([(1.0 - margin) / 2.0, (1.0 + margin) / 2.0])  # background, organ 1
    labels = (margin > 0).astype(np.uint8)
    return grid, labels, probabilities


def _fine_reference(direction):
    """A 0.5 mm grid over the same 0..10 mm in x (either way along x), 2 x 2 x 21 voxels."""
    image = sitk.Image(21, 2, 2, sitk.sitkInt16)
    image.SetSpacing((0.5, 0.5, 0.5))
    image.SetDirection(direction)
    image.SetOrigin((0.0 if direction[0] > 0 else 10.0, 4.0, 4.0))
    return image


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1)],
                         ids=["identity", "x and z flipped"])
def test_probabilities_put_the_boundary_where_the_network_drew_it(direction):
    # The organ's margin falls from +0.1 at x = 8 mm to -0.9 at x = 10 mm: it
    # crosses zero at 8.2 mm, not half-way (9 mm) as the labels alone say.
    grid, labels, probabilities = _slab_model([0.9, 0.9, 0.9, 0.9, 0.1, -0.9])
    reference = _fine_reference(tuple(float(v) for v in direction))
    soft = labels_to_original(labels, grid, reference, probabilities=probabilities)
    hard = labels_to_original(labels, grid, reference)
    for image in (soft, hard):
        assert image.GetOrigin() == reference.GetOrigin() and image.GetDirection() == reference.GetDirection()

    def last_inside_mm(image):
        array = sitk.GetArrayViewFromImage(image)
        xs = [image.TransformIndexToPhysicalPoint((i, 0, 0))[0] for i in range(21) if array[0, 0, i] == 1]
        return max(xs)

    assert last_inside_mm(soft) == 8.0
    assert last_inside_mm(hard) == 8.5


def test_probabilities_do_not_undo_a_decision_on_the_model_grid():
    # Post-processing filled a hole: organ 1 at x index 2 although the
    # network's probability there favours the background. The voxel stays
    # the organ's, and the probabilities shape its boundary elsewhere.
    grid, labels, probabilities = _slab_model([0.9, 0.9, -0.4, 0.9, 0.9, -0.9])
    labels[:, :, 2] = 1
    reference = _fine_reference((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    soft = sitk.GetArrayFromImage(labels_to_original(labels, grid, reference, probabilities=probabilities))
    assert soft[0, 0, 8] == 1  # x = 4 mm, the filled voxel's centre
    assert soft[0, 0, :18].all()


def test_labels_drawn_elsewhere_are_resampled_by_distance_and_drawn_over():
    # Label 2 (an SOS-Net organ) at x index 3-4; S-Net's probabilities know
    # nothing of it. It is placed half-way between voxels, as without them.
    grid, labels, probabilities = _slab_model([0.9, 0.9, 0.9, 0.9, 0.9, -0.9])
    labels[:, :, 3:5] = 2
    probabilities = np.concatenate([probabilities, np.zeros_like(probabilities[:1])])
    reference = _fine_reference((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    got = sitk.GetArrayFromImage(labels_to_original(labels, grid, reference, probabilities=probabilities,
                                                        hard=[2]))[0, 0]
    expected = sitk.GetArrayFromImage(labels_to_original(labels, grid, reference))[0, 0]
    assert (got == 2).any()
    np.testing.assert_array_equal(got == 2, expected == 2)


def test_probabilities_that_do_not_fit_the_labels_are_refused():
    grid, labels, probabilities = _slab_model([0.9, -0.9])
    reference = _fine_reference((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="do not fit"):
        labels_to_original(labels, grid, reference, probabilities=probabilities[:, :, :, :1])
