"""Known-answer tests of hess.metrics (evaluation.md §4, §6 oracles)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hess import metrics as M

D = torch.float64


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=D))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def axis_angle(axis: torch.Tensor, deg: float) -> torch.Tensor:
    """Rodrigues' formula, written out by hand."""
    k = axis / axis.norm()
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=D)
    th = math.radians(deg)
    return torch.eye(3, dtype=D) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


def random_cameras(S: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    R = torch.stack([random_rotation(gen) for _ in range(S)])
    t = torch.randn(S, 3, generator=gen, dtype=D) * 2
    return torch.cat([R, t[..., None]], -1)                                  # [S, 3, 4]


def sim3_world(ext: torch.Tensor, s: float, Q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Extrinsics of the same cameras in the world X' = s·Q·X + c: R' = R·Qᵀ, t' = s·t - R·Qᵀ·c."""
    R, t = ext[:, :, :3], ext[:, :, 3]
    R2 = R @ Q.T
    return torch.cat([R2, (s * t - (R2 @ c))[..., None]], -1)


def reference_auc(rot: np.ndarray, trans: np.ndarray, T: int) -> float:
    """VGGT's calculate_auc_np, re-typed from the protocol description (histogram of max errors)."""
    err = np.max(np.stack([rot, trans], 1), 1)
    hist, _ = np.histogram(err, bins=np.arange(T + 1))
    return float(np.mean(np.cumsum(hist / len(err))))


# ---------------------------------------------------------------------------------------------- pose
def test_perfect_prediction_under_any_sim3_scores_one():
    gt = random_cameras(10)
    gen = torch.Generator().manual_seed(1)
    pred = sim3_world(gt, 3.7, random_rotation(gen), torch.tensor([1.0, -2.0, 5.0], dtype=D))
    rot, trans = M.relative_pose_errors(pred, gt)
    assert rot.shape == trans.shape == (45,)
    assert rot.max() < 1e-5 and trans.max() < 1e-5                          # clamp floor ≈ 3.6e-6°
    metrics = M.pose_metrics(rot, trans)
    assert all(v == 1.0 for v in metrics.values())
    assert M.pose_auc(rot, trans, 30) == 1.0


def test_errors_are_invariant_to_sim3_of_a_noisy_prediction():
    gt = random_cameras(6, seed=2)
    pred = gt + 0.05 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(3), dtype=D)
    pred[:, :, :3] = torch.linalg.svd(pred[:, :, :3])[0] @ torch.linalg.svd(pred[:, :, :3])[2]  # re-orthonormalise
    gen = torch.Generator().manual_seed(4)
    moved = sim3_world(pred, 0.3, random_rotation(gen), torch.tensor([4.0, 0.5, -1.0], dtype=D))
    r1, t1 = M.relative_pose_errors(pred, gt)
    r2, t2 = M.relative_pose_errors(moved, gt)
    assert r1.max() > 1                                                      # the noise is visible
    torch.testing.assert_close(r1, r2, atol=1e-6, rtol=0)
    torch.testing.assert_close(t1, t2, atol=1e-6, rtol=0)


def test_rotating_one_camera_about_its_centre_gives_exactly_that_angle():
    gt = random_cameras(5, seed=5)
    pred = gt.clone()
    Q = axis_angle(torch.tensor([0.3, -1.0, 0.5], dtype=D), 12.5)
    pred[2, :, :3] = Q @ gt[2, :, :3]                                        # centre -Rᵀt unchanged
    pred[2, :, 3] = Q @ gt[2, :, 3]
    rot, _ = M.relative_pose_errors(pred, gt)
    pairs = torch.combinations(torch.arange(5), 2)
    involves = (pairs == 2).any(1)
    torch.testing.assert_close(rot[involves], torch.full((4,), 12.5, dtype=D), atol=1e-9, rtol=0)
    assert rot[~involves].max() < 1e-5


@pytest.mark.parametrize("theta, expected", [(15.5, 0.5), (7.25, 23 / 30), (29.9, 1 / 30), (0.4, 1.0), (31.0, 0.0)])
def test_known_angle_on_real_poses_gives_the_analytic_auc(theta, expected):
    # Two cameras; camera 0 rotated about the axis of the relative translation: the rotation error is
    # theta and the translation-direction error 0, so AUC@30 = (30 - floor(theta)) / 30.
    gt = random_cameras(2, seed=6)
    rel_t = gt[0, :, 3] - gt[0, :, :3] @ gt[1, :, :3].T @ gt[1, :, 3]
    Q = axis_angle(rel_t, theta)
    pred = gt.clone()
    pred[0, :, :3], pred[0, :, 3] = Q @ gt[0, :, :3], Q @ gt[0, :, 3]
    rot, trans = M.relative_pose_errors(pred, gt)
    assert abs(rot.item() - theta) < 1e-9 and trans.item() < 1e-5
    assert M.pose_auc(rot, trans, 30) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("e, expected", [(0.0, 1.0), (15.5, 0.5), (29.9, 1 / 30), (30.0, 1 / 30), (30.01, 0.0),
                                         (45.0, 0.0)])
def test_constant_error_auc_table(e, expected):
    rot = torch.full((45,), e, dtype=D)
    assert M.pose_auc(rot, torch.zeros(45, dtype=D), 30) == pytest.approx(expected, abs=1e-12)
    assert M.pose_auc(torch.zeros(45, dtype=D), rot, 30) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("T", [3, 5, 15, 30])
def test_auc_matches_the_histogram_reference(T):
    gen = np.random.default_rng(7)
    rot, trans = gen.uniform(0, 40, 500), gen.uniform(0, 40, 500)
    rot[:5] = [0, 1, T - 1, T, 2.999999]                                      # bin edges
    got = M.pose_auc(torch.from_numpy(rot), torch.from_numpy(trans), T)
    assert got == pytest.approx(reference_auc(rot, trans, T), abs=1e-12)


def test_rra_rta_are_strict_and_count_nan_as_failure():
    rot = torch.tensor([2.9, 3.0, math.nan, 10.0], dtype=D)
    trans = torch.tensor([0.0, 0.0, 0.0, 4.0], dtype=D)
    m = M.pose_metrics(rot, trans, thresholds=(3, 5))
    assert m["rra3"] == 0.25 and m["rra5"] == 0.5 and m["rta3"] == 0.75 and m["rta5"] == 1.0
    # AUC@5: max errors 2.9, 3.0, NaN(fail), 10 -> k=1..5: 0,0,1/4,2/4,2/4 -> mean 0.25
    assert m["auc5"] == pytest.approx(0.25)


def test_zero_translation_gives_ninety_degrees():
    gt = random_cameras(4, seed=8)
    pred = gt.clone()
    pred[:, :, 3] = 0                                                         # every centre at the origin
    _, trans = M.relative_pose_errors(pred, gt)
    torch.testing.assert_close(trans, torch.full_like(trans, 90.0))
    assert M.translation_error_deg(torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)).item() == pytest.approx(90.0)


