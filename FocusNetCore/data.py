"""Training data: finding contoured cases in the layouts users have, a
preprocessing cache, and the sampling of 40-slice training chunks with the
paper's augmentation (section 4.2).

Layouts read:

- phantom / plain pairs: ``<case>_ct.<ext>`` + ``<case>_labels.<ext>`` with a
  ``labels.json`` label table beside them (what ``focusnet phantom`` writes);
- PDDCA: ``<case>/img.nrrd`` + ``<case>/structures/<Structure>.nrrd``;
- nnU-Net: ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz`` +
  ``dataset.json``;
- DICOM: ``<case>/CT/`` (a CT series) + ``<case>/labels.nrrd`` with the
  folder's ``labels.json``.

Labels are mapped to the training organ set by organ name. An organ a case
is not contoured for is marked absent and left out of that case's loss.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .imageio import ImageReadError, has_volume_suffix, read_image, read_label_image
from .organs import CATALOGUE, PDDCA_FILE_NAMES, UNIONS, OrganSet
from .preprocess import PreprocessConfig, labels_to_model_grid, preprocess

# Voxels of margin (z) kept between the small organs and the crop's ends.
SMALL_ORGAN_Z_MARGIN = 3
HEATMAP_SIGMA_VOXELS = 5.0


@dataclass
class CaseSource:
    """Where one contoured case lives; ``label_files`` maps organ name -> (file, value)."""

    name: str
    image: Path
    label_files: Dict[str, Tuple[Path, int]]
    rtstruct: Optional[Path] = None  # DICOM cases: contours from an RT Structure Set

    def fingerprint(self) -> str:
        parts = [str(self.image)]
        extra = {self.rtstruct} if self.rtstruct else set()
        for path in sorted({p for p, _ in self.label_files.values()} | {self.image} | extra):
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _name_to_catalogue(name: str) -> Optional[str]:
    if name in CATALOGUE:
        return name
    reverse = {v: k for k, v in PDDCA_FILE_NAMES.items()}
    return reverse.get(name)


def discover_cases(folder) -> Tuple[List[CaseSource], List[str]]:
    """Cases below ``folder`` and the problems met (reported, never silent)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(folder, "training data folder does not exist")
    cases: List[CaseSource] = []
    problems: List[str] = []
    if (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir():
        table = json.loads((folder / "dataset.json").read_text())["labels"]
        ending = json.loads((folder / "dataset.json").read_text()).get("file_ending", ".nii.gz")
        for label_file in sorted((folder / "labelsTr").glob(f"*{ending}")):
            name = label_file.name[: -len(ending)]
            image = folder / "imagesTr" / f"{name}_0000{ending}"
            if not image.is_file():
                problems.append(f"{label_file}: no image {image.name}")
                continue
            cases.append(CaseSource(name, image, {n: (label_file, int(v)) for n, v in table.items()
                                                  if n != "background"}))
        return cases, problems
    table_file = folder / "labels.json"
    table = json.loads(table_file.read_text())["labels"] if table_file.is_file() else None
    for path in sorted(folder.iterdir()):
        if path.is_file() and has_volume_suffix(path) and "_ct." in path.name:
            labels = path.with_name(path.name.replace("_ct.", "_labels."))
            if table is None:
                problems.append(f"{path}: no labels.json label table in {folder}")
            elif not labels.is_file():
                problems.append(f"{path}: no label file {labels.name}")
            else:
                cases.append(CaseSource(path.name.split("_ct.")[0], path,
                                        {n: (labels, int(v)) for n, v in table.items()}))
        elif path.is_dir() and (path / "img.nrrd").is_file():
            structures = sorted((path / "structures").glob("*.nrrd")) if (path / "structures").is_dir() else []
            files = {}
            for s in structures:
                organ = _name_to_catalogue(s.name[: -len(".nrrd")])
                if organ is None:
                    problems.append(f"{s}: structure name not in the organ catalogue, ignored")
                else:
                    files[organ] = (s, 1)
            if not files:
                problems.append(f"{path}: no structures")
                continue
            cases.append(CaseSource(path.name, path / "img.nrrd", files))
        elif path.is_dir() and (path / "CT").is_dir():
            rtstructs = sorted((path / "RTSTRUCT").glob("*.dcm")) if (path / "RTSTRUCT").is_dir() else []
            if rtstructs:
                cases.append(CaseSource(path.name, path / "CT", {}, rtstruct=rtstructs[0]))
            elif table is not None and (path / "labels.nrrd").is_file():
                cases.append(CaseSource(path.name, path / "CT", {n: (path / "labels.nrrd", int(v))
                                                                 for n, v in table.items()}))
            else:
                problems.append(f"{path}: DICOM case without RTSTRUCT/*.dcm or labels.nrrd + labels.json")
    return cases, problems


def load_case(source: CaseSource, organs: OrganSet):
    """(CT image, label array (z, y, x) in ``organs``, present flags (num_classes,))."""
    image = read_image(source.image)
    if source.rtstruct is not None:
        from .rtstruct import read_rtstruct

        labels, present, _ = read_rtstruct(source.rtstruct, image, source.image, organs)
        return image, labels, present
    labels = np.zeros(tuple(reversed(image.GetSize())), dtype=np.uint8)
    present = np.zeros(organs.num_classes, dtype=bool)
    present[0] = True
    arrays: Dict[Path, np.ndarray] = {}
    for organ in organs.names:
        parts = [organ] if organ in source.label_files else [p for p in UNIONS.get(organ, ()) if p in source.label_files]
        for part in parts:
            path, value = source.label_files[part]
            if path not in arrays:
                arrays[path] = sitk.GetArrayFromImage(read_label_image(path, reference=image))
            mask = arrays[path] == value
            if mask.any():
                labels[mask] = organs.label_of(organ)
                present[organs.label_of(organ)] = True
    return image, labels, present


class CachedCase:
    """One preprocessed case: the image (D, H, W) normalised on the model
    grid, its labels (D, H, W) uint8 and the present flags (C,) bool.

    A case from the preprocessing cache lives on disk (``folder``: image.npy
    float16, labels.npy uint8, meta.json) and is read by memory mapping, only
    the slices a crop needs (:meth:`slab`): a rank's memory does not grow
    with the number of cases. ``image`` and ``labels`` read the whole array
    (validation, calibration), transiently. A case made in memory (tests,
    scripts) holds its arrays."""

    def __init__(self, name: str, image: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                 present: Optional[np.ndarray] = None, *, folder: Optional[Path] = None,
                 meta: Optional[dict] = None):
        self.name = name
        self._image, self._labels = image, labels
        self.folder = Path(folder) if folder is not None else None
        self.meta = meta or {}
        self.present = np.asarray(present if present is not None else self.meta["present"], dtype=bool)

    @classmethod
    def open(cls, folder) -> "CachedCase":
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        return cls(meta["name"], folder=folder, meta=meta)

    def __reduce__(self):  # a worker process gets the folder, not the arrays
        if self.folder is not None:
            return (CachedCase.open, (self.folder,))
        return (CachedCase, (self.name, self._image, self._labels, self.present))

    @property
    def image(self) -> np.ndarray:
        if self._image is not None:
            return self._image
        return np.load(self.folder / "image.npy").astype(np.float32)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is not None:
            return self._labels
        return np.load(self.folder / "labels.npy")

    @property
    def depth(self) -> int:
        return int(self.meta["shape"][0]) if self._image is None else int(self._image.shape[0])

    @property
    def fill(self) -> float:
        """The image's lowest value (air): what a crop past the scan's end holds."""
        return float(self.meta["fill"]) if self._image is None else float(self._image.min())

    def slab(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """Slices start..stop-1 of the image (float32) and the labels; from
        disk, only those slices are read (the map is closed again)."""
        if self._image is not None:
            return np.asarray(self._image[start:stop], dtype=np.float32), np.asarray(self._labels[start:stop])
        image = np.load(self.folder / "image.npy", mmap_mode="r")
        labels = np.load(self.folder / "labels.npy", mmap_mode="r")
        try:
            return np.array(image[start:stop], dtype=np.float32), np.array(labels[start:stop])
        finally:
            del image, labels

    @cached_property
    def z_extents(self) -> Dict[int, Tuple[int, int]]:
        """First and last slice of each label the case has (kept in the
        cache's meta.json; computed once for a case in memory)."""
        if "z_extents" in self.meta:
            return {int(k): tuple(v) for k, v in self.meta["z_extents"].items()}
        return _z_extents(self._labels)

    def label_counts(self, num_classes: int) -> np.ndarray:
        if "label_counts" in self.meta:
            return np.asarray(self.meta["label_counts"], dtype=np.float64)[:num_classes]
        return np.bincount(self.labels.ravel(), minlength=num_classes)[:num_classes].astype(np.float64)


def _z_extents(labels: np.ndarray) -> Dict[int, Tuple[int, int]]:
    return {label: (box[0].start, box[0].stop - 1)
            for label, box in enumerate(ndimage.find_objects(labels), start=1) if box is not None}


class PreprocessCache:
    """Each scan is resampled to the model grid once; the result is kept in
    ``<cache>/<case>-<key>/`` (image.npy float16, labels.npy uint8 and
    meta.json: present flags, shape, air value, each label's slices and
    voxel count), where the key covers the files and settings. Written to a
    private folder and renamed into place: builders on several ranks or
    workers never see a half-written case, and the first to finish wins."""

    def __init__(self, folder, config: PreprocessConfig, organs: OrganSet):
        self.folder = Path(folder)
        self.config = config
        self.organs = organs

    def key(self, source: CaseSource) -> str:
        settings = json.dumps([self.config.to_dict(), self.organs.key, self.organs.names], sort_keys=True)
        return hashlib.sha1((source.fingerprint() + settings).encode()).hexdigest()[:16]

    def path(self, source: CaseSource) -> Path:
        return self.folder / f"{source.name}-{self.key(source)}"

    def error_path(self, source: CaseSource) -> Path:
        return self.path(source).with_name(self.path(source).name + ".error")

    def get(self, source: CaseSource) -> CachedCase:
        folder = self.path(source)
        if (folder / "meta.json").is_file():
            return CachedCase.open(folder)
        self.build(source)
        return CachedCase.open(folder)

    def build(self, source: CaseSource) -> None:
        """Preprocess one case into the cache (nothing when it is there)."""
        import shutil

        folder = self.path(source)
        if (folder / "meta.json").is_file():
            return
        try:
            image, labels, present = load_case(source, self.organs)
            label_image = sitk.GetImageFromArray(labels)
            label_image.CopyInformation(image)
            pre = preprocess(image, self.config)
            model_labels = labels_to_model_grid(label_image, pre.grid)
        except (ImageReadError, ValueError, RuntimeError, OSError) as error:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.error_path(source).write_text(str(error))  # the other ranks report it too
            raise
        stored = pre.image.astype(np.float16)
        meta = {"format": 2, "name": source.name, "shape": list(stored.shape), "present": present.tolist(),
                "fill": float(stored.min()),
                "z_extents": {str(k): list(v) for k, v in _z_extents(model_labels).items()},
                "label_counts": np.bincount(model_labels.ravel(), minlength=self.organs.num_classes).tolist()}
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f".{folder.name}.{os.getpid()}.part"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        np.save(part / "image.npy", stored)
        np.save(part / "labels.npy", model_labels)
        (part / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(part, folder)
        except OSError:  # another rank or worker finished it first
            shutil.rmtree(part, ignore_errors=True)
            if not (folder / "meta.json").is_file():
                raise


def _build_one(args):
    cache, source = args
    try:
        cache.build(source)
        return source.name, ""
    except (ImageReadError, ValueError, RuntimeError, OSError) as error:
        return source.name, str(error)


def load_training_cases(folder, cache_folder, config: PreprocessConfig, organs: OrganSet, log=print,
                        workers: int = 1, rank: int = 0, world: int = 1, barrier=None, only=None):
    """All usable cases, preprocessed into the cache and opened from it
    (memory-mapped); malformed ones are reported by name and skipped.
    Building is shared: rank ``rank`` of ``world`` builds every world-th
    case, with ``workers`` processes; ``barrier()`` (DDP's) is called before
    the cases are opened, so every rank sees all of them. ``only``: the
    names of the cases to load (a run's training and validation split)."""
    sources, problems = discover_cases(folder)
    if only is not None:
        sources = [s for s in sources if s.name in only]
    cache = PreprocessCache(cache_folder, config, organs)
    mine = [s for k, s in enumerate(sources) if k % world == rank
            and not (cache.path(s) / "meta.json").is_file()]
    if mine:
        log(f"preprocessing {len(mine)} case(s) into {cache.folder}" + (f" with {workers} processes"
                                                                           if workers > 1 and len(mine) > 1 else ""))
    if workers > 1 and len(mine) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(mine))) as pool:
            list(pool.map(_build_one, [(cache, s) for s in mine]))
    else:
        for source in mine:
            _build_one((cache, source))
    if barrier is not None:
        barrier()
    cases = []
    for source in sources:
        try:
            if not (cache.path(source) / "meta.json").is_file() and cache.error_path(source).is_file():
                raise ValueError(cache.error_path(source).read_text())
            cases.append(cache.get(source))
        except (ImageReadError, ValueError, RuntimeError, OSError) as error:
            problems.append(f"{source.name}: {error}")
    for problem in problems:
        log(f"skipped: {problem}")
    if problems:
        log(f"{len(problems)} problem(s); {len(cases)} case(s) usable")
    return cases, problems


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    """Paper section 4.2: translation within 40 voxels in x and y, rotation
    within 10 degrees, scale 0.7-1.3; applied in-plane to the whole chunk.

    ``mirror`` (not in the paper, 0 there) is the probability of a
    left-right mirror of the chunk with every left organ relabelled as its
    right partner and back (:func:`mirror_chunk`): each paired organ then
    trains both its classes, and which is which is learnt from where it
    lies, not from a side-specific look.

    ``max_tilt_deg`` (not in the paper, 0 there) tilts the chunk out of
    plane: a rotation about the left-right axis (the head nodding) and one
    about the anterior-posterior axis (tipping to a shoulder), each drawn
    within +-max_tilt_deg, in millimetres (the voxels' spacing), about the
    chunk's centre; the slices it needs above and below are read from the
    case, so no organ is cut by the chunk's ends (:func:`tilt_chunk`). The
    in-plane rotation covers the head turned (yaw)."""

    enabled: bool = True
    max_translation: float = 40.0
    max_rotation_deg: float = 10.0
    scale: Tuple[float, float] = (0.7, 1.3)
    mirror: float = 0.0
    max_tilt_deg: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.mirror <= 1.0:
            raise ValueError(f"augment.mirror is a probability between 0 and 1, got {self.mirror}")
        if not 0.0 <= self.max_tilt_deg <= 30.0:
            raise ValueError(f"augment.max_tilt_deg is between 0 and 30 degrees, got {self.max_tilt_deg}")

    def tilt_margin(self, shape_hw: Tuple[int, int], spacing) -> int:
        """Slices a tilted chunk needs beyond its ends: the in-plane
        half-diagonal times the tilt's tangent, in slices."""
        if not self.enabled or self.max_tilt_deg <= 0:
            return 0
        half = math.hypot(shape_hw[0] * spacing[1], shape_hw[1] * spacing[0]) / 2
        return int(math.ceil(half * math.tan(math.radians(self.max_tilt_deg)) / spacing[2])) + 1


def _pad_depth(array: np.ndarray, depth: int, value) -> np.ndarray:
    missing = depth - array.shape[0]
    if missing <= 0:
        return array
    return np.pad(array, [(0, missing), (0, 0), (0, 0)], constant_values=value)


def choose_z(case: CachedCase, depth: int, rng: np.random.Generator, small_labels=None) -> int:
    """Start slice of a crop: uniform, or (``small_labels`` given) such that
    every small organ of the case lies inside with a margin."""
    total = case.depth
    if total <= depth:
        return 0
    if small_labels:
        extents = [case.z_extents[label] for label in small_labels if label in case.z_extents]
        if extents:
            return _start_around(min(e[0] for e in extents), max(e[1] for e in extents), total, depth, rng,
                                 SMALL_ORGAN_Z_MARGIN)
    return int(rng.integers(0, total - depth + 1))


def choose_z_on_organ(case: CachedCase, depth: int, rng: np.random.Generator) -> int:
    """Start slice of a crop that holds one organ, drawn uniformly from the
    organs the case has, whole if it fits (nnU-Net's foreground
    oversampling, by organ): short crops of a tall scan otherwise show the
    rare organs (ears, joints) in few iterations."""
    total = case.depth
    if total <= depth:
        return 0
    organs = sorted(case.z_extents)
    if not organs:
        return int(rng.integers(0, total - depth + 1))
    z_min, z_max = case.z_extents[organs[int(rng.integers(len(organs)))]]
    return _start_around(z_min, z_max, total, depth, rng, 0)


def _start_around(z_min: int, z_max: int, total: int, depth: int, rng: np.random.Generator, margin: int) -> int:
    """A uniform start whose crop holds slices z_min..z_max with ``margin``;
    centred on them when they do not fit."""
    low = max(0, z_max + 1 + margin - depth)
    high = min(total - depth, max(z_min - margin, 0))
    if low <= high:
        return int(rng.integers(low, high + 1))
    return int(np.clip((z_min + z_max + 1 - depth) // 2, 0, total - depth))


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig):
    """Random in-plane affine of a (D, H, W) chunk: image bilinear, labels nearest."""
    import torch
    import torch.nn.functional as F

    if not config.enabled:
        return image, labels
    d, h, w = image.shape
    angle = math.radians(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
    scale = rng.uniform(*config.scale)
    tx, ty = rng.uniform(-config.max_translation, config.max_translation, 2)
    # affine_grid maps output to input coordinates in [-1, 1]; x is W, y is H.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos * 1.0, -sin * h / w, 0.0, 2.0 * tx / w],
                          [sin * w / h, cos * 1.0, 0.0, 2.0 * ty / h],
                          [0.0, 0.0, 1.0, 0.0]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 1, d, h, w), align_corners=False)
    img = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    air = float(image.min())
    out_img = F.grid_sample(img - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
    lab = torch.from_numpy(labels.astype(np.float32))[None, None]
    out_lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_img[0, 0].numpy(), out_lab[0, 0].numpy().astype(np.uint8)


def tilt_chunk(image: np.ndarray, labels: np.ndarray, pitch_deg: float, roll_deg: float, spacing):
    """A (D, H, W) chunk rotated about its centre by ``pitch_deg`` about the
    left-right (x) axis and ``roll_deg`` about the anterior-posterior (y)
    axis, in millimetres (``spacing`` x, y, z): image trilinear, labels
    nearest; what comes from beyond the chunk is air and background."""
    import torch
    import torch.nn.functional as F

    d, h, w = image.shape
    a, b = math.radians(pitch_deg), math.radians(roll_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    half = np.array([w * spacing[0], h * spacing[1], d * spacing[2]]) / 2  # x, y, z half-extents in mm
    rotation = np.diag(1 / half) @ (rx @ ry) @ np.diag(half)  # on affine_grid's [-1, 1] coordinates (x, y, z)
    theta = torch.tensor(np.c_[rotation, np.zeros(3)], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 1, d, h, w), align_corners=False)
    air = float(image.min())
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out_img = F.grid_sample(img - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
    lab = torch.from_numpy(labels.astype(np.float32))[None, None]
    out_lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_img[0, 0].numpy(), out_lab[0, 0].numpy().astype(np.uint8)


def organ_centres(labels: np.ndarray, small_labels) -> List[Optional[np.ndarray]]:
    """Each small organ's centre of mass (z, y, x) in the chunk, None if absent."""
    out = []
    for label in small_labels:
        idx = np.argwhere(labels == label)
        out.append(idx.mean(axis=0) if len(idx) else None)
    return out


def heatmaps(labels: np.ndarray, small_labels, sigma: float = HEATMAP_SIGMA_VOXELS, with_maps: bool = True,
             out: Optional[np.ndarray] = None):
    """Gaussian heat maps (S, D, H, W) at each small organ's centre (zeros
    where an organ is not in the chunk) and the centres (None if absent).
    ``with_maps=False``: the centres only (maps None), for the stages that
    use no heat map. ``out``: a zeroed float32 array to write the maps into
    (a crop worker's shared memory)."""
    maps = (out if out is not None else np.zeros((len(small_labels),) + labels.shape, dtype=np.float32)) \
        if with_maps else None
    centres = []
    grids = [np.arange(n, dtype=np.float32) for n in labels.shape]
    for k, c in enumerate(organ_centres(labels, small_labels)):
        if c is None:
            centres.append(None)
            continue
        centres.append(tuple(int(round(v)) for v in c))
        if with_maps:
            gz, gy, gx = (np.exp(-((g - cv) ** 2) / (2 * sigma ** 2)) for g, cv in zip(grids, c))
            maps[k] = gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return maps, centres


def mirror_chunk(image: np.ndarray, labels: np.ndarray, present: np.ndarray, mirror_labels):
    """A (D, H, W) chunk on the model grid mirrored left-right, with left and
    right organs relabelled (``mirror_labels``: OrganSet.mirror_labels) and
    the present flags swapped alike. The model grid is LPS with an identity
    direction (preprocess), so its last axis runs from the patient's right
    to the left: flipping it puts the left organs where the right ones were."""
    table = np.asarray(mirror_labels)
    return (np.ascontiguousarray(image[..., ::-1]), table[labels[..., ::-1]].astype(labels.dtype),
            present[table])


def sample_chunk(case: CachedCase, depth: int, rng: np.random.Generator, augment_config: AugmentConfig,
                 small_labels=None, around_small: bool = False, organ_fraction: float = 0.0, mirror_labels=None,
                 spacing=(1.0, 1.0, 3.0)):
    """One training chunk: image (D, H, W), labels (D, H, W) and the case's
    present flags (swapped if the chunk was mirrored). Unless the crop is
    around the small organs, a share ``organ_fraction`` of crops is centred
    on an organ (choose_z_on_organ), the rest uniform. ``spacing`` (x, y, z
    mm, the model grid's) is what a tilt rotates in."""
    if not around_small and organ_fraction > 0 and rng.random() < organ_fraction:
        start = choose_z_on_organ(case, depth, rng)
    else:
        start = choose_z(case, depth, rng, small_labels if around_small else None)
    margin = 0
    if augment_config.enabled and augment_config.max_tilt_deg > 0:
        shape = case.meta.get("shape") or case.slab(0, 1)[0].shape  # (D, H, W) either way
        margin = augment_config.tilt_margin(tuple(shape)[1:], spacing)
    first = max(start - margin, 0)
    image, labels = case.slab(first, start + depth + margin)
    before = margin - (start - first)  # slices above the scan's first: air, as beyond its last
    if before:
        image = np.concatenate([np.full((before,) + image.shape[1:], case.fill, np.float32), image])
        labels = np.concatenate([np.zeros((before,) + labels.shape[1:], labels.dtype), labels])
    image = _pad_depth(image, depth + 2 * margin, case.fill)
    labels = _pad_depth(labels, depth + 2 * margin, 0)
    image, labels = augment(image, labels, rng, augment_config)
    present = case.present
    # Drawn last, and only when enabled, so configurations without it sample as before.
    if augment_config.enabled and augment_config.mirror > 0 and rng.random() < augment_config.mirror:
        if mirror_labels is None:
            raise ValueError("augment.mirror needs the organ set's mirror_labels")
        image, labels, present = mirror_chunk(image, labels, present, mirror_labels)
    if margin:  # after every other draw, likewise
        pitch, roll = rng.uniform(-augment_config.max_tilt_deg, augment_config.max_tilt_deg, 2)
        image, labels = tilt_chunk(image, labels, pitch, roll, spacing)
        image, labels = image[margin: margin + depth], labels[margin: margin + depth]
    return image, labels, present
