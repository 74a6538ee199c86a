"""Analytic shapes rendered with partial volume, for the phantom.

Every shape gives an approximate signed distance ``d`` (mm, negative inside)
and the width ``h`` (mm) of a voxel measured along the surface normal. A
voxel's tissue fraction is ``clip(0.5 - d / h, 0, 1)``: the exact box-filter
average of a planar surface crossing the voxel, linearised. That is what
rendering on a finer grid and averaging down converges to, at the cost of
one evaluation per voxel, so a 512 x 512 x 100 case renders in seconds.

Shapes live in world (LPS) millimetres; the grid has identity direction, so
coordinates are separable and each shape is evaluated only inside its own
bounding box.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclass
class RenderGrid:
    origin: np.ndarray  # (3,) x, y, z of voxel (0, 0, 0)
    spacing: np.ndarray  # (3,)
    size: Tuple[int, int, int]  # x, y, z

    def window(self, low: np.ndarray, high: np.ndarray):
        """Index slices (z, y, x) covering the world box [low, high], or None."""
        lo = np.floor((low - self.origin) / self.spacing).astype(int) - 1
        hi = np.ceil((high - self.origin) / self.spacing).astype(int) + 2
        lo = np.clip(lo, 0, self.size)
        hi = np.clip(hi, 0, self.size)
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def coordinates(self, window):
        """Broadcastable world coordinates (z, y, x) of a window."""
        zs, ys, xs = window
        x = self.origin[0] + self.spacing[0] * np.arange(xs.start, xs.stop, dtype=np.float32)
        y = self.origin[1] + self.spacing[1] * np.arange(ys.start, ys.stop, dtype=np.float32)
        z = self.origin[2] + self.spacing[2] * np.arange(zs.start, zs.stop, dtype=np.float32)
        return x[None, None, :], y[None, :, None], z[:, None, None]


def _normal_width(gx, gy, gz, norm, spacing):
    """Voxel width along the normal (g / |g|)."""
    return (np.abs(gx) * spacing[0] + np.abs(gy) * spacing[1] + np.abs(gz) * spacing[2]) / norm


class Shape:
    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def distance(self, x, y, z, spacing):
        """(d, h) arrays broadcast over the coordinates."""
        raise NotImplementedError


class Ellipsoid(Shape):
    """Ellipsoid with axes ``axes`` (3x3, columns = unit axis directions) and
    radii; ``harmonics`` (7 numbers) deform its radius smoothly with
    direction, so every patient's organ has its own shape."""

    def __init__(self, centre, radii, axes=None, harmonics: Optional[Sequence[float]] = None):
        self.centre = np.asarray(centre, dtype=np.float64)
        self.radii = np.asarray(radii, dtype=np.float64)
        self.axes = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
        self.harmonics = None if harmonics is None else np.asarray(harmonics, dtype=np.float64)
        # u = M (p - c) maps the ellipsoid to the unit sphere.
        self.matrix = (self.axes / self.radii).T

    def bounds(self):
        growth = 1.0 + (0.0 if self.harmonics is None else float(np.abs(self.harmonics).sum()))
        extent = np.sqrt(((self.axes * self.radii) ** 2).sum(axis=1)) * growth
        return self.centre - extent, self.centre + extent

    def distance(self, x, y, z, spacing):
        px, py, pz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        m = self.matrix.astype(np.float32)
        u = [m[k, 0] * px + m[k, 1] * py + m[k, 2] * pz for k in range(3)]
        q = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
        # Gradient of q: M^T u / q.
        g = [(m[0, j] * u[0] + m[1, j] * u[1] + m[2, j] * u[2]) for j in range(3)]
        gnorm = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) + 1e-9
        local_radius = q / gnorm  # mm per unit of q along the normal
        if self.harmonics is not None:
            a = self.harmonics
            nx, ny, nz = u[0] / q, u[1] / q, u[2] / q
            factor = 1.0 + (a[0] * nx + a[1] * ny + a[2] * nz + a[3] * nx * ny + a[4] * ny * nz
                            + a[5] * nx * nz + a[6] * (nx * nx - ny * ny))
            q = q / factor
        return (q - 1.0) * local_radius, _normal_width(g[0], g[1], g[2], gnorm, spacing)


