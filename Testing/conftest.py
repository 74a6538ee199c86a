"""Shared fixtures: small synthetic volumes built in physical (LPS) space."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

# Objects in physical LPS mm: (label, centre, radii). +x is the patient's left.
HEAD_OBJECTS = (
    (1, (40.0, 0.0, 0.0), (14.0, 11.0, 10.0)),   # left
    (2, (-40.0, 5.0, 5.0), (11.0, 13.0, 12.0)),  # right
    (3, (0.0, 30.0, -20.0), (9.0, 9.0, 14.0)),   # midline, posterior
    (4, (5.0, -40.0, 20.0), (4.0, 4.0, 6.0)),    # small
)
BODY_RADII = (80.0, 95.0, 75.0)


def rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.radians(ax_deg), np.radians(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def make_grid(direction, spacing, centre=(0.0, 0.0, 0.0), extent=(220.0, 240.0, 170.0)):
    """Size and origin so the grid covers ``extent`` mm around ``centre``."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(spacing, dtype=float)
    # Extent along each index axis: project the physical box onto the axis.
    axis_extent = np.abs(direction.T) @ np.asarray(extent)
    size = np.ceil(axis_extent / spacing).astype(int) + 1
    origin = np.asarray(centre) - direction @ ((size - 1) / 2.0 * spacing)
    return tuple(int(s) for s in size), tuple(origin), tuple(spacing), tuple(direction.ravel())


def physical_points(size, origin, spacing, direction):
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(np.float64) * np.asarray(spacing)
    return np.asarray(origin) + index @ np.asarray(direction).reshape(3, 3).T  # (z, y, x, 3)


def render(size, origin, spacing, direction, objects=HEAD_OBJECTS, head_offset=(0.0, 0.0, 0.0)):
    """A CT (HU) and its label image on the given grid."""
    points = physical_points(size, origin, spacing, direction) - np.asarray(head_offset)
    body = np.sum((points / np.asarray(BODY_RADII)) ** 2, axis=-1) <= 1.0
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    labels = np.zeros(ct.shape, np.uint8)
    for label, centre, radii in objects:
        inside = np.sum(((points - np.asarray(centre)) / np.asarray(radii)) ** 2, axis=-1) <= 1.0
        labels[inside] = label
        ct[inside] = 40.0 + 30.0 * label
    images = []
    for array in (ct, labels):
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        images.append(image)
    return images[0], images[1]


GEOMETRIES = {
    "identity": (np.eye(3), (1.0, 1.0, 3.0)),
    "flipped_x": (np.diag([-1.0, 1.0, 1.0]), (1.0, 1.0, 3.0)),
    "flipped_xy": (np.diag([-1.0, -1.0, 1.0]), (0.9, 0.9, 3.0)),
    "permuted": (np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), (0.8, 2.5, 0.8)),
    "oblique": (rotation(10.0, 15.0), (1.0, 1.0, 2.0)),
    "fine_0.7x0.7x2.5": (np.eye(3), (0.7, 0.7, 2.5)),
    "coarse_1.2x1.2x3.5": (np.eye(3), (1.2, 1.2, 3.5)),
}


@pytest.fixture(params=sorted(GEOMETRIES))
def oriented_volume(request):
    direction, spacing = GEOMETRIES[request.param]
    ct, labels = render(*make_grid(direction, spacing))
    return request.param, ct, labels


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory):
    """OpenVINO's converted models (FocusNetCore/openvino_backend.py) go to a
    folder of this test run, shared by the xdist workers and the CLI
    subprocesses, never to the user's own cache."""
    import os

    folder = tmp_path_factory.getbasetemp().parent / "focusnet-cache"
    os.environ["FOCUSNET_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A random tiny model bundle (width 0.125, 3 mm voxels): for the paths
    that need a bundle but not the embedded model's answers (each pass is
    well under a second where the embedded model takes several)."""
    import torch

    from FocusNetCore.bundle import save_bundle
    from FocusNetCore.networks import FocusNetConfig, FocusNetV2, ShapeAutoencoder
    from FocusNetCore.preprocess import PreprocessConfig

    config = FocusNetConfig(width=0.125, roi_size=(8, 16, 16), heatmap_threshold=0.0,
                            preprocess=PreprocessConfig(spacing=(3.0, 3.0, 3.0), crop_size=(64, 64), chunk_slices=16))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_bundle(FocusNetV2(config), path, {"name": "tiny random", "intended_use": "tests only"},
                autoencoder=ShapeAutoencoder(config.roi_size, 0.125), autoencoder_width=0.125)
    return path


# Test files, the longest first, by their summed --durations=0 times on a
# 2-core AVX2 machine (2026-12-02: test_train 333 s, test_review_browser
# 251 s, ... test_package 6 s). `make test` hands whole files to two workers
# (-n 2 --dist loadfile --no-loadscope-reorder) in this order, so the
# longest start first and the run does not end with one worker on a long
# file while the other waits; a file not listed runs after these.
LONGEST_FIRST = ("test_train.py", "test_review_browser.py", "test_review_identity.py", "test_finesos.py", "test_node.py", "test_slicer_logic.py", "test_slicer_controller.py",
                 "test_segment.py", "test_openvino_backend.py", "test_phantom.py", "test_postprocess.py",
                 "test_preprocess.py", "test_dicom_conformance.py", "test_click_heads.py", "test_rtstruct.py",
                 "test_worker.py", "test_slicer_lib.py", "test_study.py", "test_imageio.py", "test_networks.py",
                 "test_precision.py", "test_package.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
