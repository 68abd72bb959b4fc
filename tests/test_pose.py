"""Camera conventions in hess.models.pose: hand-computed answers and the official fixture."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path
from hess.models.pose import (
    closed_form_inverse_se3,
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    unproject_depth_map_to_point_map,
)


def random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return quat_to_mat(q)


def test_quat_to_mat_known_rotations():
    s = math.sqrt(0.5)
    rz90 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(quat_to_mat(torch.tensor([0.0, 0.0, 0.0, 1.0])), torch.eye(3))
    torch.testing.assert_close(quat_to_mat(torch.tensor([0.0, 0.0, s, s])), rz90)  # xyzw, 90° about z
    # not normalised: the same rotation for any scale and sign
    torch.testing.assert_close(quat_to_mat(torch.tensor([0.0, 0.0, -3.0, -3.0])), rz90)
    rx180 = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(quat_to_mat(torch.tensor([2.0, 0.0, 0.0, 0.0])), rx180)


def test_mat_to_quat_inverts_and_standardises():
    R = random_rotations(64)
    q = mat_to_quat(R)
    assert q.shape == (64, 4)
    assert (q[:, 3] >= 0).all()
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(quat_to_mat(q), R)
    # 180° rotations (w = 0): the x/y/z candidates must be chosen
    for axis in torch.eye(3, dtype=torch.float64):
        R180 = 2 * torch.outer(axis, axis) - torch.eye(3, dtype=torch.float64)
        q180 = mat_to_quat(R180)
        torch.testing.assert_close(q180.abs(), torch.cat([axis, torch.zeros(1, dtype=torch.float64)]))
    s = math.sqrt(0.5)
    torch.testing.assert_close(mat_to_quat(torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])),
                               torch.tensor([0.0, 0.0, s, s]))


def test_pose_encoding_hand_computed():
    # identity rotation, t = (1, 2, 3), fov_h = 90°, fov_w = 60°, image 100×200
    enc = torch.tensor([[[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0, math.pi / 2, math.pi / 3]]])
    extr, intr = pose_encoding_to_extri_intri(enc, image_size_hw=(100, 200))
    torch.testing.assert_close(extr[0, 0], torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3]]))
    fy = 50.0 / math.tan(math.pi / 4)
    fx = 100.0 / math.tan(math.pi / 6)
    torch.testing.assert_close(intr[0, 0], torch.tensor([[fx, 0, 100.0], [0, fy, 50.0], [0, 0, 1.0]]))
    extr_only, none = pose_encoding_to_extri_intri(enc, build_intrinsics=False)
    assert none is None and torch.equal(extr_only, extr)


def test_pose_encoding_round_trip_and_gradient():
    B, S = 2, 3
    R = random_rotations(B * S, seed=1).float().reshape(B, S, 3, 3)
    t = torch.randn(B, S, 3, 1)
    extr = torch.cat([R, t], dim=-1)
    f = torch.tensor([300.0, 250.0, 400.0]).repeat(B, 1)
    intr = torch.zeros(B, S, 3, 3)
    intr[..., 0, 0], intr[..., 1, 1], intr[..., 0, 2], intr[..., 1, 2], intr[..., 2, 2] = f * 1.1, f, 259.0, 196.0, 1.0
    enc = extri_intri_to_pose_encoding(extr, intr, image_size_hw=(392, 518))
    assert enc.shape == (B, S, 9)
    extr2, intr2 = pose_encoding_to_extri_intri(enc, image_size_hw=(392, 518))
    torch.testing.assert_close(extr2, extr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(intr2, intr, rtol=1e-5, atol=1e-3)
    enc = enc.clone().requires_grad_(True)
    e, i = pose_encoding_to_extri_intri(enc, (392, 518))
    (e.sum() + i.sum()).backward()
    assert torch.isfinite(enc.grad).all() and enc.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size_hw"):
        pose_encoding_to_extri_intri(torch.zeros(1, 1, 9))
    with pytest.raises(ValueError, match=r"\[\.\.\., 9\]"):
        pose_encoding_to_extri_intri(torch.zeros(1, 1, 7), (10, 10))
    with pytest.raises(ValueError, match="absT_quaR_FoV"):
        pose_encoding_to_extri_intri(torch.zeros(1, 1, 9), (10, 10), pose_encoding_type="relT")
    with pytest.raises(ValueError, match="se3"):
        closed_form_inverse_se3(torch.zeros(2, 3, 3))


@pytest.mark.parametrize("rows", [3, 4])
def test_closed_form_inverse_se3(rows):
    R = random_rotations(5, seed=2)
    t = torch.randn(5, 3, 1, dtype=torch.float64)
    se3 = torch.cat([R, t], dim=-1)
    if rows == 4:
        se3 = torch.cat([se3, torch.tensor([[[0.0, 0, 0, 1]]], dtype=torch.float64).expand(5, 1, 4)], dim=1)
    inv = closed_form_inverse_se3(se3)
    full = torch.eye(4, dtype=torch.float64).repeat(5, 1, 1)
    full[:, :3] = se3[:, :3]
    torch.testing.assert_close(inv, torch.linalg.inv(full))
    inv_np = closed_form_inverse_se3(se3.numpy())
    assert isinstance(inv_np, np.ndarray)
    np.testing.assert_allclose(inv_np, inv.numpy())
    # any leading dims
    assert closed_form_inverse_se3(se3.reshape(5, 1, rows, 4)).shape == (5, 1, 4, 4)


def test_unprojection_hand_computed():
    depth = torch.zeros(1, 2, 4)
    depth[0, 1, 3] = 2.0  # pixel u=3, v=1
    intr = torch.tensor([[[10.0, 0, 2.0], [0, 10.0, 1.0], [0, 0, 1]]])
    # camera rotated 90° about z and translated: X_cam = R X_w + t  →  X_w = Rᵀ (X_cam - t)
    R = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    t = torch.tensor([1.0, 2.0, 3.0])
    extr = torch.cat([R, t[:, None]], dim=-1)[None]
    pts = unproject_depth_map_to_point_map(depth[..., None], extr, intr)
    assert pts.shape == (1, 2, 4, 3)
    x_cam = torch.tensor([(3 - 2) * 2.0 / 10, (1 - 1) * 2.0 / 10, 2.0])
    torch.testing.assert_close(pts[0, 1, 3], R.T @ (x_cam - t))
    torch.testing.assert_close(pts[0, 0, 0], R.T @ (torch.zeros(3) - t))  # zero depth → camera centre


def test_matches_official_fixture():
    out = load_file(fixture_path("vggt_parity_a", "outputs.safetensors"))
    H, W = out["depth"].shape[2:4]
    extr, intr = pose_encoding_to_extri_intri(out["pose_enc"], image_size_hw=(H, W))
    torch.testing.assert_close(extr, out["extrinsic"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(intr, out["intrinsic"], rtol=1e-4, atol=1e-4)
    pts = torch.stack([unproject_depth_map_to_point_map(out["depth"][b], out["extrinsic"][b], out["intrinsic"][b])
                       for b in range(out["depth"].shape[0])])
    torch.testing.assert_close(pts, out["world_points_from_depth"], rtol=1e-4, atol=1e-3)
    pts_np = unproject_depth_map_to_point_map(out["depth"][0].numpy(), out["extrinsic"][0].numpy(),
                                              out["intrinsic"][0].numpy())
    assert isinstance(pts_np, np.ndarray) and pts_np.dtype == np.float32
    np.testing.assert_allclose(pts_np, out["world_points_from_depth"][0].numpy(), rtol=1e-4, atol=1e-3)