class Capsule(Shape):
    """A segment a -> b with radius going linearly from ra to rb (a tube with
    rounded ends). ``wobble`` (amplitude, phase) varies the radius along it."""

    def __init__(self, a, b, ra, rb=None, wobble: Tuple[float, float] = (0.0, 0.0)):
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        self.ra = float(ra)
        self.rb = float(ra if rb is None else rb)
        self.wobble = wobble

    def bounds(self):
        r = max(self.ra, self.rb) * (1.0 + abs(self.wobble[0]))
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r

    def distance(self, x, y, z, spacing):
        ab = (self.b - self.a).astype(np.float32)
        length2 = float(ab @ ab) + 1e-9
        px, py, pz = x - self.a[0], y - self.a[1], z - self.a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / length2, 0.0, 1.0)
        wx, wy, wz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
        dist = np.sqrt(wx * wx + wy * wy + wz * wz) + 1e-6
        radius = self.ra + (self.rb - self.ra) * t
        if self.wobble[0]:
            radius = radius * (1.0 + self.wobble[0] * np.sin(np.pi * t + self.wobble[1]))
        return dist - radius, _normal_width(wx, wy, wz, dist, spacing)


class HalfSpace(Shape):
    """{p : n . (p - p0) < 0}; unbounded, so only used inside Intersection."""

    def __init__(self, point, normal):
        self.point = np.asarray(point, dtype=np.float64)
        n = np.asarray(normal, dtype=np.float64)
        self.normal = n / np.linalg.norm(n)

    def bounds(self):
        return np.full(3, -np.inf), np.full(3, np.inf)

    def distance(self, x, y, z, spacing):
        n = self.normal
        d = n[0] * (x - self.point[0]) + n[1] * (y - self.point[1]) + n[2] * (z - self.point[2])
        h = float(np.abs(n) @ spacing)
        return d, np.full_like(d, h)


class Intersection(Shape):
    """All of ``shapes``; a shape in ``minus`` is cut away."""

    def __init__(self, shapes: Sequence[Shape], minus: Sequence[Shape] = ()):
        self.shapes = list(shapes)
        self.minus = list(minus)

    def bounds(self):
        lows, highs = zip(*(s.bounds() for s in self.shapes))
        return np.max(lows, axis=0), np.min(highs, axis=0)

    def distance(self, x, y, z, spacing):
        d, h = self.shapes[0].distance(x, y, z, spacing)
        parts = [s.distance(x, y, z, spacing) for s in self.shapes[1:]]
        parts += [(-dm, hm) for dm, hm in (s.distance(x, y, z, spacing) for s in self.minus)]
        for di, hi in parts:
            d, h = np.broadcast_arrays(d, h)
            take = di > d
            d = np.where(take, di, d)
            h = np.where(take, hi, h)
        return d, h


class Canvas:
    """An intensity volume and a label volume painted shape by shape (later
    shapes cover earlier ones, like a painter's algorithm)."""

    def __init__(self, grid: RenderGrid, background: float):
        self.grid = grid
        shape = tuple(reversed(grid.size))
        self.image = np.full(shape, background, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def paint(self, shape: Shape, value: float, label: Optional[int] = 0) -> None:
        """Blend ``value`` in by the tissue fraction; voxels whose centre is
        inside take ``label`` (None: leave labels alone)."""
        low, high = shape.bounds()
        window = self.grid.window(low, high)
        if window is None:
            return
        x, y, z = self.grid.coordinates(window)
        d, h = shape.distance(x, y, z, self.grid.spacing.astype(np.float32))
        d, h = np.broadcast_arrays(d, h)
        fraction = np.clip(0.5 - d / np.maximum(h, 1e-3), 0.0, 1.0)
        region = self.image[window]
        region += fraction * (np.float32(value) - region)
        if label is not None:
            self.labels[window][d < 0] = label
