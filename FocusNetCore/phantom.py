"""Synthetic head-and-neck CT phantoms with ground truth for the 22 OARs of
the paper plus the submandibular glands (organ set ``phantom24``).

The anatomy is built from analytic shapes in a head frame (millimetres; x to
the patient's left, y posterior, z superior; origin between the orbits at
the level of the pituitary), then placed in the scanner by a per-patient
transform (scale, rotation, translation, neck flexion) and rendered with
partial volume (see :mod:`FocusNetCore.shapes`), mild blur and noise.

Hounsfield units and sizes follow ../shared/DESIGN.md ("Organ catalogue").
What makes the paper's problem real here: the chiasm sits in the
suprasellar cistern about 15 HU above CSF, the intracranial optic nerves and
the pituitary differ from the brain around them by 5-10 HU, while the
mandible is bone against soft tissue.

``generate_case(seed)`` is deterministic: the same seed gives the same case
bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .organs import ORGAN_SETS
from .shapes import Canvas, Capsule, Ellipsoid, HalfSpace, Intersection, RenderGrid

PHANTOM_SET = ORGAN_SETS["phantom24"]
AIR = -1000.0

# Tissue Hounsfield units (DESIGN "Phantom reference values"); each patient
# gets these jittered by HU_JITTER.
TISSUE_HU = {
    "fat": -90.0, "muscle": 45.0, "cortical": 1500.0, "cancellous": 600.0, "dense_bone": 1700.0,
    "grey": 40.0, "white": 26.0, "csf": 12.0, "vitreous": 10.0, "sclera": 45.0, "lens": 105.0,
    "optic_nerve": 33.0, "chiasm": 30.0, "pituitary": 45.0, "cavernous": 40.0, "brainstem": 33.0,
    "cord": 34.0, "parotid": -4.0, "submand": 50.0, "inner_ear": 15.0, "middle_ear": -900.0,
    "disc": 80.0, "tract": 32.0,
}
HU_JITTER = 4.0
NOISE_HU = (10.0, 30.0)  # the range the noise's standard deviation is drawn from

SIZES = {
    # matrix (x, y), in-plane spacing range, slice thickness range, z range of the scan (head frame)
    "full": dict(matrix=512, spacing=(0.78, 1.25), thickness=(2.5, 3.5), top=(55.0, 125.0), bottom=(-200.0, -135.0)),
    "small": dict(matrix=160, spacing=(1.5, 1.6), thickness=(3.0, 3.0), top=(40.0, 50.0), bottom=(-110.0, -105.0)),
}


@dataclass
class PhantomCase:
    """A generated case: CT (HU) and labels (``phantom24``) on the same grid."""

    name: str
    image: sitk.Image
    labels: sitk.Image
    landmarks: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)  # world mm
    parameters: Dict[str, float] = field(default_factory=dict)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, y, z."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class PatientTransform:
    """Head frame -> scanner (world LPS) for one patient."""

    FLEXION_PIVOT = np.array([0.0, 30.0, -45.0])  # near the atlanto-occipital joint
    FLEXION_RAMP_MM = 60.0

    def __init__(self, scale: float, angles, translation, flexion_deg: float):
        self.scale = float(scale)
        self.rotation = _rotation(*angles)
        self.translation = np.asarray(translation, dtype=float)
        self.flexion_deg = float(flexion_deg)

    def _flex(self, p) -> np.ndarray:
        """Neck flexion: points below the pivot turn about the x axis, more so
        further down (a smooth bend, not a kink)."""
        drop = self.FLEXION_PIVOT[2] - p[2]
        if drop <= 0 or not self.flexion_deg:
            return np.eye(3)
        ramp = min(drop / self.FLEXION_RAMP_MM, 1.0)
        return _rotation(self.flexion_deg * ramp, 0.0, 0.0)

    def point(self, p) -> np.ndarray:
        p = np.asarray(p, dtype=float)
        flexed = self.FLEXION_PIVOT + self._flex(p) @ (p - self.FLEXION_PIVOT)
        return self.translation + self.scale * (self.rotation @ flexed)

    def axes(self, p, local: Optional[np.ndarray] = None) -> np.ndarray:
        local = np.eye(3) if local is None else local
        return self.rotation @ self._flex(np.asarray(p, dtype=float)) @ local


class _Painter:
    """Builds world shapes from head-frame descriptions, with per-organ
    variation drawn from the patient's random generator."""

    def __init__(self, canvas: Canvas, transform: PatientTransform, rng: np.random.Generator, hu):
        self.canvas = canvas
        self.t = transform
        self.rng = rng
        self.hu = hu

    def ellipsoid(self, centre, radii, jitter=0.0, vary=0.0, harmonics=0.0, local=None):
        rng = self.rng
        centre = np.asarray(centre, float) + rng.uniform(-jitter, jitter, 3)
        radii = np.asarray(radii, float) * (1.0 + rng.uniform(-vary, vary, 3))
        coeffs = rng.uniform(-harmonics, harmonics, 7) if harmonics else None
        return Ellipsoid(self.t.point(centre), radii * self.t.scale, self.t.axes(centre, local), coeffs)

    def fixed_ellipsoid(self, centre, radii, local=None):
        return Ellipsoid(self.t.point(centre), np.asarray(radii, float) * self.t.scale, self.t.axes(centre, local))

    def capsule(self, a, b, ra, rb=None, wobble=0.0):
        phase = self.rng.uniform(0, 2 * np.pi) if wobble else 0.0
        return Capsule(self.t.point(a), self.t.point(b), ra * self.t.scale,
                       (ra if rb is None else rb) * self.t.scale, (wobble, phase))

    def half_space(self, point, normal):
        return HalfSpace(self.t.point(point), self.t.axes(point) @ np.asarray(normal, float))

    def paint(self, shape, tissue, label=0):
        value = self.hu[tissue] if isinstance(tissue, str) else float(tissue)
        self.canvas.paint(shape, value, label)

    def chain(self, points, radius, tissue, label=0, wobble=0.0):
        for a, b in zip(points[:-1], points[1:]):
            self.paint(self.capsule(a, b, radius, wobble=wobble), tissue, label)


