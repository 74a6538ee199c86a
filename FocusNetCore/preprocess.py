"""Preprocessing (paper section 4.2) and its exact inverse.

The model sees every scan on a *model grid*:

- canonical orientation: identity direction in LPS (x runs to the patient's
  left, y to posterior, z to superior), so flipped, permuted or oblique input
  axes land the same anatomy at the same indices and left organs stay left;
- model spacing, 1 x 1 x 3 mm by default (x, y, z; PDDCA: 1 x 1 x 2.5 mm);
- an in-plane window of 240 x 240 voxels centred on the head found in the
  image (the paper crops the image centre, which misses heads placed off
  centre); what falls outside the scan is padded with air;
- in z, the head-and-neck band of the scan: from HEAD_BAND_MARGIN_MM above
  the top of the head down to HEAD_BAND_MM below it (the 22 OARs lie within
  about 25 cm of the vertex), so a scan that goes on into the thorax or
  over the whole body costs what its head does; the rest of the scan gets
  background. The band is cut into 40-slice chunks (padded with air).

Resampling the CT onto that grid is one SimpleITK resample: orientation,
spacing and crop happen together, with no intermediate copies. Labels go back
between grids by linear interpolation of each organ's signed distance map,
restricted to the organ's bounding box, which keeps thin structures that
nearest-neighbour resampling would break.

No torch here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

AIR_HU = -1024.0
# Body mask threshold: everything denser than lung/air is patient (or couch).
BODY_THRESHOLD_HU = -400.0
# Head finding works on a coarse copy of the scan with about this spacing.
HEAD_FINDER_SPACING_MM = 4.0
# Slices wider than this multiple of the median body area are shoulders and
# are left out of the head centre.
SHOULDER_AREA_FACTOR = 1.25
# The head-and-neck band (z): the organs at risk lie within about 250 mm of
# the top of the head (vertex to the mandible and the upper cervical cord);
# the band keeps 320 mm below the top and 20 mm above it.
HEAD_BAND_MM = 320.0
HEAD_BAND_MARGIN_MM = 20.0
# The in-plane centre comes from the slices this far below the top (the
# cranium and the orbits), so a neck or thorax in the band does not pull the crop.
HEAD_CENTRE_MM = 120.0
# A slice belongs to the patient when it holds at least this much body (mm²):
# less is noise, a headrest's edge, hair.
MIN_BODY_AREA_MM2 = 400.0
# Voxels of margin around each label's box when resampling labels: room for
# the distance map to turn positive outside the organ.
LABEL_BOX_MARGIN = 3
# labels_to_original with probabilities: the least margin (probability) a
# model voxel's own decision keeps, so a voxel post-processing added or
# took away stays on its side of the boundary.
MARGIN_FLOOR = 0.02
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """Model-side geometry and intensity settings; stored in the model bundle."""

    spacing: Tuple[float, float, float] = (1.0, 1.0, 3.0)  # x, y, z in mm
    crop_size: Tuple[int, int] = (240, 240)  # x, y voxels
    chunk_slices: int = 40
    # Intensity normalisation: clip to [hu_min, hu_max], then divide by hu_scale.
    hu_min: float = -1000.0
    hu_max: float = 1600.0
    hu_scale: float = 1000.0

    def __post_init__(self):
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (x, y, z mm), got {self.spacing}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 8:
            raise ValueError(f"crop_size must be two sizes >= 8 (x, y voxels), got {self.crop_size}")
        if self.chunk_slices < 1:
            raise ValueError(f"chunk_slices must be >= 1, got {self.chunk_slices}")
        if self.hu_max <= self.hu_min or self.hu_scale <= 0:
            raise ValueError(f"bad intensity window: hu_min={self.hu_min}, hu_max={self.hu_max}, hu_scale={self.hu_scale}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        from .configdict import from_dict

        return from_dict(cls, data, "preprocessing", tuples=("spacing", "crop_size"))


@dataclass(frozen=True)
class Grid:
    """A voxel grid: size (x, y, z), origin, spacing and direction (row-major 3x3)."""

    size: Tuple[int, int, int]
    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...] = IDENTITY_DIRECTION

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetOrigin()), tuple(image.GetSpacing()),
                   tuple(image.GetDirection()))

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return tuple(reversed(self.size))

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical(self, index) -> np.ndarray:
        """Continuous (x, y, z) indices (..., 3) -> physical points (..., 3)."""
        index = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + (index * np.asarray(self.spacing)) @ self.matrix.T

    def physical_to_index(self, point) -> np.ndarray:
        point = np.asarray(point, dtype=float)
        return ((point - np.asarray(self.origin)) @ self.matrix) / np.asarray(self.spacing)

    def corners(self) -> np.ndarray:
        """Physical positions of the 8 corner voxel centres, (8, 3)."""
        last = np.asarray(self.size) - 1
        idx = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * last
        return self.index_to_physical(idx)

    def box_reached_by(self, other: "Grid", margin: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """The voxel box (lo, hi: (x, y, z), stop exclusive) of this grid
        that ``other``'s voxel centres reach, grown by ``margin`` voxels and
        clipped to this grid."""
        reach = self.physical_to_index(other.corners())
        lo = np.clip(np.floor(reach.min(axis=0)).astype(int) - margin, 0, self.size)
        hi = np.clip(np.ceil(reach.max(axis=0)).astype(int) + 1 + margin, 0, self.size)
        return lo, hi

    def sub_grid(self, start: Sequence[int], size: Sequence[int]) -> "Grid":
        origin = self.index_to_physical(np.asarray(start, dtype=float))
        return Grid(tuple(int(s) for s in size), tuple(float(v) for v in origin), self.spacing, self.direction)

    def empty_image(self, pixel_type=sitk.sitkUInt8) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], pixel_type)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Grid":
        return cls(tuple(int(v) for v in data["size"]), tuple(data["origin"]), tuple(data["spacing"]),
                   tuple(data["direction"]))


@dataclass
class Preprocessed:
    """A scan on the model grid: normalised intensities (z, y, x) and both grids."""

    image: np.ndarray  # (D, H, W) float32, normalised
    grid: Grid  # the model grid
    source: Grid  # the original scan's grid
    head_centre: Tuple[float, float] = field(default=(0.0, 0.0))  # physical x, y (mm)


def _resample(image: sitk.Image, grid: Grid, interpolator, default: float, pixel_type) -> sitk.Image:
    return sitk.Resample(image, [int(s) for s in grid.size], sitk.Transform(), interpolator,
                         grid.origin, grid.spacing, grid.direction, float(default), pixel_type)


@dataclass(frozen=True)
class HeadLocation:
    centre: Tuple[float, float]  # physical x, y (mm) of the head
    top: float  # physical z (mm, LPS: superior is +z) of the head's top, or of the scan's top slice
    band: Tuple[float, float]  # physical z range (low, high) the model sees


def locate_head(image: sitk.Image) -> HeadLocation:
    """Where the head is: the body is the largest connected component above
    BODY_THRESHOLD_HU on a coarse copy of the scan; the head's top is its
    most superior slice; the band runs from HEAD_BAND_MM below that to
    HEAD_BAND_MARGIN_MM above; the in-plane centre averages the slices of
    the top HEAD_CENTRE_MM that are narrower than the shoulders. A scan with no body is refused."""
    # Work on the LPS-ordered copy (a flip/permutation of the array, no
    # resampling), so flipped acquisitions are shrunk from the same end and
    # give exactly the same centre.
    if not np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3)):  # already LPS: no whole-scan copy
        image = sitk.DICOMOrient(image, "LPS")
    spacing = image.GetSpacing()
    factors = [max(1, int(round(HEAD_FINDER_SPACING_MM / spacing[0]))),
               max(1, int(round(HEAD_FINDER_SPACING_MM / spacing[1]))), 1]
    coarse = sitk.Shrink(image, factors) if factors != [1, 1, 1] else image
    body = sitk.BinaryMorphologicalOpening(coarse > BODY_THRESHOLD_HU, [1, 1, 0])
    components = sitk.RelabelComponent(sitk.ConnectedComponent(body), sortByObjectSize=True)
    mask = sitk.GetArrayViewFromImage(components) == 1  # (z, y, x), z to superior
    grid = Grid.of(coarse)
    pixel_mm2 = float(coarse.GetSpacing()[0] * coarse.GetSpacing()[1])
    areas = mask.sum(axis=(1, 2))
    occupied = np.nonzero(areas * pixel_mm2 >= MIN_BODY_AREA_MM2)[0]
    if not len(occupied):
        raise ValueError("no patient in the scan: nothing denser than "
                         f"{BODY_THRESHOLD_HU:g} HU over {MIN_BODY_AREA_MM2:g} mm² in any slice")
    top = float(grid.index_to_physical((0, 0, int(occupied.max())))[2])
    band = (top - HEAD_BAND_MM, top + HEAD_BAND_MARGIN_MM)
    head = [k for k in np.nonzero(areas)[0] if top - HEAD_CENTRE_MM <= grid.index_to_physical((0, 0, int(k)))[2]]
    median_area = float(np.median(areas[head]))
    head_slices = [k for k in head if areas[k] <= SHOULDER_AREA_FACTOR * median_area]
    points = []
    for k in head_slices:
        ys, xs = np.nonzero(mask[k])
        points.append((xs.mean(), ys.mean(), float(k)))
    centre = grid.index_to_physical(np.mean(points, axis=0))
    return HeadLocation((float(centre[0]), float(centre[1])), top, band)


def find_head_centre(image: sitk.Image) -> Tuple[float, float]:
    """Physical (x, y) centre of the head (see :func:`locate_head`)."""
    return locate_head(image).centre


def model_grid(image: sitk.Image, config: PreprocessConfig, head=None) -> Grid:
    """The canonical LPS grid at model spacing: crop_size in-plane around the
    head, covering the part of the scan's z extent inside the head band.
    ``head``: a HeadLocation, or an (x, y) centre (then the whole z extent)."""
    if head is None:
        head = locate_head(image)
    sx, sy, sz = config.spacing
    nx, ny = config.crop_size
    corners = Grid.of(image).corners()
    z_low, z_high = float(corners[:, 2].min()), float(corners[:, 2].max())
    if isinstance(head, HeadLocation):
        z_low, z_high = max(z_low, head.band[0]), min(z_high, head.band[1])
        centre = head.centre
    else:
        centre = head
    nz = int(math.floor((z_high - z_low) / sz + 1e-6)) + 1
    x0 = centre[0] - (nx - 1) / 2.0 * sx
    y0 = centre[1] - (ny - 1) / 2.0 * sy
    if isinstance(head, HeadLocation):
        # Slices counted down from the band's top: the same head gives the
        # same model slices however far the scan goes on below it.
        x0, y0, anchor = _snap_to_lattice((x0, y0, z_high), Grid.of(image))
        if anchor > z_high + 1e-6:
            anchor -= _source_step_z(Grid.of(image), anchor - z_high)
        nz = int(math.floor((anchor - z_low) / sz + 1e-6)) + 1
        origin = (x0, y0, anchor - (nz - 1) * sz)
    else:
        z0 = z_low + ((z_high - z_low) - (nz - 1) * sz) / 2.0  # centre the slices in the extent
        origin = _snap_to_lattice((x0, y0, z0), Grid.of(image))
    return Grid((nx, ny, nz), origin, (sx, sy, sz))


def _source_step_z(source: "Grid", overshoot: float) -> float:
    """The source's slice step along z (LPS), for moving a snapped anchor back inside the scan."""
    matrix = np.abs(source.matrix)
    step = float(source.spacing[int(np.argmax(matrix[2]))])
    return step * math.ceil(overshoot / step - 1e-9)