def test_nan_predictions_give_defined_failures():
    gt = random_cameras(3, seed=9)
    pred = gt.clone()
    pred[0] = math.nan
    rot, trans = M.relative_pose_errors(pred, gt)
    assert torch.isnan(rot[:2]).all() and not torch.isnan(rot[2])            # pairs (0,1), (0,2)
    assert (trans[:2] == M.NONFINITE_TRANS_ERR_DEG).all()
    assert M.pose_auc(rot, trans, 30) == pytest.approx(1 / 3)


def test_degenerate_shapes():
    one = random_cameras(1)
    rot, trans = M.relative_pose_errors(one, one)
    assert rot.numel() == trans.numel() == 0
    assert math.isnan(M.pose_auc(rot, trans)) and all(math.isnan(v) for v in M.pose_metrics(rot, trans).values())
    ext = random_cameras(4, seed=10)
    ext4 = torch.cat([ext, torch.tensor([0, 0, 0, 1.0], dtype=D).expand(4, 1, 4)], 1)
    torch.testing.assert_close(M.relative_pose_errors(ext4, ext)[0], M.relative_pose_errors(ext, ext)[0])
    with pytest.raises(ValueError, match="pred_extrinsics"):
        M.relative_pose_errors(ext[:, :2], ext)
    with pytest.raises(ValueError, match="frames"):
        M.relative_pose_errors(ext[:3], ext)
    with pytest.raises(ValueError, match="max_threshold"):
        M.pose_auc(rot, trans, 0)


