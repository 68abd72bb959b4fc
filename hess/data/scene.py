"""``Scene``: the one multi-view scene type with ground truth, and the ``DATASETS`` registry.

Conventions (``evaluation.md`` §4.5): OpenCV world-to-camera extrinsics ``x_cam = R·X + t``, pixel
intrinsics with zero skew, z-depth, ``valid`` marks pixels with GT (depth is 0 elsewhere).

    scenes = build_scenes("synthetic", split="calib", num_scenes=4)
    scene = scenes[0].subset([0, 2, 4]).to("cuda")
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from hess.registry import Registry

Tensor = torch.Tensor

DATASETS: Registry[Callable[..., list["Scene"]]] = Registry("dataset")


def build_scenes(name: str, **options: Any) -> list["Scene"]:
    """Scenes of a registered dataset ("synthetic", "co3d", "dtu"); options go to its builder."""
    return DATASETS.get(name)(**options)


@dataclass
class Scene:
    """S frames of one scene with ground truth.

    Attributes:
        images: [S, 3, H, W] float in [0, 1].
        extrinsics: [S, 3, 4] float, OpenCV world-to-camera.
        intrinsics: [S, 3, 3] float, pixels.
        depth: [S, H, W] float z-depth, 0 where invalid.
        world_points: [S, H, W, 3] float (meaningful where valid only).
        valid: [S, H, W] bool.
        scene_id, frame_ids (S entries, the dataset's own ids), category, dataset.
        extras: per-frame tensors whose first dim is S (e.g. synthetic ``normals`` [S, H, W, 3],
            ``object_id`` [S, H, W]); sliced by ``subset``/``permute`` and moved by ``to``.
        meta: scene-level information (seed, preset, geometry, normalisation); shared, not copied.
    """

    images: Tensor
    extrinsics: Tensor
    intrinsics: Tensor
    depth: Tensor
    world_points: Tensor
    valid: Tensor
    scene_id: str
    frame_ids: list
    category: str = ""
    dataset: str = ""
    extras: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"Scene {self.scene_id!r}"
        for name in ("images", "extrinsics", "intrinsics", "depth", "world_points", "valid"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{where}: images must be [S, 3, H, W], got {tuple(self.images.shape)}")
        S, _, H, W = self.images.shape
        expected = {"extrinsics": (S, 3, 4), "intrinsics": (S, 3, 3), "depth": (S, H, W),
                    "world_points": (S, H, W, 3), "valid": (S, H, W)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{where}: {name} must have shape {list(shape)} (S, H, W from images), "
                                 f"got {list(got)}")
        for name in ("images", "extrinsics", "intrinsics", "depth", "world_points"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"{where}: {name} must be a floating tensor, got {getattr(self, name).dtype}")
        if self.valid.dtype != torch.bool:
            raise TypeError(f"{where}: valid must be torch.bool, got {self.valid.dtype}")
        for name in ("images", "extrinsics", "intrinsics", "depth"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"{where}: {name} contains NaN or Inf")
        if S and (self.images.min() < 0 or self.images.max() > 1):
            lo, hi = self.images.min().item(), self.images.max().item()
            raise ValueError(f"{where}: images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        if (self.depth[self.valid] <= 0).any():
            raise ValueError(f"{where}: depth must be > 0 wherever valid is True")
        if len(self.frame_ids) != S:
            raise ValueError(f"{where}: {len(self.frame_ids)} frame_ids for {S} frames")
        for name, value in self.extras.items():
            if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != S:
                raise ValueError(f"{where}: extras[{name!r}] must be a tensor with first dim S={S}")

    @property
    def num_frames(self) -> int:
        return self.images.shape[0]

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def camera_centers(self) -> Tensor:
        """Camera centres in world coordinates, c = -Rᵀt: [S, 3]."""
        R, t = self.extrinsics[:, :, :3], self.extrinsics[:, :, 3:]
        return (-R.transpose(1, 2) @ t)[..., 0]

    def to(self, device: torch.device | str) -> "Scene":
        """A copy with every tensor (extras included) on ``device``."""
        move = {n: getattr(self, n).to(device) for n in _FRAME_TENSORS}
        return replace(self, **move, extras={k: v.to(device) for k, v in self.extras.items()})

    def subset(self, frame_indices: Sequence[int] | Tensor) -> "Scene":
        """The frames ``frame_indices`` (in that order; repeats allowed), as a new Scene."""
        idx = torch.as_tensor(frame_indices, dtype=torch.long).reshape(-1)
        S = self.num_frames
        if idx.numel() and (idx.min() < -S or idx.max() >= S):
            raise IndexError(f"Scene {self.scene_id!r}: frame index out of range for {S} frames: {idx.tolist()}")
        idx = idx % max(S, 1)
        pick = {n: getattr(self, n)[idx.to(getattr(self, n).device)] for n in _FRAME_TENSORS}
        extras = {k: v[idx.to(v.device)] for k, v in self.extras.items()}
        return replace(self, **pick, extras=extras, frame_ids=[self.frame_ids[i] for i in idx.tolist()])

    def permute(self, order: Sequence[int] | Tensor) -> "Scene":
        """Reorder the frames; ``order`` must be a permutation of range(S)."""
        order = [int(i) for i in torch.as_tensor(order).reshape(-1).tolist()]
        if sorted(order) != list(range(self.num_frames)):
            raise ValueError(f"Scene {self.scene_id!r}: order {order} is not a permutation of range({self.num_frames})")
        return self.subset(order)


_FRAME_TENSORS = ("images", "extrinsics", "intrinsics", "depth", "world_points", "valid")


def normalize_scene(scene: Scene) -> Scene:
    """Express the GT in the first camera's frame, scaled so that the mean distance of valid points from
    the origin is 1 (``method.md`` D10, VGGT's training normalisation).

    The similarity X' = s·(R_0·X + t_0) is recorded in ``meta["normalization"]`` as (scale, R, t) so
    that geometry-level code can map back. No valid point leaves the scale at 1 and sets
    ``meta["normalization_degenerate"] = True``.
    """
    if "normalization" in scene.meta:
        raise ValueError(f"Scene {scene.scene_id!r} is already normalised")
    ext = scene.extrinsics.double()
    R0, t0 = ext[0, :, :3], ext[0, :, 3]
    pts = scene.world_points.double() @ R0.T + t0                            # [S, H, W, 3] first-cam frame
    dist = pts[scene.valid].norm(dim=-1)
    degenerate = dist.numel() == 0 or not torch.isfinite(dist.mean()) or dist.mean() <= 0
    s = 1.0 if degenerate else 1.0 / dist.mean().item()
    R = ext[:, :, :3] @ R0.T                                                  # E_i · E_0⁻¹
    t = ext[:, :, 3] - (R @ t0[:, None])[..., 0]
    new_ext = torch.cat([R, s * t[..., None]], -1).to(scene.extrinsics.dtype)
    meta = {**scene.meta, "normalization": {"scale": s, "R": R0.tolist(), "t": t0.tolist()},
            "normalization_degenerate": bool(degenerate)}
    if "geometry_to_world" in meta:                                          # world = s1·(R1·X + t1)
        g = meta["geometry_to_world"]
        s1, R1, t1 = g["scale"], torch.tensor(g["R"], dtype=torch.float64), torch.tensor(g["t"], dtype=torch.float64)
        meta["geometry_to_world"] = {"scale": s1 * s, "R": (R0 @ R1).tolist(), "t": (R0 @ t1 + t0 / s1).tolist()}
    return replace(scene, extrinsics=new_ext, depth=scene.depth * s,
                   world_points=(s * pts).to(scene.world_points.dtype), meta=meta)
