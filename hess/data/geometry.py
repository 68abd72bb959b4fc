"""Camera geometry shared by the loaders and the generator: look-at poses, depth unprojection,
projection, and pixel correspondences between frames (``evaluation.md`` §4.5).

Pixel (u, v) = (column, row) at integer pixel centres; OpenCV world-to-camera ``x = R·X + t``.
"""
from __future__ import annotations

import numpy as np
import torch

from hess.data.scene import Scene

Tensor = torch.Tensor


def look_at(centers: np.ndarray, targets: np.ndarray, up: np.ndarray, roll: np.ndarray | None = None) -> np.ndarray:
    """OpenCV world-to-camera poses looking from ``centers`` at ``targets`` (x right, y down, z forward).

    centers, targets: [S, 3]; up: [3] world up; roll: [S] radians about the optical axis (default 0).
    Returns extrinsics [S, 3, 4] float64. Raises if a viewing direction is parallel to ``up``.
    """
    centers, targets = np.asarray(centers, np.float64), np.asarray(targets, np.float64)
    z = targets - centers
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    x = np.cross(z, np.asarray(up, np.float64))
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norm < 1e-9).any():
        raise ValueError("look_at: a viewing direction is parallel to the up vector")
    x /= norm
    y = np.cross(z, x)
    R = np.stack([x, y, z], axis=1)                                          # rows: camera axes in world
    if roll is not None:
        c, s = np.cos(roll), np.sin(roll)
        Rz = np.zeros((len(c), 3, 3))
        Rz[:, 0, 0], Rz[:, 0, 1], Rz[:, 1, 0], Rz[:, 1, 1], Rz[:, 2, 2] = c, -s, s, c, 1
        R = Rz @ R
    t = -(R @ centers[..., None])[..., 0]
    return np.concatenate([R, t[..., None]], axis=-1)


def pixel_grid(H: int, W: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Homogeneous pixel centres [H, W, 3] = (u, v, 1), u = column, v = row."""
    v, u = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
    return torch.stack([u, v, torch.ones_like(u)], -1)


def _check_skew(intrinsics: Tensor) -> None:
    if (intrinsics[..., 0, 1] != 0).any() or (intrinsics[..., 1, 0] != 0).any():
        raise ValueError("intrinsics must have zero skew (K[0,1] = K[1,0] = 0)")


def unproject_depth(depth: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> Tensor:
    """World points X_w = Rᵀ(d·K⁻¹[u, v, 1]ᵀ - t) at every pixel (invalid pixels included; mask them).

    depth: [S, H, W], intrinsics: [S, 3, 3], extrinsics: [S, 3, 4] -> [S, H, W, 3] in depth's dtype
    (computed in float64).
    """
    _check_skew(intrinsics)
    S, H, W = depth.shape
    K, E = intrinsics.double(), extrinsics.double()
    rays = pixel_grid(H, W).to(depth.device).reshape(1, -1, 3) @ torch.linalg.inv(K).transpose(1, 2)  # [S, HW, 3]
    cam = rays * depth.double().reshape(S, -1, 1)
    world = (cam - E[:, None, :, 3]) @ E[:, :, :3]                           # (x - t)ᵀ R = (Rᵀ(x - t))ᵀ
    return world.reshape(S, H, W, 3).to(depth.dtype)


def project_points(points: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates and z-depth of world points in one camera.

    points: [..., 3]; intrinsics: [3, 3]; extrinsics: [3, 4] -> uv [..., 2], z [...] (float64).
    Points at z ≤ 0 get uv = NaN.
    """
    X = points.double()
    K, E = intrinsics.double().to(X.device), extrinsics.double().to(X.device)
    cam = X @ E[:, :3].T + E[:, 3]
    z = cam[..., 2]
    pix = cam @ K.T
    uv = pix[..., :2] / z[..., None]
    return torch.where((z > 0)[..., None], uv, torch.full_like(uv, float("nan"))), z


def reproject_pixels(scene: Scene, i: int, j: int, depth_tolerance: float = 0.01) -> tuple[Tensor, Tensor]:
    """Where each pixel of frame i lands in frame j, and whether it is seen there (depth test).

    The location is exact (projection of frame i's GT world point). Visibility: valid in i, in front
    of camera j, inside j's image, and |z_j - depth_j[round(v), round(u)]| ≤ depth_tolerance·z_j with
    that pixel valid in j. Works for any scene; synthetic scenes also have an exact occlusion test
    (``hess.data.synthetic.exact_correspondences``).

    Returns uv_j [H, W, 2] float32 (NaN where not visible) and visible [H, W] bool.
    """
    H, W = scene.image_hw
    uv, z = project_points(scene.world_points[i], scene.intrinsics[j], scene.extrinsics[j])
    u, v = uv[..., 0], uv[..., 1]
    inside = scene.valid[i] & (z > 0) & (u > -0.5) & (u < W - 0.5) & (v > -0.5) & (v < H - 0.5)
    ui = torch.nan_to_num(u.round(), nan=0).long().clamp(0, W - 1)
    vi = torch.nan_to_num(v.round(), nan=0).long().clamp(0, H - 1)
    d_j = scene.depth[j].double()[vi, ui]
    seen = inside & scene.valid[j][vi, ui] & ((z - d_j).abs() <= depth_tolerance * z.abs())
    uv = torch.where(seen[..., None], uv, torch.full_like(uv, float("nan")))
    return uv.float(), seen
