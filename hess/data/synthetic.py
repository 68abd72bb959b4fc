"""Synthetic multi-view scenes with exact ground truth (``evaluation.md`` §5), the embedded default data.

    scene = make_scene(scene_key("train", 17), preset="orbit", num_frames=4, arc_deg=(5, 15))
    uv, visible = exact_correspondences(scene, 0, 1)          # pixel i -> pixel j, occlusion-exact
    scenes = build_scenes("synthetic", split="test", num_scenes=50)   # test frames shuffled per scene

Camera presets (``PRESETS``): ``orbit`` (object-centric, CO3D-like), ``grid`` (a 7×7 spherical-cap grid
in front of a back wall, DTU-like; S views at stride ⌊48/(S-1)⌋, i.e. 0, 5, …, 45 for S = 10),
``forward`` (a smooth forward path in a room, RealEstate10K-like). World units are metres (z up);
``units="mm"`` scales everything by 1000. GT stays in raw world units: see ``normalize_scene``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hess.data.geometry import look_at, project_points
from hess.data.render import Box, Geometry, Material, Rect, Sphere, render_view
from hess.data.scene import DATASETS, Scene, normalize_scene
from hess.data.splits import frame_order_rng, scene_key
from hess.registry import Registry

Range = tuple[float, float]
PRESETS: Registry[Callable[..., tuple]] = Registry("camera preset")
_UNITS = {"m": 1.0, "mm": 1000.0}


@dataclass(frozen=True)
class SyntheticOptions:
    """Options of one synthetic scene; ``None`` ranges take the preset's default (see ``PRESET_DEFAULTS``).

    arc_deg: azimuth span of the orbit (orbit) or of the camera grid (grid), sampled per scene.
    elevation_deg, radius: camera elevation and distance to the target (orbit, grid).
    path_length: distance travelled along the path (forward). fov_deg: horizontal FoV, per scene.
    roll_deg: max |roll| jitter per frame. jitter: per-frame elevation/radius/target jitter (orbit).
    walls: orbit only, two vertical walls forming a corner behind the objects (seen from the middle of the
        arc).  On a bare ground square a wrong azimuth (a rotation about the vertical axis) maps the
        ground onto itself, so nearest-neighbour Chamfer barely sees pose errors; walls make it visible.
    """

    preset: str = "orbit"
    num_frames: int = 10
    height: int = 224
    width: int = 224
    arc_deg: Range | None = None
    elevation_deg: Range | None = None
    radius: Range | None = None
    path_length: Range = (0.5, 2.0)
    fov_deg: Range = (45.0, 70.0)
    roll_deg: float = 3.0
    jitter: bool = True
    num_boxes: tuple[int, int] = (2, 6)
    num_spheres: tuple[int, int] = (1, 4)
    walls: bool = False
    units: str = "m"

    def __post_init__(self) -> None:
        PRESETS.get(self.preset)
        for name in ("height", "width"):
            value = getattr(self, name)
            if int(value) != value or value <= 0 or value % 14:
                raise ValueError(f"{name} must be a positive multiple of 14, got {value}")
        if int(self.num_frames) != self.num_frames or self.num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {self.num_frames}")
        if self.units not in _UNITS:
            raise ValueError(f"units must be one of {sorted(_UNITS)}, got {self.units!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"{f.name} must be a (low, high) pair with low <= high, got {value}")
        if not (0 < self.fov_deg[0] and self.fov_deg[1] < 180):
            raise ValueError(f"fov_deg must lie in (0, 180), got {self.fov_deg}")

    @classmethod
    def from_kwargs(cls, **options: Any) -> "SyntheticOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown synthetic option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})

    def range(self, name: str) -> Range:
        value = getattr(self, name)
        return PRESET_DEFAULTS[self.preset][name] if value is None else value


PRESET_DEFAULTS: dict[str, dict[str, Range]] = {
    "orbit": {"arc_deg": (60.0, 360.0), "elevation_deg": (10.0, 45.0), "radius": (2.5, 4.0)},
    "grid": {"arc_deg": (50.0, 70.0), "elevation_deg": (15.0, 50.0), "radius": (2.5, 3.5)},
    "forward": {"arc_deg": (0.0, 0.0), "elevation_deg": (0.0, 0.0), "radius": (0.0, 0.0)},
}


# --------------------------------------------------------------------------------------------- layout
def _material(rng: np.random.Generator, freq: Range) -> Material:
    hue = rng.uniform(0.15, 1.0, 3)
    palette = np.clip(rng.uniform(0.0, 1.0, (8, 3)) * 0.5 + hue * 0.5, 0, 1)
    palette *= np.where(np.arange(8) % 2 == 0, 0.35, 1.0)[:, None]             # alternate dark / bright
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return Material(palette=palette, freq=rng.uniform(*freq), rot=q, seed=int(rng.integers(0, 2 ** 31)))


def _rect(rng, center, u, v, half) -> Rect:
    u, v = np.asarray(u, float), np.asarray(v, float)
    return Rect(np.asarray(center, float), np.stack([u, v, np.cross(u, v)]), np.asarray(half, float),
                _material(rng, (1.5, 3.0)))


def _objects(rng: np.random.Generator, opts: SyntheticOptions, center: np.ndarray, spread: float) -> list:
    """Boxes and spheres resting on (or floating just above) the ground z = 0 around ``center``."""
    prims: list = []
    for _ in range(int(rng.integers(opts.num_boxes[0], opts.num_boxes[1] + 1))):
        half = rng.uniform(0.12, 0.4, 3)
        yaw, tilt = rng.uniform(0, 2 * math.pi), rng.uniform(-0.2, 0.2)
        cz, sz, ct, st = math.cos(yaw), math.sin(yaw), math.cos(tilt), math.sin(tilt)
        rot = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, ct, -st], [0, st, ct]])
        xy = center[:2] + rng.uniform(-spread, spread, 2)
        prims.append(Box(np.array([*xy, half[2] + rng.uniform(0, 0.3)]), half, rot, _material(rng, (3.0, 6.0))))
    for _ in range(int(rng.integers(opts.num_spheres[0], opts.num_spheres[1] + 1))):
        r = rng.uniform(0.15, 0.45)
        xy = center[:2] + rng.uniform(-spread, spread, 2)
        prims.append(Sphere(np.array([*xy, r + rng.uniform(0, 0.4)]), r, _material(rng, (3.0, 6.0))))
    return prims


def _light(rng: np.random.Generator) -> np.ndarray:
    az, el = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.3)
    return np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def _spherical(az: np.ndarray, el: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.stack([r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az), r * np.sin(el)], -1)


# -------------------------------------------------------------------------------------------- presets
@PRESETS.register("orbit")
def orbit_preset(rng: np.random.Generator, opts: SyntheticOptions):
    """Object cluster on a ground square; cameras evenly spaced along an azimuth arc, looking at it."""
    S = opts.num_frames
    ground = _rect(rng, [0, 0, 0], [1, 0, 0], [0, 1, 0], rng.uniform(2.5, 4.0, 2))
    prims = [ground, *_objects(rng, opts, np.zeros(3), 0.9)]
    span = math.radians(rng.uniform(*opts.range("arc_deg")))
    az0 = rng.uniform(0, 2 * math.pi)
    frac = np.arange(S) / (S if span >= 2 * math.pi - 1e-9 else max(S - 1, 1))
    el = math.radians(rng.uniform(*opts.range("elevation_deg")))
    r = rng.uniform(*opts.range("radius"))
    target = np.array([0.0, 0.0, rng.uniform(0.2, 0.5)])
    j = 1.0 if opts.jitter else 0.0
    centers = target + _spherical(az0 + span * frac, el + j * np.radians(rng.uniform(-3, 3, S)),
                                  r * (1 + j * rng.uniform(-0.05, 0.05, S)))
    targets = target + j * rng.uniform(-0.05, 0.05, (S, 3))
    if opts.walls:                              # own child stream: everything else is drawn as without walls
        prims += _corner_walls(np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0]), az0 + span / 2 + math.pi)
    return Geometry(prims, light=_light(rng)), centers, targets


def _corner_walls(rng: np.random.Generator, behind: float) -> list:
    """Two vertical walls at azimuths ``behind ± 45°`` (distance 2–3, 3–4.5 wide, 1.5–2.5 high) meeting
    in a corner behind the objects; their normals face the cameras."""
    walls = []
    dist, height = rng.uniform(2.0, 3.0), rng.uniform(1.5, 2.5)
    for side in (-1.0, 1.0):
        a = behind + side * math.pi / 4
        n = -np.array([math.cos(a), math.sin(a), 0.0])                         # towards the origin
        u = np.cross([0.0, 0.0, 1.0], n)
        walls.append(_rect(rng, -n * dist + [0, 0, height / 2], u, [0.0, 0.0, 1.0],
                           [rng.uniform(1.5, 2.25), height / 2]))
    return walls


@PRESETS.register("grid")
def grid_preset(rng: np.random.Generator, opts: SyntheticOptions):
    """DTU-like: a 7×7 grid on a spherical cap facing a table with objects and a back wall (49 views,
    serpentine order); S views are taken at stride ⌊48/(S-1)⌋."""
    S = opts.num_frames
    if S > 49:
        raise ValueError(f"the grid preset has 49 views, num_frames={S} asked for more")
    az_c = rng.uniform(0, 2 * math.pi)
    span = math.radians(rng.uniform(*opts.range("arc_deg")))
    el_lo, el_hi = opts.range("elevation_deg")
    back = -np.array([math.cos(az_c), math.sin(az_c), 0.0])                    # away from the cameras
    side = np.array([-back[1], back[0], 0.0])
    wall = _rect(rng, back * 2.0 + [0, 0, 1.5], side, [0, 0, 1], [4.0, 1.5])
    table = _rect(rng, [0, 0, 0], [1, 0, 0], [0, 1, 0], [3.0, 3.0])
    prims = [table, wall, *_objects(rng, opts, np.zeros(3), 0.7)]
    az = az_c + span * (np.linspace(-0.5, 0.5, 7))
    el = np.radians(np.linspace(rng.uniform(el_lo, el_lo + 5), rng.uniform(el_hi - 5, el_hi), 7))
    grid = [(a, e) for row, e in enumerate(el) for a in (az if row % 2 == 0 else az[::-1])]
    stride = 1 if S == 1 else max(1, 48 // (S - 1))
    pick = np.array([grid[k * stride] for k in range(S)])
    r = rng.uniform(*opts.range("radius"))
    target = np.array([0.0, 0.0, 0.3])
    centers = target + _spherical(pick[:, 0], pick[:, 1], np.full(S, r))
    return Geometry(prims, light=_light(rng)), centers, np.broadcast_to(target, (S, 3)).copy()


@PRESETS.register("forward")
def forward_preset(rng: np.random.Generator, opts: SyntheticOptions):
    """RealEstate10K-like: a room (floor, ceiling, side walls, back wall) with objects ahead; the camera
    moves forward along +y with a gentle sway and yaw."""
    S = opts.num_frames
    depth, width, height = rng.uniform(6, 9), rng.uniform(3, 5), rng.uniform(3, 4)
    ey, ez, ex = np.array([0, 1.0, 0]), np.array([0, 0, 1.0]), np.array([1.0, 0, 0])
    prims = [
        _rect(rng, [0, depth / 2 - 1, 0], ex, ey, [width, depth / 2 + 1]),                # floor
        _rect(rng, [0, depth / 2 - 1, height], ex, ey, [width, depth / 2 + 1]),           # ceiling
        _rect(rng, [0, depth, height / 2], ex, ez, [width, height / 2]),                  # back wall
        _rect(rng, [-width, depth / 2 - 1, height / 2], ey, ez, [depth / 2 + 1, height / 2]),
        _rect(rng, [width, depth / 2 - 1, height / 2], ey, ez, [depth / 2 + 1, height / 2]),
        *_objects(rng, opts, np.array([0.0, (depth + 3) / 2, 0]), min(width - 0.6, (depth - 3) / 2 - 0.4)),
    ]
    length = rng.uniform(*opts.path_length)
    s = np.linspace(0, 1, S)
    amp, phase = rng.uniform(0, 0.25), rng.uniform(0, 2 * math.pi)
    centers = np.stack([amp * np.sin(2 * math.pi * s + phase), -0.5 + length * s,
                        np.full(S, rng.uniform(1.2, 1.7))], -1)
    yaw = math.radians(rng.uniform(-10, 10)) + np.radians(rng.uniform(3, 8)) * np.sin(math.pi * s + phase)
    pitch = math.radians(rng.uniform(0, 10))
    look = np.stack([np.sin(yaw), np.cos(yaw), np.full(S, -math.tan(pitch))], -1)
    return Geometry(prims, light=_light(rng)), centers, centers + look


# ------------------------------------------------------------------------------------------ rendering
#: The scene distribution of the embedded default model ``hess-tiny`` (its training data, the demo's
#: evaluation scenes): 25–90° orbit arcs, 4 views of 84×84, fixed-ish FoV, little roll.
EMBEDDED_SCENE_OPTIONS: dict[str, Any] = dict(preset="orbit", num_frames=4, height=84, width=84,
                                              arc_deg=(25.0, 90.0), fov_deg=(50.0, 60.0), roll_deg=2.0)


def make_scene(seed: int | Sequence[int], *, scene_id: str | None = None, category: str | None = None,
               **options: Any) -> Scene:
    """Render ONE synthetic scene, deterministic in (seed, options).

    Args:
        seed: an int or a key such as ``scene_key("train", i)`` (use split keys for anything that
            must not overlap another split).
        options: ``SyntheticOptions`` fields (preset, num_frames, height, width, arc_deg, ...).
    Returns:
        Scene (float32) with extras ``normals`` [S, H, W, 3] and ``object_id`` [S, H, W] (int16, -1 on
        background) and meta ``seed``, ``preset``, ``options``, ``geometry`` (the primitives) and
        ``geometry_to_world`` (scale, R, t), for ``exact_correspondences``.
    """
    opts = SyntheticOptions.from_kwargs(**options)
    rng = np.random.default_rng(list(seed) if isinstance(seed, (tuple, list)) else seed)
    geometry, centers, targets = PRESETS.get(opts.preset)(rng, opts)
    S, H, W = opts.num_frames, opts.height, opts.width
    fx = (W / 2) / math.tan(math.radians(rng.uniform(*opts.fov_deg)) / 2)
    roll = np.radians(rng.uniform(-opts.roll_deg, opts.roll_deg, S))     # drawn last: S-dependent
    K = np.array([[fx, 0, W / 2], [0, fx, H / 2], [0, 0, 1.0]])
    E = look_at(centers, targets, np.array([0, 0, 1.0]), roll)
    views = [render_view(geometry, K, E[k], H, W) for k in range(S)]
    scale = _UNITS[opts.units]
    stack = lambda key: torch.from_numpy(np.stack([v[key] for v in views]))  # noqa: E731
    depth = stack("depth")
    E_world = E.copy()
    E_world[:, :, 3] *= scale
    return Scene(
        images=stack("image").permute(0, 3, 1, 2).float().contiguous(),
        extrinsics=torch.from_numpy(E_world).float(),
        intrinsics=torch.from_numpy(np.broadcast_to(K, (S, 3, 3)).copy()).float(),
        depth=(depth * scale).float(), world_points=(stack("world_points") * scale).float(), valid=depth > 0,
        scene_id=scene_id or f"synthetic/{opts.preset}/{seed}", frame_ids=list(range(S)),
        category=category or opts.preset, dataset="synthetic",
        extras={"normals": stack("normals").float(), "object_id": stack("object_id")},
        meta={"seed": seed, "preset": opts.preset, "options": opts, "geometry": geometry,
              "geometry_to_world": {"scale": scale, "R": np.eye(3).tolist(), "t": [0.0, 0.0, 0.0]}},
    )


def exact_correspondences(scene: Scene, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact pixel correspondences from frame i to frame j of a synthetic scene.

    Each valid pixel of i maps to the projection of its GT world point in j (sub-pixel, exact). It is
    visible when it projects inside j's image, in front of the camera, and the segment from j's centre
    to the point crosses no surface (an analytic shadow-ray test on the scene's primitives).
    Works after ``subset``/``permute``/``normalize_scene``.

    Returns uv_j [H, W, 2] float32 (NaN where not visible) and visible [H, W] bool.
    """
    if "geometry" not in scene.meta:
        raise ValueError(f"scene {scene.scene_id!r} has no meta['geometry']; use geometry.reproject_pixels")
    H, W = scene.image_hw
    uv, z = project_points(scene.world_points[i], scene.intrinsics[j], scene.extrinsics[j])
    u, v = uv[..., 0], uv[..., 1]
    inside = scene.valid[i] & (z > 0) & (u > -0.5) & (u < W - 0.5) & (v > -0.5) & (v < H - 0.5)
    g2w = scene.meta["geometry_to_world"]
    s, R, t = g2w["scale"], np.asarray(g2w["R"]), np.asarray(g2w["t"])
    to_geom = lambda x: (x / s - t) @ R                                      # noqa: E731 (Rᵀ(x/s - t))
    pts = to_geom(scene.world_points[i].double().numpy()[inside.numpy()])
    center = to_geom(scene.camera_centers()[j].double().numpy())
    occluded = scene.meta["geometry"].occluded(np.broadcast_to(center, pts.shape).copy(), pts)
    visible = inside.clone()
    visible[inside] = torch.from_numpy(~occluded)
    uv = torch.where(visible[..., None], uv, torch.full_like(uv, float("nan")))
    return uv.float(), visible


@DATASETS.register("synthetic")
def build_synthetic(split: str = "test", num_scenes: int = 8, seed: int = 0, shuffle_frames: bool | None = None,
                    normalize: bool = False, **options: Any) -> list[Scene]:
    """Scenes 0..num_scenes-1 of ``split`` ("train", "val", "test", "calib") under ``seed``.

    Scene k is ``make_scene(scene_key(split, k, seed), **options)``, so splits never share a scene.
    shuffle_frames (default: True for "test" only) permutes each scene's frames with a seeded order,
    so that a constant pose cannot score; ``frame_ids`` keep the rendering order. normalize applies
    ``normalize_scene``.
    """
    if shuffle_frames is None:
        shuffle_frames = split == "test"
    preset = options.get("preset", "orbit")
    scenes = []
    for k in range(int(num_scenes)):
        key = scene_key(split, k, seed)
        scene = make_scene(key, scene_id=f"synthetic/{split}/{preset}/s{seed}/{k:05d}", **options)
        if shuffle_frames:
            scene = scene.permute(frame_order_rng(key).permutation(scene.num_frames))
        scenes.append(normalize_scene(scene) if normalize else scene)
    return scenes
