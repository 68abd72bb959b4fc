"""Camera conventions of VGGT (vggt-architecture.md §11): pose encoding, quaternions, SE(3), unprojection.

* Extrinsics ``[R | t]`` are 3×4 **world-to-camera** (camera-from-world), OpenCV axes (x right, y down,
  z forward).
* Pose encoding ``absT_quaR_FoV`` (9 values): ``[tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]``; the
  quaternion is scalar-last and not necessarily unit (``quat_to_mat`` normalises implicitly).
* Intrinsics: ``fy = (H/2)/tan(fov_h/2)``, ``fx = (W/2)/tan(fov_w/2)``, principal point ``(W/2, H/2)``
  of the network input.
* Unprojection uses integer pixel centres ``(u, v)`` (no +0.5) and z-depth.

Everything is torch and differentiable; ``closed_form_inverse_se3`` and
``unproject_depth_map_to_point_map`` also accept numpy arrays (and then return numpy), like the official
utilities.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]

POSE_ENCODINGS = ("absT_quaR_FoV",)


def _check_encoding_type(pose_encoding_type: str) -> None:
    if pose_encoding_type not in POSE_ENCODINGS:
        raise ValueError(f"unknown pose_encoding_type {pose_encoding_type!r}; known: {', '.join(POSE_ENCODINGS)}")


def _check_hw(image_size_hw: Optional[Sequence[int]]) -> tuple[int, int]:
    if image_size_hw is None or len(image_size_hw) != 2:
        raise ValueError(f"image_size_hw must be (H, W), got {image_size_hw!r}")
    return int(image_size_hw[0]), int(image_size_hw[1])


def quat_to_mat(quaternions: Tensor) -> Tensor:
    """Scalar-last quaternions → rotation matrices (any norm; scaled by 2/|q|²).

    Args:
        quaternions: [..., 4] as (x, y, z, w).
    Returns:
        [..., 3, 3].
    """
    if quaternions.shape[-1] != 4:
        raise ValueError(f"quaternions must be [..., 4], got {tuple(quaternions.shape)}")
    x, y, z, w = quaternions.unbind(-1)
    s = 2.0 / (quaternions * quaternions).sum(-1)
    rows = (
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quaternions.shape[:-1] + (3, 3))


def mat_to_quat(matrix: Tensor) -> Tensor:
    """Rotation matrices → unit scalar-last quaternions with w >= 0.

    Four candidate quaternions are formed (one from each of |w|, |x|, |y|, |z| as divisor); the one
    with the largest divisor is the best conditioned and is returned.

    Args:
        matrix: [..., 3, 3].
    Returns:
        [..., 4] as (x, y, z, w).
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"matrix must be [..., 3, 3], got {tuple(matrix.shape)}")
    m = matrix.reshape(matrix.shape[:-2] + (9,))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # 4·(w², x², y², z²), clamped at 0, then square-rooted: 2·(|w|, |x|, |y|, |z|)
    four_sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    # sqrt of the positive part with a finite gradient at 0 (as pytorch3d's _sqrt_positive_part)
    two_abs = torch.where(four_sq > 0, torch.sqrt(four_sq.clamp(min=1e-30)), torch.zeros_like(four_sq))
    # Row k holds 4·q_k·(w, x, y, z); dividing by 2·|q_k| gives ±(w, x, y, z).
    cand = torch.stack(
        [
            torch.stack([two_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, two_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, two_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, two_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )  # [..., 4 candidates, (w, x, y, z)]
    cand = cand / (2.0 * two_abs.clamp(min=0.1))[..., None]
    best = two_abs.argmax(dim=-1)[..., None, None].expand(*two_abs.shape[:-1], 1, 4)
    wxyz = cand.gather(-2, best).squeeze(-2)
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def pose_encoding_to_extri_intri(
    pose_encoding: Tensor,
    image_size_hw: Optional[Sequence[int]] = None,
    pose_encoding_type: str = "absT_quaR_FoV",
    build_intrinsics: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Decode VGGT's pose encoding into OpenCV cameras.

    Args:
        pose_encoding: [B, S, 9] (any leading dims) ``[T(3), quat xyzw(4), fov_h, fov_w]``.
        image_size_hw: (H, W) of the network input; needed when ``build_intrinsics``.
    Returns:
        extrinsics [B, S, 3, 4] world-to-camera ``[R | T]``, intrinsics [B, S, 3, 3] (or None).
    """
    _check_encoding_type(pose_encoding_type)
    if pose_encoding.shape[-1] != 9:
        raise ValueError(f"pose_encoding must be [..., 9], got {tuple(pose_encoding.shape)}")
    T, quat = pose_encoding[..., :3], pose_encoding[..., 3:7]
    fov_h, fov_w = pose_encoding[..., 7], pose_encoding[..., 8]
    extrinsics = torch.cat([quat_to_mat(quat), T[..., None]], dim=-1)
    if not build_intrinsics:
        return extrinsics, None
    H, W = _check_hw(image_size_hw)
    fy = (H / 2.0) / torch.tan(fov_h / 2.0)
    fx = (W / 2.0) / torch.tan(fov_w / 2.0)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    intrinsics = torch.stack(
        [fx, zero, zero + W / 2, zero, fy, zero + H / 2, zero, zero, one], dim=-1
    ).reshape(fx.shape + (3, 3))
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(
    extrinsics: Tensor,
    intrinsics: Tensor,
    image_size_hw: Optional[Sequence[int]] = None,
    pose_encoding_type: str = "absT_quaR_FoV",
) -> Tensor:
    """Inverse of ``pose_encoding_to_extri_intri`` (the principal point is not encoded).

    Args:
        extrinsics: [B, S, 3, 4] world-to-camera.  intrinsics: [B, S, 3, 3].
        image_size_hw: (H, W) of the image the intrinsics refer to.
    Returns:
        [B, S, 9] float32.
    """
    _check_encoding_type(pose_encoding_type)
    if extrinsics.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"extrinsics must be [..., 3, 4], got {tuple(extrinsics.shape)}")
    if intrinsics.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsics must be [..., 3, 3], got {tuple(intrinsics.shape)}")
    H, W = _check_hw(image_size_hw)
    quat = mat_to_quat(extrinsics[..., :3, :3])
    T = extrinsics[..., :3, 3]
    fov_h = 2 * torch.atan((H / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intrinsics[..., 0, 0])
    return torch.cat([T, quat, fov_h[..., None], fov_w[..., None]], dim=-1).float()


def closed_form_inverse_se3(se3: ArrayLike, R: Optional[ArrayLike] = None, T: Optional[ArrayLike] = None) -> ArrayLike:
    """Invert rigid transforms: ``[R | t]⁻¹ = [Rᵀ | -Rᵀ t]`` without a general matrix inverse.

    Args:
        se3: [..., 4, 4] or [..., 3, 4] (torch or numpy).
        R, T: optional precomputed [..., 3, 3] and [..., 3, 1] (default: read from ``se3``).
    Returns:
        [..., 4, 4] homogeneous inverse, same array type as ``se3``.
    """
    if tuple(se3.shape[-2:]) not in ((4, 4), (3, 4)):
        raise ValueError(f"se3 must be [..., 4, 4] or [..., 3, 4], got {tuple(se3.shape)}")
    is_numpy = isinstance(se3, np.ndarray)
    t_se3 = torch.from_numpy(se3) if is_numpy else se3
    R = t_se3[..., :3, :3] if R is None else (torch.from_numpy(R) if is_numpy else R)
    T = t_se3[..., :3, 3:] if T is None else (torch.from_numpy(T) if is_numpy else T)
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -Rt @ T], dim=-1)  # [..., 3, 4]
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    inv = torch.cat([top, bottom], dim=-2)
    return inv.numpy() if is_numpy else inv


def depth_to_camera_points(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Back-project z-depth to camera coordinates on integer pixels.

    Args:
        depth: [..., H, W].  intrinsics: [..., 3, 3].
    Returns:
        [..., H, W, 3] with ``X = ((u - cx) d / fx, (v - cy) d / fy, d)``.
    """
    H, W = depth.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(H, device=depth.device, dtype=depth.dtype),
        torch.arange(W, device=depth.device, dtype=depth.dtype),
        indexing="ij",
    )
    k = intrinsics[..., None, None, :, :].to(depth.dtype)  # [..., 1, 1, 3, 3]
    x = (u - k[..., 0, 2]) * depth / k[..., 0, 0]
    y = (v - k[..., 1, 2]) * depth / k[..., 1, 1]
    return torch.stack([x, y, depth], dim=-1)


def unproject_depth_map_to_point_map(
    depth_map: ArrayLike, extrinsics_cam: ArrayLike, intrinsics_cam: ArrayLike
) -> ArrayLike:
    """Depth maps + cameras → world points (``X_w = Rᵀ (X_cam - t)``).

    Args:
        depth_map: [S, H, W, 1] or [S, H, W] (any leading dims), z-depth.
        extrinsics_cam: [S, 3, 4] world-to-camera.  intrinsics_cam: [S, 3, 3].
    Returns:
        [S, H, W, 3] world points: numpy float32 if ``depth_map`` is numpy (as the official utility),
        else a tensor of the depth dtype (computed in float64 internally, differentiable).
    """
    is_numpy = isinstance(depth_map, np.ndarray)
    depth, extr, intr = (torch.as_tensor(a) if isinstance(a, np.ndarray) else a
                         for a in (depth_map, extrinsics_cam, intrinsics_cam))
    if depth.dim() >= 3 and depth.shape[-1] == 1 and depth.dim() == extr.dim() + 1:
        depth = depth[..., 0]
    if depth.shape[:-2] != extr.shape[:-2] or extr.shape[:-2] != intr.shape[:-2]:
        raise ValueError(
            f"leading dims differ: depth {tuple(depth_map.shape)}, extrinsics {tuple(extr.shape)}, "
            f"intrinsics {tuple(intr.shape)}"
        )
    out_dtype = depth.dtype if depth.dtype.is_floating_point else torch.float32
    d64 = depth.to(torch.float64)
    cam = depth_to_camera_points(d64, intr.to(torch.float64))  # [..., H, W, 3]
    cam_to_world = closed_form_inverse_se3(extr.to(torch.float64))  # [..., 4, 4]
    R = cam_to_world[..., None, None, :3, :3]
    t = cam_to_world[..., None, None, :3, 3]
    world = (R @ cam[..., None])[..., 0] + t
    world = world.to(out_dtype)
    return world.numpy().astype(np.float32) if is_numpy else world