def test_category_aggregation_by_hand():
    errs = {"a": [(torch.tensor([1.5, 40.0]), torch.tensor([0.0, 0.0]))],
            "b": [(torch.tensor([0.5]), torch.tensor([0.2])), (torch.tensor([2.5]), torch.tensor([0.0]))]}
    out = M.category_pose_metrics(errs, thresholds=(3,))
    # a: errors 1.5, 40 -> k=1..3: 0, 1/2, 1/2 -> 1/3; b: errors 0.5, 2.5 -> 1/2, 1/2, 1 -> 2/3
    assert out["a"]["auc3"] == pytest.approx(1 / 3) and out["b"]["auc3"] == pytest.approx(2 / 3)
    assert out["mean"]["auc3"] == pytest.approx(0.5) and out["mean"]["rra3"] == pytest.approx(0.75)
    per_cat, mean = M.per_category_mean([1.0, 3.0, 10.0], ["x", "x", "y"])
    assert per_cat == {"x": 2.0, "y": 10.0} and mean == 6.0
    assert math.isnan(M.category_mean({"x": 1.0, "y": math.nan}))
    assert M.category_mean({"x": 1.0, "y": math.nan}, skip_nan=True) == 1.0


# ----------------------------------------------------------------------------------------- alignment
def test_umeyama_recovers_a_random_similarity():
    gen = torch.Generator().manual_seed(11)
    src = torch.randn(200, 3, generator=gen, dtype=D)
    R = random_rotation(gen)
    t = torch.tensor([0.5, -3.0, 2.0], dtype=D)
    dst = 2.5 * src @ R.T + t
    s_hat, R_hat, t_hat = M.umeyama(src, dst)
    assert abs(s_hat.item() - 2.5) < 1e-9
    assert (R_hat - R).abs().max() < 1e-9 and (t_hat - t).abs().max() < 1e-9
    s1, R1, t1 = M.umeyama(src, src @ R.T + t, with_scale=False)
    assert s1.item() == 1.0 and (R1 - R).abs().max() < 1e-9
    assert M.umeyama(src.float(), dst.float())[1].dtype == torch.float32
    src[0, 1] = math.nan                                                      # dropped row
    assert (M.umeyama(src, dst)[1] - R).abs().max() < 1e-9


def test_umeyama_degenerate_inputs_are_all_nan():
    empty = torch.zeros(0, 3, dtype=D)
    for s, R, t in (M.umeyama(empty, empty), M.umeyama(torch.ones(5, 3, dtype=D), torch.randn(5, 3, dtype=D))):
        assert torch.isnan(s) and torch.isnan(R).all() and torch.isnan(t).all()
    with pytest.raises(ValueError, match="src"):
        M.umeyama(torch.zeros(4, 2), torch.zeros(4, 2))


def surface_points(n: int = 3000, seed: int = 12) -> torch.Tensor:
    """Points on a unit sphere plus a plane patch: a cloud whose ICP solution is unique."""
    gen = torch.Generator().manual_seed(seed)
    sph = torch.randn(n, 3, generator=gen, dtype=D)
    sph = sph / sph.norm(dim=-1, keepdim=True)
    plane = torch.cat([torch.rand(n, 2, generator=gen, dtype=D) * 4 - 2, torch.full((n, 1), -1.0, dtype=D)], -1)
    return torch.cat([sph, plane])


def test_icp_recovers_a_small_rigid_motion_and_stays_put_without_matches():
    pts = surface_points()
    R = axis_angle(torch.tensor([0.2, 1.0, -0.3], dtype=D), 2.0)
    t = torch.tensor([0.02, -0.01, 0.03], dtype=D)
    res = M.icp(pts @ R.T + t, pts, max_distance=0.5, max_iterations=100)
    moved = M.apply_sim3(pts @ R.T + t, 1.0, res.R, res.t)
    assert (moved - pts).norm(dim=-1).max() < 1e-4 and res.fitness == 1.0
    far = M.icp(pts + 100.0, pts, max_distance=0.1)
    assert torch.equal(far.R, torch.eye(3, dtype=D)) and far.t.abs().max() == 0 and far.fitness == 0.0


def test_nearest_neighbors_match_brute_force():
    gen = torch.Generator().manual_seed(13)
    q, r = torch.randn(50, 3, generator=gen, dtype=D), torch.randn(80, 3, generator=gen, dtype=D)
    d, i = M.nearest_neighbors(q, r)
    full = torch.cdist(q, r)
    torch.testing.assert_close(d, full.min(1).values)
    assert torch.equal(i, full.argmin(1))
    d0, i0 = M.nearest_neighbors(q, torch.zeros(0, 3))
    assert torch.isinf(d0).all() and (i0 == -1).all()


