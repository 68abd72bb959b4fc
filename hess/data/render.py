"""Analytic ray casting of textured primitives (``evaluation.md`` §5.2-5.3). Pure numpy, float64.

Primitives are rectangles (finite planes), oriented boxes and spheres. Colour is a *solid* texture of
the 3-D hit point (hashed cells of a rotated lattice, two octaves) times fixed Lambertian shading
``ambient + diffuse·|n·l|``, so a surface point has the same colour in every view: correspondences
between frames are exact. Rays are ``d = Rᵀ K⁻¹ [u, v, 1]ᵀ`` at integer pixel centres, so the ray
parameter of the nearest hit *is* the z-depth.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_NEAR = 1e-6   # smallest accepted ray parameter


@dataclass
class Material:
    """Solid texture: an 8-colour palette indexed by a hash of the lattice cell of ``rot·p·freq``."""

    palette: np.ndarray          # [8, 3] in [0, 1]
    freq: float                  # cells per world unit
    rot: np.ndarray              # [3, 3] lattice rotation
    seed: int                    # hash salt

    def color(self, p: np.ndarray) -> np.ndarray:
        """p: [N, 3] world points -> [N, 3] albedo in [0, 1]."""
        q = p @ (self.rot.T * self.freq)
        coarse = _hash3(np.floor(q).astype(np.int64), self.seed)
        fine = _hash3(np.floor(q * 2.37 + 0.5).astype(np.int64), self.seed + 1)
        base = self.palette[(coarse & np.uint64(7)).astype(np.intp)]
        jitter = 0.8 + 0.4 * ((fine >> np.uint64(11)) & np.uint64(1023)).astype(np.float64) / 1023.0
        return np.clip(base * jitter[:, None], 0.0, 1.0)


def _hash3(cell: np.ndarray, seed: int) -> np.ndarray:
    """cell: [N, 3] int64 -> [N] uint64, a SplitMix-style mix of the three coordinates and a salt."""
    c = cell.astype(np.uint64)
    h = (c[:, 0] * np.uint64(0x9E3779B185EBCA87)) ^ (c[:, 1] * np.uint64(0xC2B2AE3D27D4EB4F)) \
        ^ (c[:, 2] * np.uint64(0x165667B19E3779F9)) ^ np.uint64(seed & 0xFFFFFFFF)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(32))


def _dot(v: np.ndarray, dT: np.ndarray) -> np.ndarray:
    """v: [3] or [3, N] · dT: [3, N] -> [N] (column-wise, which is much faster than [N, 3] reductions)."""
    return v[0] * dT[0] + v[1] * dT[1] + v[2] * dT[2]


# Every ``intersect(o, dT)`` takes origins o: [3] (one camera) or [3, N] and directions dT: [3, N], and
# returns the ray parameter t [N] of the nearest hit with t > _NEAR (inf on a miss).
@dataclass
class Sphere:
    center: np.ndarray           # [3]
    radius: float
    material: Material

    def intersect(self, o: np.ndarray, dT: np.ndarray) -> np.ndarray:
        oc = o - (self.center if o.ndim == 1 else self.center[:, None])
        a = _dot(dT, dT)
        b = _dot(oc, dT)
        c = _dot(oc, oc) - self.radius ** 2
        disc = b * b - a * c
        hit = disc >= 0
        root = np.sqrt(np.where(hit, disc, 0.0))
        t0, t1 = (-b - root) / a, (-b + root) / a
        t = np.where(t0 > _NEAR, t0, t1)
        return np.where(hit & (t > _NEAR), t, np.inf)

    def normal(self, p: np.ndarray) -> np.ndarray:
        n = p - self.center
        return n / np.linalg.norm(n, axis=-1, keepdims=True)


@dataclass
class Box:
    center: np.ndarray           # [3]
    half: np.ndarray             # [3] half extents along the box axes
    rot: np.ndarray              # [3, 3] columns = box axes in world
    material: Material

    def intersect(self, o: np.ndarray, dT: np.ndarray) -> np.ndarray:
        ol = self.rot.T @ (o - (self.center if o.ndim == 1 else self.center[:, None]))   # box frame
        dl = self.rot.T @ dT                                                             # [3, N]
        t_near, t_far = np.full(dT.shape[1], -np.inf), np.full(dT.shape[1], np.inf)
        for k in range(3):
            dk = np.where(np.abs(dl[k]) < 1e-12, 1e-12, dl[k])
            t1, t2 = (-self.half[k] - ol[k]) / dk, (self.half[k] - ol[k]) / dk
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
        t = np.where(t_near > _NEAR, t_near, t_far)
        return np.where((t_far >= t_near) & (t > _NEAR), t, np.inf)

    def normal(self, p: np.ndarray) -> np.ndarray:
        q = ((p - self.center) @ self.rot) / self.half                       # in [-1, 1]³ on the surface
        axis = np.abs(q).argmax(-1)
        n = np.zeros_like(q)
        n[np.arange(len(q)), axis] = np.sign(q[np.arange(len(q)), axis])
        return n @ self.rot.T


@dataclass
class Rect:
    center: np.ndarray           # [3]
    axes: np.ndarray             # [3, 3] rows: in-plane u, in-plane v, normal
    half: np.ndarray             # [2] half extents along u and v
    material: Material

    def intersect(self, o: np.ndarray, dT: np.ndarray) -> np.ndarray:
        oc = o - (self.center if o.ndim == 1 else self.center[:, None])
        denom = _dot(self.axes[2], dT)
        denom = np.where(np.abs(denom) < 1e-12, 1e-12, denom)
        t = -_dot(self.axes[2], oc) / denom if o.ndim > 1 else -(self.axes[2] @ oc) / denom
        pu = (_dot(self.axes[0], oc) if o.ndim > 1 else self.axes[0] @ oc) + t * _dot(self.axes[0], dT)
        pv = (_dot(self.axes[1], oc) if o.ndim > 1 else self.axes[1] @ oc) + t * _dot(self.axes[1], dT)
        inside = (np.abs(pu) <= self.half[0]) & (np.abs(pv) <= self.half[1])
        return np.where(inside & (t > _NEAR), t, np.inf)

    def normal(self, p: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.axes[2], p.shape).copy()


Primitive = Sphere | Box | Rect


@dataclass
class Geometry:
    """A scene's primitives plus its light; everything the renderer and exact visibility need."""

    primitives: list[Primitive]
    light: np.ndarray = field(default_factory=lambda: np.array([0.3, -0.4, 0.87]))   # unit direction
    ambient: float = 0.45
    background: np.ndarray = field(default_factory=lambda: np.array([0.5, 0.55, 0.6]))

    def cast(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest hit of rays o + t·d: t [N] (inf on a miss) and primitive index [N] (-1 on a miss)."""
        dT = np.ascontiguousarray(d.T)                                       # [3, N]
        oT = o if o.ndim == 1 else np.ascontiguousarray(o.T)
        t_best = np.full(d.shape[0], np.inf)
        ids = np.full(d.shape[0], -1, dtype=np.int16)
        for k, prim in enumerate(self.primitives):
            t = prim.intersect(oT, dT)
            closer = t < t_best
            t_best = np.where(closer, t, t_best)
            ids[closer] = k
        return t_best, ids

    def occluded(self, origins: np.ndarray, targets: np.ndarray, margin: float = 1e-5) -> np.ndarray:
        """Whether any surface lies strictly between each origin [N, 3] and target [N, 3] (the target's
        own surface, at parameter 1, does not count)."""
        d = targets - origins
        t, _ = self.cast(origins, d)
        return t < 1 - margin

    def shade(self, p: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colour and unit normal of hit points p [N, 3] of primitives ids [N] (all >= 0)."""
        rgb = np.empty_like(p)
        nrm = np.empty_like(p)
        for k in np.unique(ids):
            sel = ids == k
            prim = self.primitives[int(k)]
            nrm[sel] = prim.normal(p[sel])
            rgb[sel] = prim.material.color(p[sel])
        lam = self.ambient + (1 - self.ambient) * np.abs(nrm @ self.light)
        return rgb * lam[:, None], nrm


def render_view(geometry: Geometry, K: np.ndarray, E: np.ndarray, H: int, W: int) -> dict[str, np.ndarray]:
    """Ray-cast one pinhole view.

    K: [3, 3], E: [3, 4] world-to-camera. Returns float64/int arrays: image [H, W, 3] in [0, 1],
    depth [H, W] (0 on a miss), world_points [H, W, 3] and normals [H, W, 3] (0 on a miss),
    object_id [H, W] int16 (-1 on a miss).
    """
    R, t = E[:, :3], E[:, 3]
    v, u = np.mgrid[0:H, 0:W]
    pix = np.stack([u.ravel(), v.ravel(), np.ones(H * W)], -1).astype(np.float64)
    d = pix @ np.linalg.inv(K).T @ R                                         # Rᵀ K⁻¹ [u, v, 1]ᵀ, z_cam = 1
    o = -R.T @ t
    depth, ids = geometry.cast(o, d)
    hit = ids >= 0
    image = np.broadcast_to(geometry.background, (H * W, 3)).copy()
    points = np.zeros((H * W, 3))
    normals = np.zeros((H * W, 3))
    points[hit] = o + depth[hit, None] * d[hit]
    image[hit], normals[hit] = geometry.shade(points[hit], ids[hit])
    depth = np.where(hit, depth, 0.0)
    return {"image": image.reshape(H, W, 3), "depth": depth.reshape(H, W), "world_points": points.reshape(H, W, 3),
            "normals": normals.reshape(H, W, 3), "object_id": ids.reshape(H, W)}