def _snap_to_lattice(origin, source: Grid) -> Tuple[float, float, float]:
    """Move the model grid's origin onto the nearest source voxel centre when
    the source axes are the LPS axes (possibly flipped or permuted): samples
    then coincide wherever the spacings agree, and a label that does not need
    resampling is not blurred by a half-voxel shift. Oblique grids are left
    as they are."""
    matrix = np.abs(source.matrix)
    if not np.allclose(np.sort(matrix, axis=1), [[0, 0, 1]] * 3, atol=1e-6):
        return tuple(float(v) for v in origin)
    snapped = []
    for axis in range(3):
        step = source.spacing[int(np.argmax(matrix[axis]))]
        base = source.origin[axis]
        snapped.append(float(base + round((origin[axis] - base) / step) * step))
    return tuple(snapped)


def normalise(hu: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    return (np.clip(hu, config.hu_min, config.hu_max) / config.hu_scale).astype(np.float32)


def preprocess(image: sitk.Image, config: PreprocessConfig = PreprocessConfig()) -> Preprocessed:
    """CT (HU, any orientation and spacing) -> normalised array on the model grid."""
    head = locate_head(image)
    grid = model_grid(image, config, head)
    resampled = _resample(image, grid, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    array = normalise(sitk.GetArrayViewFromImage(resampled), config)
    return Preprocessed(array, grid, Grid.of(image), head.centre)


def resample_labels(labels: sitk.Image, target: Grid) -> np.ndarray:
    """Resample a label image onto ``target`` (returns a (z, y, x) array).

    Each label's signed distance map (mm, negative inside) is computed inside
    the label's own bounding box, linearly interpolated onto the target grid,
    and the label claims the target voxels where its distance is negative and
    the smallest. Interpolating distances instead of binary masks keeps
    surfaces between samples, so thin and small organs survive a round trip
    through a coarser grid. Works for any pair of orientations.
    """
    source = Grid.of(labels)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkUInt16))
    array = sitk.GetArrayViewFromImage(labels)

    def fields():
        for label in stats.GetLabels():
            if label == 0:
                continue
            box = stats.GetBoundingBox(label)  # (x, y, z start, x, y, z size)
            start = np.maximum(np.asarray(box[:3]) - LABEL_BOX_MARGIN, 0)
            stop = np.minimum(np.asarray(box[:3]) + np.asarray(box[3:]) + LABEL_BOX_MARGIN, source.size)
            crop = array[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]] == label
            yield label, start, signed_distance(crop, source.spacing)

    far = float(max(source.spacing)) * LABEL_BOX_MARGIN
    dtype = np.uint8 if _max_label(labels) < 256 else np.uint16
    return resample_level_sets(fields(), source, target, far, dtype)