# ------------------------------------------------------------------------------------- point metrics
def test_prediction_equal_to_gt_under_sim3_scores_zero_and_nc_one():
    gt = surface_points(1500)
    gen = torch.Generator().manual_seed(14)
    pred = M.apply_sim3(gt, 0.2, random_rotation(gen), torch.tensor([3.0, 1.0, -2.0], dtype=D))
    m = M.point_cloud_metrics(pred, gt)
    for key in ("acc", "comp", "chamfer", "acc_med", "comp_med"):
        assert m[key] < 1e-9, key
    assert m["nc"] == pytest.approx(1.0, abs=1e-9) and m["empty"] == 0.0


def test_plane_shift_without_alignment_gives_the_shift():
    g = torch.linspace(-1, 1, 60, dtype=D)
    u, v = torch.meshgrid(g, g, indexing="ij")
    gt = torch.stack([u, v, torch.zeros_like(u)], -1).reshape(-1, 3)
    m = M.point_cloud_metrics(gt + torch.tensor([0, 0, 0.01], dtype=D), gt, align=False, use_icp=False)
    assert m["acc"] == pytest.approx(0.01, abs=1e-12) and m["comp"] == pytest.approx(0.01, abs=1e-12)
    assert m["chamfer"] == pytest.approx(0.01, abs=1e-12) and m["nc"] == pytest.approx(1.0, abs=1e-9)


def test_point_metrics_are_invariant_to_sim3_of_the_prediction():
    gt = surface_points(800, seed=15)
    pred = gt + 0.01 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(16), dtype=D)
    gen = torch.Generator().manual_seed(17)
    moved = M.apply_sim3(pred, 5.0, random_rotation(gen), torch.tensor([10.0, -4.0, 2.0], dtype=D))
    a, b = M.point_cloud_metrics(pred, gt, icp_threshold=0.1), M.point_cloud_metrics(moved, gt, icp_threshold=0.1)
    assert a["acc"] > 1e-3
    for key in ("acc", "comp", "chamfer", "nc", "acc_med"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_point_metrics_degenerate_inputs():
    gt = surface_points(100)
    empty = M.point_cloud_metrics(gt, gt, valid=torch.zeros(gt.shape[0], dtype=torch.bool))
    assert empty["empty"] == 1.0 and math.isnan(empty["chamfer"]) and empty["n_points"] == 0
    pred = gt.clone()
    pred[:10] = math.nan
    m = M.point_cloud_metrics(pred, gt)
    assert m["dropped_nonfinite"] == 10 and m["n_points"] == gt.shape[0] - 10 and m["acc"] < 1e-9
    collapsed = M.point_cloud_metrics(torch.ones_like(gt), gt)
    assert collapsed["empty"] == 0.0 and math.isnan(collapsed["acc"])
    with pytest.raises(ValueError, match="valid"):
        M.point_cloud_metrics(gt, gt, valid=torch.ones(3, dtype=torch.bool))


def test_normals_of_a_plane_and_tiny_clouds():
    gt = surface_points(500)[500:]                                            # the plane z = -1
    n = M.estimate_normals(gt)
    torch.testing.assert_close(n[:, 2].abs(), torch.ones(500, dtype=D))
    torch.testing.assert_close(M.estimate_normals(gt[:2]), torch.tensor([[0, 0, 1.0]] * 2, dtype=D))


def test_depth_metrics_by_hand():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    pred = torch.tensor([[1.1, 3.0], [4.0, 7.0]])
    m = M.depth_metrics(pred, gt)                                             # the gt = 0 pixel is invalid
    assert m["abs_rel"] == pytest.approx((0.1 + 0.5 + 0.0) / 3) and m["delta1"] == pytest.approx(2 / 3)
    assert M.depth_metrics(2 * gt, gt, median_scale=True)["abs_rel"] == pytest.approx(0.0)
    assert M.depth_metrics(-gt, gt)["delta1"] == 0.0
    empty = M.depth_metrics(gt, torch.zeros_like(gt))
    assert math.isnan(empty["abs_rel"]) and empty["n_pixels"] == 0