def _mirror(p, side):
    """Head-frame point on the patient's left (side=+1) or right (side=-1)."""
    return (side * p[0], p[1], p[2])


def _paint_anatomy(p: _Painter, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    L = PHANTOM_SET.label_of
    landmarks = {}

    # --- Body outline: fat under the skin, muscle inside -------------------
    body = [
        ((0, 8, 28), (78, 98, 86)),      # cranium
        ((0, 5, -30), (68, 70, 50)),     # skull base / ears / parotids
        ((0, -28, -35), (64, 58, 62)),   # face
    ]
    neck = [(0, 10, -60), (0, 18, -120), (0, 25, -230)]
    shoulders = ((0, 20, -235), (190, 75, 60))
    for inset, tissue in ((0.0, "fat"), (6.0, "muscle")):
        for centre, radii in body:
            p.paint(p.fixed_ellipsoid(centre, np.subtract(radii, inset)), tissue)
        p.chain(neck, 56 - inset, tissue)
        p.paint(p.fixed_ellipsoid(shoulders[0], np.subtract(shoulders[1], inset)), tissue)

    # --- Skull, CSF and brain ---------------------------------------------
    brain_c, brain_r = np.array([0, 8, 30.0]), np.array([66, 86, 72.0]) * (1 + rng.uniform(-0.03, 0.03, 3))

    def above_base(offset):
        """Above the skull base, a plane lower at the back (posterior fossa)."""
        return p.half_space((0, 0, -26.0 + offset), (0, -0.3, -1))

    for grow, tissue in ((8.0, "cortical"), (6.5, "cancellous"), (3.5, "cortical"), (2.0, "csf")):
        p.paint(Intersection([p.fixed_ellipsoid(brain_c, brain_r + grow), above_base(0.0)]), tissue)
    skull_outer = p.fixed_ellipsoid(brain_c, brain_r + 8.0)
    # Face below the anterior cranial fossa: soft tissue for the orbits,
    # nose and sinuses to be carved into.
    p.paint(Intersection([skull_outer, p.half_space((0, -32, 0), (0, 1, 0)),
                          p.half_space((0, 0, 10), (0, 0, 1))]), "muscle")
    p.paint(Intersection([skull_outer, above_base(0.0)], minus=[above_base(6.0)]), "cortical")  # the floor
    anterior_floor = Intersection([p.half_space((0, -28, 0), (0, 1, 0)), p.half_space((0, 0, 14), (0, 0, 1))])
    brain = p.fixed_ellipsoid(brain_c, brain_r)

    def brain_part(shape):
        return Intersection([shape, brain, above_base(6.0)], minus=[anterior_floor])

    p.paint(brain_part(brain), "grey")
    p.paint(brain_part(p.ellipsoid((0, 10, 40), (48, 66, 48), vary=0.05, harmonics=0.05)), "white")
    for side in (1, -1):
        p.paint(p.ellipsoid((side * 10, 5, 35), (5, 25, 8), vary=0.15), "csf")

    # Skull base bones: sella turcica, sphenoid sinus, petrous bones.
    p.paint(p.fixed_ellipsoid((0, -6, -11), (10, 8.5, 6)), "cortical")
    p.paint(p.fixed_ellipsoid((0, -18, -22), (14, 12, 11)), "cortical")
    p.paint(p.ellipsoid((0, -18, -22), (12, 10, 9), vary=0.1), AIR)
    for side in (1, -1):
        p.paint(p.fixed_ellipsoid(_mirror((36, 14, -10), side), (16, 13, 10)), "dense_bone")

    # Cisterns around the brainstem and the chiasm; the foramen magnum.
    p.chain([(0, 30, -30), (0, 34, -65)], 16, "csf")
    p.chain([(0, 16, 10), (0, 20, -20), (0, 26, -42)], 15, "csf")
    p.paint(p.ellipsoid((0, -12, 6), (20, 14, 8), vary=0.1), "csf")

    # --- Temporal lobes (brain tissue; borders invisible, as in real CT) ---
    for side, name in ((1, "Lobe_Temporal_L"), (-1, "Lobe_Temporal_R")):
        lobe = p.ellipsoid(_mirror((44, 2, -2), side), (20, 36, 22), jitter=2.0, vary=0.06, harmonics=0.06)
        p.paint(brain_part(lobe), 38.0, L(name))

    # --- Brainstem, vertebral column, spinal cord -------------------------
    stem = [(0, 22, 12), (0, 26, -20), (0, 30, -42)]
    stem = [np.add(q, rng.uniform(-1.5, 1.5, 3) * (1, 1, 0)) for q in stem]
    p.chain(stem, 10.5 * (1 + rng.uniform(-0.05, 0.05)), "brainstem", L("Brainstem"), wobble=0.05)
    cord_path = [(0, 30, -42), (0, 34, -70), (0, 38, -110), (0, 40, -150), (0, 42, -235)]
    p.chain([(x, y, z) for x, y, z in cord_path[1:]], 13, "cancellous")  # arches
    for top in np.arange(-58.0, -240.0, -21.0):  # vertebral bodies with discs below
        y = np.interp(-top, [-c[2] for c in cord_path], [c[1] for c in cord_path]) - 22
        p.paint(p.fixed_ellipsoid((0, y, top - 8), (14, 11, 8)), "cortical")
        p.paint(p.fixed_ellipsoid((0, y, top - 8), (12, 9, 6.5)), "cancellous")
        p.paint(p.fixed_ellipsoid((0, y, top - 18.5), (12, 9.5, 2.5)), "disc")
    p.chain([(x, y, z) for x, y, z in cord_path[1:]], 8.5, "csf")
    p.chain(cord_path, 5.6 * (1 + rng.uniform(-0.05, 0.05)), "cord", L("SpinalCord"), wobble=0.05)

    # --- Orbits, eyes, lenses ---------------------------------------------
    for side, sfx in ((1, "_L"), (-1, "_R")):
        eye_c = np.add(_mirror((31, -60, 0), side), rng.uniform(-1.5, 1.5, 3))
        apex = _mirror((15, -30, 0), side)
        p.paint(p.capsule(eye_c, apex, 19, 6), "cortical")
        p.paint(p.capsule(eye_c, apex, 17, 4), "fat")
        radius = 12.0 * (1 + rng.uniform(-0.05, 0.05))
        p.paint(p.ellipsoid(eye_c, (radius,) * 3, harmonics=0.03), "sclera", L("Eye" + sfx))
        p.paint(p.fixed_ellipsoid(eye_c, (radius - 1.2,) * 3), "vitreous", None)
        lens_c = np.add(eye_c, (0, -(radius - 3.0), 0))
        p.paint(p.ellipsoid(lens_c, (4.8, 2.1, 4.8), jitter=0.3, vary=0.08), "lens", L("Lens" + sfx))
        landmarks["eye" + sfx] = eye_c

    # --- Visual pathway: optic nerves, chiasm (X-shaped), tracts -----------
    chiasm_c = np.array([0, -10, 5.5]) + rng.uniform(-1.5, 1.5, 3)
    front = [chiasm_c + (side * 7.5, -7, -1.5) for side in (1, -1)]
    back = [chiasm_c + (side * 7.5, 7, 1.5) for side in (1, -1)]
    for side, sfx, start in ((1, "_L", front[0]), (-1, "_R", front[1])):
        eye_back = np.add(landmarks["eye" + sfx], (-side * 4, 11.5, 0))
        p.paint(p.capsule(back[0 if side == 1 else 1], np.add(back[0 if side == 1 else 1], (side * 12, 16, -3)), 2.0),
                "tract", None)
        p.paint(p.capsule(eye_back, start, 2.6 * (1 + rng.uniform(-0.08, 0.08)), wobble=0.08),
                "optic_nerve", L("OpticNrv" + sfx))
    for a, b in ((front[0], back[1]), (front[1], back[0])):
        p.paint(p.capsule(a, b, 2.1), "chiasm", L("OpticChiasm"))
    landmarks["chiasm"] = chiasm_c

    # --- Pituitary in the sella, cavernous sinuses beside it ---------------
    for side in (1, -1):
        p.paint(p.ellipsoid((side * 9, -6, -5), (4, 7, 5)), "cavernous")
    pit_c = np.array([0, -6, -7.0]) + rng.uniform(-1.0, 1.0, 3)
    p.paint(p.ellipsoid(pit_c, (6, 4.5, 3.2), vary=0.1, harmonics=0.05), "pituitary", L("Pituitary"))
    landmarks["pituitary"] = pit_c

    # --- Ears --------------------------------------------------------------
    for side, sfx in ((1, "_L"), (-1, "_R")):
        p.paint(p.ellipsoid(_mirror((30, 10, -10), side), (4, 3.5, 3), jitter=0.5, vary=0.08),
                "inner_ear", L("Ear_Internal" + sfx))
        p.paint(p.ellipsoid(_mirror((35, 15, -9), side), (2.5, 2.5, 2.5), jitter=0.3), "inner_ear",
                L("Ear_Internal" + sfx))
        middle = np.add(_mirror((43, 10, -10), side), rng.uniform(-0.8, 0.8, 3))
        p.paint(p.ellipsoid(middle, (4.5, 7, 7.5), vary=0.1, harmonics=0.05), "middle_ear", L("Ear_Middle" + sfx))
        p.paint(p.fixed_ellipsoid(np.add(middle, (0, 0, 2)), (1.5, 1.5, 1.5)), 600.0, L("Ear_Middle" + sfx))
        p.paint(p.capsule(_mirror((50, 10, -10), side), _mirror((72, 10, -12), side), 4), AIR)

    # --- Parotids, mandible (halves), TMJ condyles, submandibular glands ---
    for side, sfx in ((1, "_L"), (-1, "_R")):
        p.paint(p.ellipsoid(_mirror((49, 14, -48), side), (13, 19, 24), jitter=1.5, vary=0.08, harmonics=0.08),
                p.hu["parotid"] + rng.normal(0, 8), L("Parotid" + sfx))
    jaw = [(47, -3, -41), (46, 2, -64), (40, -28, -70), (22, -58, -74), (0, -70, -76)]
    jaw = [np.add(q, rng.uniform(-1.5, 1.5, 3)) for q in jaw]
    mandible_shapes = []
    for side in (1, -1):
        pts = [_mirror(q, side) for q in jaw]
        for k, (a, b) in enumerate(zip(pts[:-1], pts[1:])):
            if k == 0:  # ramus: a plate, two rods side by side
                offsets = [(0, -5, 0), (0, 5, 0)]
                radius = 4.5
            else:  # body: taller than wide
                offsets = [(0, 0, 0), (0, 0, -10)]
                radius = 6.0
            for off in offsets:
                mandible_shapes.append((np.add(a, off), np.add(b, off), radius))
    for tissue, shrink in (("cortical", 0.0), ("cancellous", 2.5)):
        for a, b, r in mandible_shapes:
            p.paint(p.capsule(a, b, r - shrink), tissue, L("Bone_Mandible_L"))
    for side, sfx in ((1, "_L"), (-1, "_R")):
        # The condyle sits below the skull base with a joint space of a few mm.
        condyle = np.add(_mirror((47, -4, -37), side), rng.uniform(-0.8, 0.8, 3))
        p.paint(p.ellipsoid(condyle, (9, 4.5, 5), vary=0.08), "cortical", L("Joint_TM" + sfx))
        p.paint(p.fixed_ellipsoid(condyle, (7, 3, 3.5)), "cancellous", None)
        p.paint(p.capsule(condyle - (0, 0, 3), _mirror(jaw[0], side), 3.5),
                "cortical", L("Bone_Mandible_L"))
        p.paint(p.ellipsoid(_mirror((28, -20, -92), side), (11, 13, 9.5), jitter=1.5, vary=0.08, harmonics=0.06),
                "submand", L("Glnd_Submand" + sfx))

    # --- Airway and sinuses -----------------------------------------------
    p.chain([(0, -30, -25), (0, -10, -35), (0, -10, -70), (0, -12, -120), (0, -10, -235)], 8, AIR)
    p.paint(p.ellipsoid((0, -55, -18), (9, 26, 14), vary=0.1), AIR)
    for side in (1, -1):
        p.paint(p.ellipsoid(_mirror((24, -50, -28), side), (14, 16, 17)), "cortical")
        p.paint(p.ellipsoid(_mirror((24, -50, -28), side), (12, 14, 15), vary=0.1), AIR)
    return landmarks


def _sample(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = lo_hi
    return float(lo if lo == hi else rng.uniform(lo, hi))


@dataclass
class Variation:
    """How a scan differs from the default phantoms, as scans do between
    departments (issue 48). Each field left None keeps the patient's own
    draw, so the same seed gives the same patient with only what is named
    changed; the truth is painted with the image, so it follows exactly.

    - ``pose``: the head's (yaw, pitch, roll) in degrees, about the
      superior, left-right and anterior-posterior axes (default draws lie
      within +-4);
    - ``slice_mm``: slice thickness and spacing (default 2.5-3.5 mm);
    - ``pixel_mm``: in-plane pixel size (default 0.78-1.25 mm);
    - ``metal``: dental fillings (3000 HU spheres on the mandible's alveolar
      ridge) with streak artefacts. An analytic streak model, not a forward
      projection: in the slices through the fillings, radial streaks around
      each filling (alternating +-HU, fading with distance) and a dark band
      along the line between each pair, as filtered back projection gives
      for metal;
    - ``z_range``: the scan's bottom and top (head-frame mm: 0 at the eyes'
      level, the vertex near +90, the shoulders near -200);
    - ``fov_mm``: the reconstructed field of view's width: the image is cut
      to it left-right (a truncated scan), and so is the truth.
    Noise: ``generate_case(noise=(sd, sd))``."""

    pose: Optional[Tuple[float, float, float]] = None
    slice_mm: Optional[float] = None
    pixel_mm: Optional[float] = None
    metal: bool = False
    z_range: Optional[Tuple[float, float]] = None
    fov_mm: Optional[float] = None

    def check(self) -> "Variation":
        if self.pose is not None and (len(self.pose) != 3 or not all(abs(float(a)) <= 30 for a in self.pose)):
            raise ValueError(f"pose {self.pose!r}: expected yaw, pitch, roll within +-30 degrees")
        for what, value, lo, hi in (("slice thickness", self.slice_mm, 0.5, 10.0),
                                    ("pixel size", self.pixel_mm, 0.3, 2.0), ("field of view", self.fov_mm, 100, 600)):
            if value is not None and not lo <= float(value) <= hi:
                raise ValueError(f"{what} {value} mm: expected {lo:g}-{hi:g} mm")
        if self.z_range is not None and not float(self.z_range[0]) < float(self.z_range[1]):
            raise ValueError(f"scan range {self.z_range!r}: expected bottom < top (head-frame mm)")
        return self

    @classmethod
    def random(cls, seed: int) -> "Variation":
        """The ranges of issue 48, drawn per case (its own generator: the
        patient drawn from ``seed`` is unchanged)."""
        rng = np.random.default_rng([seed, 48])
        bottom = float(rng.uniform(-200.0, -60.0))
        top = float(rng.uniform(max(bottom + 80.0, 0.0), 125.0))
        return cls(pose=tuple(float(a) for a in rng.uniform(-15.0, 15.0, 3)),
                   slice_mm=round(float(rng.uniform(1.0, 5.0)), 1), pixel_mm=round(float(rng.uniform(0.5, 1.2)), 3),
                   metal=bool(rng.random() < 0.3), z_range=(bottom, top),
                   fov_mm=None if rng.random() < 0.7 else float(rng.uniform(200.0, 260.0)))


def _add_metal(array: np.ndarray, labels: np.ndarray, spacing, rng: np.random.Generator) -> List[Tuple[int, ...]]:
    """Fillings and their streaks (Variation.metal) on the image array
    (z, y, x, HU), in place; the fillings' voxel centres."""
    mandible = np.isin(labels, [PHANTOM_SET.label_of("Bone_Mandible_L"), PHANTOM_SET.label_of("Bone_Mandible_R")])
    where = np.argwhere(mandible)
    if not len(where):
        return []
    # The mandible's body (its anterior part: LPS y grows posterior; its top is the condyles, behind),
    # and the body's top: the alveolar ridge, where the teeth are; fillings across it, left to right.
    body = where[where[:, 1] <= np.percentile(where[:, 1], 35)]
    ridge = body[body[:, 0] >= body[:, 0].max() - 1]
    ridge = ridge[np.argsort(ridge[:, 2])]
    picks = ridge[[int(q * (len(ridge) - 1)) for q in sorted(rng.uniform([0.05, 0.4, 0.75], [0.25, 0.6, 0.95]))]]
    sz, sy, sx = spacing[2], spacing[1], spacing[0]
    z, y, x = np.ogrid[: array.shape[0], : array.shape[1], : array.shape[2]]
    radius = 3.0
    for k, j, i in picks:
        array[((z - k) * sz) ** 2 + ((y - j) * sy) ** 2 + ((x - i) * sx) ** 2 <= radius ** 2] = 3000.0
    yy, xx = np.mgrid[: array.shape[1], : array.shape[2]]
    for k in sorted({int(p[0]) for p in picks}):
        for dk in range(-int(np.ceil(5.0 / sz)), int(np.ceil(5.0 / sz)) + 1):
            if not 0 <= k + dk < array.shape[0]:
                continue
            fade = np.exp(-abs(dk) * sz / 5.0)
            streak = np.zeros(yy.shape, np.float32)
            for _, j, i in picks:
                dy, dx = (yy - j) * sy, (xx - i) * sx
                r = np.hypot(dy, dx)
                theta = np.arctan2(dy, dx)
                streak += 400.0 * np.cos(14.0 * theta + 0.7) * np.exp(-r / 60.0) * (1.0 - np.exp(-r / 4.0))
            for a in range(len(picks)):
                for b in range(a + 1, len(picks)):
                    (_, j0, i0), (_, j1, i1) = picks[a], picks[b]
                    p0, p1 = np.array([j0 * sy, i0 * sx]), np.array([j1 * sy, i1 * sx])
                    d = p1 - p0
                    t = np.clip(((yy * sy - p0[0]) * d[0] + (xx * sx - p0[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
                    dist = np.hypot(yy * sy - (p0[0] + t * d[0]), xx * sx - (p0[1] + t * d[1]))
                    streak -= 500.0 * np.exp(-(dist / 4.0) ** 2)
            tissue = (array[k + dk] > -900) & (array[k + dk] < 2900)  # not the air, not the fillings
            array[k + dk] += fade * streak * tissue
    return [tuple(int(v) for v in p) for p in picks]


def generate_case(seed: int, size: str = "full", name: Optional[str] = None,
                  z_range: Optional[Tuple[float, float]] = None,
                  noise: Tuple[float, float] = NOISE_HU, variation: Optional[Variation] = None) -> PhantomCase:
    """One synthetic patient. ``z_range`` (head-frame mm, bottom and top)
    overrides the scan's extent, e.g. to make a scan that stops below the eyes.
    ``noise`` is the range (HU) the noise's standard deviation is drawn from;
    another range draws the same patient (anatomy, HU, pose) with only the
    noise's level changed, e.g. noisier scans to train on. ``variation``
    changes the pose, slices, pixels, metal and field of view (Variation)."""
    variation = (variation or Variation()).check()
    z_range = variation.z_range or z_range
    lo, hi = noise
    if not 0.0 <= lo <= hi:
        raise ValueError(f"noise range {noise!r}: expected 0 <= low <= high (HU)")
    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; choose one of {sorted(SIZES)}")
    setting = SIZES[size]
    rng = np.random.default_rng(seed)
    hu = {k: v + rng.normal(0.0, HU_JITTER) for k, v in TISSUE_HU.items()}
    scale = rng.uniform(0.9, 1.1)
    angles = rng.uniform(-4.0, 4.0, 3)
    if variation.pose is not None:  # (yaw, pitch, roll) -> rotations about x (pitch), y (roll), z (yaw)
        yaw, pitch, roll = (float(a) for a in variation.pose)
        angles = np.array([pitch, roll, yaw])
    shift = np.r_[rng.uniform(-15.0, 15.0, 2), 0.0]
    flexion = rng.uniform(-12.0, 12.0)
    transform = PatientTransform(scale, angles, shift, flexion)

    spacing_xy = round(_sample(rng, setting["spacing"]), 3)
    thickness = round(_sample(rng, setting["thickness"]), 1)
    bottom, top = z_range or (_sample(rng, setting["bottom"]), _sample(rng, setting["top"]))
    matrix = setting["matrix"]
    if variation.pixel_mm is not None:  # the same field of view in pixels of this size
        matrix = int(round(matrix * spacing_xy / float(variation.pixel_mm)))
        spacing_xy = float(variation.pixel_mm)
    if variation.slice_mm is not None:
        thickness = float(variation.slice_mm)
    nz = int(round((top - bottom) * scale / thickness)) + 1
    origin = np.array([-(matrix - 1) / 2 * spacing_xy, -(matrix - 1) / 2 * spacing_xy,
                       shift[2] + bottom * scale])
    grid = RenderGrid(origin, np.array([spacing_xy, spacing_xy, thickness]), (matrix, matrix, nz))

    canvas = Canvas(grid, AIR)
    painter = _Painter(canvas, transform, rng, hu)
    landmarks = _paint_anatomy(painter, rng)
    # The mandible was painted as one bone; its halves are the patient's
    # left (+x in the head frame) and right.
    _split_mandible(canvas, transform)

    noise_sigma = rng.uniform(lo, hi)
    blur_mm = rng.uniform(0.4, 0.8)
    image = sitk.GetImageFromArray(canvas.image)
    image.SetOrigin(tuple(grid.origin))
    image.SetSpacing(tuple(float(s) for s in grid.spacing))
    image = sitk.SmoothingRecursiveGaussian(image, [blur_mm, blur_mm, blur_mm * 0.5])
    array = sitk.GetArrayFromImage(image)
    fillings = _add_metal(array, canvas.labels, grid.spacing, np.random.default_rng([seed, 49])) \
        if variation.metal else []
    array += rng.standard_normal(array.shape, dtype=np.float32) * np.float32(noise_sigma)
    ct = sitk.GetImageFromArray(np.clip(np.round(array), -1024, 3071).astype(np.int16))
    ct.CopyInformation(image)
    labels = sitk.GetImageFromArray(canvas.labels)
    labels.CopyInformation(image)
    if variation.fov_mm is not None:  # a truncated scan: image and truth cut left-right alike
        keep = min(matrix, int(round(float(variation.fov_mm) / spacing_xy)))
        first = (matrix - keep) // 2
        ct, labels = ct[first: first + keep, :, :], labels[first: first + keep, :, :]
    params = dict(seed=seed, scale=scale, yaw=float(angles[2]), pitch=float(angles[0]), roll=float(angles[1]),
                  flexion=flexion, noise_sigma=noise_sigma, blur_mm=blur_mm, spacing_xy=spacing_xy,
                  thickness=thickness, z_bottom=bottom, z_top=top, metal_fillings=len(fillings),
                  fov_mm=float(variation.fov_mm or matrix * spacing_xy),
                  **{f"hu_{tissue}": float(value) for tissue, value in hu.items()})
    world = {k: tuple(float(v) for v in transform.point(c)) for k, c in landmarks.items()}
    return PhantomCase(name or f"phantom_{seed:04d}", ct, labels, world, params)


def _split_mandible(canvas: Canvas, transform: PatientTransform) -> None:
    """Voxels labelled Bone_Mandible_L on the patient's right become _R: the
    midsagittal plane of the head, carried into the scanner."""
    left, right = PHANTOM_SET.label_of("Bone_Mandible_L"), PHANTOM_SET.label_of("Bone_Mandible_R")
    idx = np.argwhere(canvas.labels == left)
    if not len(idx):
        return
    world = canvas.grid.origin + idx[:, ::-1] * canvas.grid.spacing
    head_x = ((world - transform.translation) @ transform.rotation)[:, 0]
    right_side = idx[head_x < 0]
    canvas.labels[tuple(right_side.T)] = right


# --------------------------------------------------------------------------
# Writing cases in the formats users have
# --------------------------------------------------------------------------

FORMATS = ("nrrd", "nifti", "pddca", "nnunet", "dicom")


def label_table(organ_set=PHANTOM_SET) -> dict:
    return {"organ_set": organ_set.key,
            "labels": {name: organ_set.label_of(name) for name in organ_set.names}}


def write_case(case: PhantomCase, out, fmt: str, overwrite: bool = False) -> list:
    """Write one case in ``fmt``; returns the paths written."""
    import json
    from pathlib import Path

    from .dicom import write_ct_series
    from .imageio import OutputExistsError, atomic_output, write_image
    from .organs import ORGAN_SETS, PDDCA_FILE_NAMES, convert_labels

    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown phantom format {fmt!r}; choose one of {', '.join(FORMATS)}")
    written = []
    if fmt in ("nrrd", "nifti"):
        suffix = ".nrrd" if fmt == "nrrd" else ".nii.gz"
        written.append(write_image(case.image, out / f"{case.name}_ct{suffix}", overwrite))
        written.append(write_image(case.labels, out / f"{case.name}_labels{suffix}", overwrite))
    elif fmt == "pddca":
        folder = out / case.name
        written.append(write_image(case.image, folder / "img.nrrd", overwrite))
        pddca = ORGAN_SETS["pddca9"]
        labels, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, pddca)
        for name in pddca.names:
            mask = sitk.GetImageFromArray((labels == pddca.label_of(name)).astype(np.uint8))
            mask.CopyInformation(case.image)
            written.append(write_image(mask, folder / "structures" / f"{PDDCA_FILE_NAMES[name]}.nrrd", overwrite))
    elif fmt == "nnunet":
        written.append(write_image(case.image, out / "imagesTr" / f"{case.name}_0000.nii.gz", overwrite))
        written.append(write_image(case.labels, out / "labelsTr" / f"{case.name}.nii.gz", overwrite))
        dataset = {"channel_names": {"0": "CT"},
                   "labels": {"background": 0, **label_table()["labels"]},
                   "numTraining": len(list((out / "labelsTr").glob("*.nii.gz"))),
                   "file_ending": ".nii.gz", "name": "FocusNetPhantom",
                   "description": "FocusNet synthetic head-and-neck CT phantoms; not patient data"}
        with atomic_output(out / "dataset.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(dataset, indent=2))
        written.append(out / "dataset.json")
    else:  # dicom
        folder = out / case.name / "CT"
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise OutputExistsError(folder)
        from .rtstruct import write_rtstruct

        write_ct_series(case.image, folder, patient_id=case.name, patient_name=f"Phantom^{case.name}")
        written.append(folder)
        written.append(write_image(case.labels, out / case.name / "labels.nrrd", overwrite))
        written.append(write_rtstruct(case.labels, folder, PHANTOM_SET, out / case.name / "RTSTRUCT" / "rtstruct.dcm",
                                      overwrite, label="GroundTruth", series_description="Phantom ground truth"))
    if fmt in ("nrrd", "nifti", "dicom"):
        with atomic_output(out / "labels.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(label_table(), indent=2))
    return written


def with_body_below(image: sitk.Image, slices: int, neck_slices: int) -> sitk.Image:
    """The scan going on ``slices`` slices further down (LPS order, geometry
    kept): first ``neck_slices`` of neck (its lowest slice repeated), then
    thorax (a wide body, two lungs, a vertebra), in the scan's own pixel type
    (int16 for the phantoms, as scanners write CT). For tests and benchmarks
    of scans longer than the head-and-neck band."""
    image = sitk.DICOMOrient(image, "LPS")
    pixel = sitk.GetArrayViewFromImage(image).dtype
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    _, h, w = array.shape
    y, x = np.indices((h, w))
    thorax = np.full((h, w), -1000.0, np.float32)
    thorax[((x - w / 2) / (0.46 * w)) ** 2 + ((y - h / 2) / (0.33 * h)) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        thorax[((x - w / 2 - side * 0.2 * w) / (0.14 * w)) ** 2 + ((y - h / 2) / (0.2 * h)) ** 2 <= 1] = -800.0
    thorax[((x - w / 2) / (0.04 * w)) ** 2 + ((y - h / 2 - 0.22 * h) / (0.04 * h)) ** 2 <= 1] = 700.0
    neck = min(neck_slices, slices)
    below = np.concatenate([np.repeat(thorax[None], slices - neck, axis=0), np.repeat(array[:1], neck, axis=0)])
    longer = sitk.GetImageFromArray(np.concatenate([below, array]).astype(pixel))
    longer.SetSpacing(image.GetSpacing())
    longer.SetDirection(image.GetDirection())
    longer.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, -slices)))
    return longer