def resample_level_sets(fields: Iterable[Tuple[int, Sequence[int], np.ndarray]], source: Grid, target: Grid,
                        far: float, dtype=np.uint8) -> np.ndarray:
    """Labels on ``target`` (a (z, y, x) array) from one level-set field per
    label on ``source``: (label, the field's first voxel (x, y, z) on
    ``source``, the field (z, y, x), negative inside the label). Each field
    is linearly interpolated onto the target voxels its box reaches (``far``,
    outside, beyond it); a label claims the voxels where its field is
    negative and lower than every other label's there."""
    out = np.zeros(target.shape, dtype=dtype)
    # Only where the source grid reaches: a long scan around a short model
    # grid does not pay for its length (memory).
    base, top = target.box_reached_by(source, margin=1)
    if np.any(top <= base):
        return out
    out_window = out[base[2]:top[2], base[1]:top[1], base[0]:top[0]]
    best = np.zeros(out_window.shape, dtype=np.float32)  # field of the winning label (< 0)
    for label, start, values in fields:
        box_grid = source.sub_grid(start, tuple(reversed(values.shape)))
        field_image = sitk.GetImageFromArray(values.astype(np.float32, copy=False))
        box_grid.apply_to(field_image)
        # Target voxels that the source box can reach.
        corners = target.physical_to_index(box_grid.corners())
        lo = np.clip(np.floor(corners.min(axis=0)).astype(int), base, top)
        hi = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, base, top)
        if np.any(hi <= lo):
            continue
        region = target.sub_grid(lo, hi - lo)
        resampled = sitk.GetArrayFromImage(_resample(field_image, region, sitk.sitkLinear, far, sitk.sitkFloat32))
        a, b = lo - base, hi - base
        window = (slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0]))
        wins = resampled < best[window]
        best[window][wins] = resampled[wins]
        out_window[window][wins] = label
    return out


def signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Signed distance (mm) of a (z, y, x) mask: negative inside, positive
    outside, zero half-way between an inside and an outside voxel centre."""
    sampling = tuple(float(s) for s in reversed(tuple(spacing)))
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    return (outside - inside).astype(np.float32)


def _max_label(labels: sitk.Image) -> int:
    return int(sitk.GetArrayViewFromImage(labels).max(initial=0))


def labels_to_model_grid(labels: sitk.Image, grid: Grid) -> np.ndarray:
    """Ground-truth labels (original grid) -> (z, y, x) array on the model grid."""
    return resample_labels(labels, grid)


def labels_to_original(labels: np.ndarray, grid: Grid, reference: sitk.Image,
                       probabilities: Optional[np.ndarray] = None, hard: Sequence[int] = ()) -> sitk.Image:
    """Labels (z, y, x) on the model grid -> label image on ``reference``'s grid,
    with ``reference``'s origin, spacing and direction exactly.

    Without ``probabilities`` each label's boundary is half-way between its
    voxels and the others (signed distances, resample_labels). With them,
    (classes, z, y, x) in any scale (S-Net's soft-max: class c's probability
    at each voxel), a label's boundary lies where its probability equals the
    highest other class's, linearly interpolated between the model voxels,
    as the network drew it: finer than the model grid (nnU-Net, too,
    resamples probabilities, not labels). ``labels`` still decides which
    model voxels are the label's (post-processing may have changed a few):
    each keeps at least MARGIN_FLOOR on its side. The labels in ``hard``
    (drawn by something the probabilities are not of: SOS-Net's small
    organs) are resampled by distance and drawn over the rest, as they are
    on the model grid."""
    if labels.shape != grid.shape:
        raise ValueError(f"label array shape {labels.shape} does not match the model grid {grid.shape}")
    target = Grid.of(reference)
    if probabilities is None:
        image = sitk.GetImageFromArray(labels)
        grid.apply_to(image)
        array = resample_labels(image, target)
    else:
        if probabilities.shape[1:] != labels.shape or probabilities.shape[0] <= int(labels.max(initial=0)):
            raise ValueError(f"probabilities of shape {probabilities.shape} do not fit labels of shape {labels.shape}")
        hard = [int(label) for label in hard]
        scale = float(np.iinfo(probabilities.dtype).max) if probabilities.dtype.kind in "ui" else 1.0
        fields = _margin_fields(labels, probabilities, scale, skip=set(hard))
        array = resample_level_sets(fields, grid, target, far=1.0, dtype=labels.dtype)
        drawn_over = np.isin(labels, hard)
        if drawn_over.any():
            image = sitk.GetImageFromArray(np.where(drawn_over, labels, 0).astype(labels.dtype))
            grid.apply_to(image)
            over = resample_labels(image, target)
            array[over > 0] = over[over > 0]
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    return out


def _margin_fields(labels: np.ndarray, probabilities: np.ndarray, scale: float, skip=frozenset()):
    """Per label of ``labels`` (not in ``skip``), the level set for
    resample_level_sets: minus (its probability - the highest other class's)
    over its box and LABEL_BOX_MARGIN voxels around, with the sign of
    ``labels``' own decision and at least MARGIN_FLOOR from zero."""
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or label in skip:
            continue
        box = tuple(slice(max(s.start - LABEL_BOX_MARGIN, 0), min(s.stop + LABEL_BOX_MARGIN, n))
                    for s, n in zip(box, labels.shape))
        p = probabilities[(slice(None),) + box].copy()  # in its own type: a quarter of float32's copy for uint8
        own = p[label].astype(np.float32)
        p[label] = 0  # probabilities are never below 0: the highest other class is the maximum
        margin = (own - p.max(axis=0).astype(np.float32)) / scale
        inside = labels[box] == label
        field = np.where(inside, -np.maximum(margin, MARGIN_FLOOR), np.maximum(-margin, MARGIN_FLOOR))
        yield label, (box[2].start, box[1].start, box[0].start), field


def chunk_bounds(num_slices: int, chunk_slices: int) -> List[Tuple[int, int]]:
    """Non-overlapping [start, stop) slice ranges; the last one may be short
    (see :func:`pad_to_chunks`)."""
    return [(s, min(s + chunk_slices, num_slices)) for s in range(0, num_slices, chunk_slices)]


def pad_to_chunks(array: np.ndarray, chunk_slices: int, value: float) -> np.ndarray:
    """Pad the slice axis (axis -3) up to a multiple of ``chunk_slices``."""
    missing = (-array.shape[-3]) % chunk_slices
    if not missing:
        return array
    pad = [(0, 0)] * array.ndim
    pad[-3] = (0, missing)
    return np.pad(array, pad, constant_values=value)


def iter_chunks(array: np.ndarray, chunk_slices: int, value: float) -> Iterator[np.ndarray]:
    """40-slice chunks of a (..., D, H, W) array, the last one padded with ``value``."""
    padded = pad_to_chunks(array, chunk_slices, value)
    for start in range(0, padded.shape[-3], chunk_slices):
        yield padded[..., start:start + chunk_slices, :, :]


def stack_chunks(chunks: Sequence[np.ndarray], num_slices: int) -> np.ndarray:
    """Inverse of :func:`iter_chunks`: concatenate along the slice axis and drop the padding."""
    return np.concatenate(list(chunks), axis=-3)[..., :num_slices, :, :]
