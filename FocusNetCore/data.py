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


@dataclass
class CachedCase:
    name: str
    image: np.ndarray  # (D, H, W) float32, normalised, model grid
    labels: np.ndarray  # (D, H, W) uint8
    present: np.ndarray  # (C,) bool

    @cached_property
    def z_extents(self) -> Dict[int, Tuple[int, int]]:
        """First and last slice of each label the case has (one pass over
        the labels, then kept: crop sampling asks for them every iteration)."""
        return {label: (box[0].start, box[0].stop - 1)
                for label, box in enumerate(ndimage.find_objects(self.labels), start=1) if box is not None}


class PreprocessCache:
    """Each scan is resampled to the model grid once; the result is kept as
    ``<cache>/<case>-<key>.npz`` where the key covers the files and settings."""

    def __init__(self, folder, config: PreprocessConfig, organs: OrganSet):
        self.folder = Path(folder)
        self.config = config
        self.organs = organs

    def key(self, source: CaseSource) -> str:
        settings = json.dumps([self.config.to_dict(), self.organs.key, self.organs.names], sort_keys=True)
        return hashlib.sha1((source.fingerprint() + settings).encode()).hexdigest()[:16]

    def get(self, source: CaseSource) -> CachedCase:
        path = self.folder / f"{source.name}-{self.key(source)}.npz"
        if path.is_file():
            data = np.load(path)
            return CachedCase(source.name, data["image"].astype(np.float32), data["labels"], data["present"])
        image, labels, present = load_case(source, self.organs)
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        pre = preprocess(image, self.config)
        model_labels = labels_to_model_grid(label_image, pre.grid)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, image=pre.image.astype(np.float16), labels=model_labels, present=present)
        tmp.replace(path)
        return CachedCase(source.name, pre.image.astype(np.float16).astype(np.float32), model_labels, present)


def load_training_cases(folder, cache_folder, config: PreprocessConfig, organs: OrganSet, log=print):
    """All usable cases, preprocessed; malformed ones are reported by name and skipped."""
    sources, problems = discover_cases(folder)
    cache = PreprocessCache(cache_folder, config, organs)
    cases = []
    for source in sources:
        try:
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
    lies, not from a side-specific look."""

    enabled: bool = True
    max_translation: float = 40.0
    max_rotation_deg: float = 10.0
    scale: Tuple[float, float] = (0.7, 1.3)
    mirror: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.mirror <= 1.0:
            raise ValueError(f"augment.mirror is a probability between 0 and 1, got {self.mirror}")


def _pad_depth(array: np.ndarray, depth: int, value) -> np.ndarray:
    missing = depth - array.shape[0]
    if missing <= 0:
        return array
    return np.pad(array, [(0, missing), (0, 0), (0, 0)], constant_values=value)


def choose_z(case: CachedCase, depth: int, rng: np.random.Generator, small_labels=None) -> int:
    """Start slice of a crop: uniform, or (``small_labels`` given) such that
    every small organ of the case lies inside with a margin."""
    total = case.image.shape[0]
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
    total = case.image.shape[0]
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


def heatmaps(labels: np.ndarray, small_labels, sigma: float = HEATMAP_SIGMA_VOXELS):
    """Gaussian heat maps (S, D, H, W) at each small organ's centre (zeros
    where an organ is not in the chunk) and the centres (None if absent)."""
    maps = np.zeros((len(small_labels),) + labels.shape, dtype=np.float32)
    centres = []
    grids = [np.arange(n, dtype=np.float32) for n in labels.shape]
    for k, label in enumerate(small_labels):
        idx = np.argwhere(labels == label)
        if not len(idx):
            centres.append(None)
            continue
        c = idx.mean(axis=0)
        centres.append(tuple(int(round(v)) for v in c))
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
                 small_labels=None, around_small: bool = False, organ_fraction: float = 0.0, mirror_labels=None):
    """One training chunk: image (D, H, W), labels (D, H, W) and the case's
    present flags (swapped if the chunk was mirrored). Unless the crop is
    around the small organs, a share ``organ_fraction`` of crops is centred
    on an organ (choose_z_on_organ), the rest uniform."""
    if not around_small and organ_fraction > 0 and rng.random() < organ_fraction:
        start = choose_z_on_organ(case, depth, rng)
    else:
        start = choose_z(case, depth, rng, small_labels if around_small else None)
    image = _pad_depth(case.image[start:start + depth], depth, float(case.image.min()))
    labels = _pad_depth(case.labels[start:start + depth], depth, 0)
    image, labels = augment(image, labels, rng, augment_config)
    present = case.present
    # Drawn last, and only when enabled, so configurations without it sample as before.
    if augment_config.enabled and augment_config.mirror > 0 and rng.random() < augment_config.mirror:
        if mirror_labels is None:
            raise ValueError("augment.mirror needs the organ set's mirror_labels")
        image, labels, present = mirror_chunk(image, labels, present, mirror_labels)
    return image, labels, present
