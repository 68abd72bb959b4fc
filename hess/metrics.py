"""The paper's metrics as pure functions (``evaluation.md`` §4). Leaf module: torch, numpy, scipy only.

Pose (VGGT ``test_co3d.py`` convention): all pairs i<j, relative pose ``T_i·T_j⁻¹``, rotation geodesic
error and sign-free translation-direction error in degrees, RRA/RTA@τ and the 1°-staircase AUC@T.
Points (π³ ``mv_recon``): Umeyama Sim(3) on pixel correspondences, rigid point-to-point ICP, then
Acc/Comp (mean and median nearest-neighbour distances), Chamfer = (Acc+Comp)/2 and normal consistency.
Depth: AbsRel and δ<1.25.

Dtypes: every function takes torch tensors of any floating dtype on any device. Pose errors and the
alignment are computed in float64 on the CPU; pose errors come back as float64 tensors, ``umeyama`` and
``icp`` results in the input's dtype on the input's device, *detached* (the calibration applies
stop-gradient to the alignment; ``apply_sim3`` keeps the gradient through the points).

Degenerate inputs never crash (documented per function): NaN rotations give NaN rotation errors (a
failure at every threshold), non-finite translation errors become 1e6 rad, a zero translation gives a
90° direction error, an empty pair set gives NaN metrics, an empty point mask gives NaN point metrics
with ``empty = 1.0``, a collapsed prediction gives an all-NaN Umeyama result.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

Tensor = torch.Tensor

EPS = 1e-15                                  # the clamp of VGGT's angle formulas
NONFINITE_TRANS_ERR_DEG = math.degrees(1e6)  # VGGT replaces NaN/Inf translation errors by 1e6 rad
POSE_THRESHOLDS = (3, 5, 15, 30)


# ----------------------------------------------------------------------------------------------- pose
def _as_4x4(extrinsics: Tensor, name: str) -> Tensor:
    """extrinsics: [S, 3, 4] or [S, 4, 4] world-to-camera -> [S, 4, 4] float64 (CPU)."""
    if not isinstance(extrinsics, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(extrinsics).__name__}")
    if extrinsics.ndim != 3 or tuple(extrinsics.shape[-2:]) not in ((3, 4), (4, 4)):
        raise ValueError(f"{name} must have shape [S, 3, 4] or [S, 4, 4], got {tuple(extrinsics.shape)}")
    ext = extrinsics.detach().to("cpu", torch.float64)
    out = torch.eye(4, dtype=torch.float64).repeat(ext.shape[0], 1, 1)
    out[:, :3, :] = ext[:, :3, :]
    return out


def se3_inverse(T: Tensor) -> Tensor:
    """Closed-form inverse of rigid transforms. T: [..., 4, 4] -> [..., 4, 4]."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1
    return out


def rotation_to_quaternion(R: Tensor) -> Tensor:
    """Unit quaternion (w, x, y, z) of rotation matrices, Shepperd's branch-free choice of the largest
    diagonal term. R: [..., 3, 3] -> [..., 4]. NaN in gives NaN out."""
    m = R.reshape(*R.shape[:-2], 9).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    four_sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                           1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)   # 4·(w², x², y², z²)
    q_abs = torch.sqrt(four_sq.clamp(min=0))                                 # 2·|w|, 2·|x|, ...
    cand = torch.stack([
        torch.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, four_sq[..., 1], m10 + m01, m02 + m20], -1),
        torch.stack([m02 - m20, m10 + m01, four_sq[..., 2], m12 + m21], -1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, four_sq[..., 3]], -1),
    ], -2)                                                                   # [..., 4 cand, 4]
    cand = cand / (2 * q_abs.clamp(min=0.1))[..., None]
    best = q_abs.argmax(-1)[..., None, None].expand(*q_abs.shape[:-1], 1, 4)
    q = cand.gather(-2, best).squeeze(-2)
    return q / q.norm(dim=-1, keepdim=True)


def rotation_error_deg(R_gt: Tensor, R_pred: Tensor) -> Tensor:
    """Geodesic angle between rotations, VGGT's quaternion form: arccos(1 - 2·clamp(1 - <q,q'>², 1e-15)).

    R_gt, R_pred: [..., 3, 3] -> [...] degrees in [~3.6e-6, 180] (float64: identical rotations give
    ~3.6e-6° because of the clamp). NaN in gives NaN out.
    """
    q1, q2 = rotation_to_quaternion(R_gt), rotation_to_quaternion(R_pred)
    dot_sq = (q1 * q2).sum(-1) ** 2
    return torch.rad2deg(torch.arccos(1 - 2 * torch.clamp(1 - dot_sq, min=EPS)))


def translation_error_deg(t_gt: Tensor, t_pred: Tensor) -> Tensor:
    """Sign-free angle between translation directions, arccos(|<t̂, t̂'>|) in [0°, 90°].

    t_gt, t_pred: [..., 3] -> [...] degrees. A zero vector on either side gives 90°; a non-finite result
    becomes 1e6 rad (≈5.7e7°), as in VGGT, so it fails every threshold.
    """
    a = t_gt / (t_gt.norm(dim=-1, keepdim=True) + EPS)
    b = t_pred / (t_pred.norm(dim=-1, keepdim=True) + EPS)
    cos_sq = (a * b).sum(-1) ** 2
    err = torch.rad2deg(torch.arccos(torch.sqrt(1 - torch.clamp(1 - cos_sq, min=EPS))))
    return torch.where(torch.isfinite(err), err, torch.full_like(err, NONFINITE_TRANS_ERR_DEG))


def relative_pose_errors(pred_extrinsics: Tensor, gt_extrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair rotation and translation-direction errors of one sequence (VGGT ``T_i·T_j⁻¹``).

    Args:
        pred_extrinsics: [S, 3, 4] or [S, 4, 4] predicted world-to-camera (OpenCV).
        gt_extrinsics: [S, 3, 4] or [S, 4, 4] ground truth, same S.
    Returns:
        rot_err_deg, trans_err_deg: [S·(S-1)/2] float64, pairs i<j in lexicographic order. Both are
        invariant to a global Sim(3) of either world. S < 2 gives empty tensors.
    """
    pred, gt = _as_4x4(pred_extrinsics, "pred_extrinsics"), _as_4x4(gt_extrinsics, "gt_extrinsics")
    if pred.shape[0] != gt.shape[0]:
        raise ValueError(f"pred_extrinsics has {pred.shape[0]} frames but gt_extrinsics has {gt.shape[0]}")
    pairs = torch.combinations(torch.arange(gt.shape[0]), 2)                 # [P, 2]
    if pairs.numel() == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    i, j = pairs[:, 0], pairs[:, 1]
    rel_gt = gt[i] @ se3_inverse(gt[j])                                       # [P, 4, 4]
    rel_pred = pred[i] @ se3_inverse(pred[j])
    rot = rotation_error_deg(rel_gt[:, :3, :3], rel_pred[:, :3, :3])
    trans = translation_error_deg(rel_gt[:, :3, 3], rel_pred[:, :3, 3])
    return rot, trans


def _max_error(rot_err_deg: Tensor, trans_err_deg: Tensor) -> Tensor:
    rot = torch.as_tensor(rot_err_deg, dtype=torch.float64).reshape(-1)
    trans = torch.as_tensor(trans_err_deg, dtype=torch.float64).reshape(-1)
    if rot.shape != trans.shape:
        raise ValueError(f"rot_err_deg has {rot.numel()} pairs but trans_err_deg has {trans.numel()}")
    err = torch.maximum(rot, trans)                                           # NaN propagates
    return torch.nan_to_num(err, nan=math.inf)                                # NaN = failure


def pose_auc(rot_err_deg: Tensor, trans_err_deg: Tensor, max_threshold: int = 30) -> float:
    """AUC@T of ``calculate_auc_np``: (1/T)·Σ_{k=1..T} frac(max(θ_R, θ_t) < k), with ≤ at k = T.

    rot_err_deg, trans_err_deg: [P]. The denominator counts every pair (NaN and > T fail). P = 0 gives NaN.
    """
    if int(max_threshold) != max_threshold or max_threshold < 1:
        raise ValueError(f"max_threshold must be a positive integer, got {max_threshold}")
    err = _max_error(rot_err_deg, trans_err_deg)
    if err.numel() == 0:
        return math.nan
    T = int(max_threshold)
    ks = torch.arange(1, T + 1, dtype=torch.float64)[:, None]                 # [T, 1]
    below = err[None, :] < ks
    below[-1] = err <= T                                                      # the last bin is closed
    return below.double().mean(1).mean().item()


def pose_metrics(rot_err_deg: Tensor, trans_err_deg: Tensor,
                 thresholds: Sequence[int] = POSE_THRESHOLDS) -> dict[str, float]:
    """RRA@τ, RTA@τ (strict <, NaN fails) and AUC@τ: keys ``rra{τ}``, ``rta{τ}``, ``auc{τ}``.

    rot_err_deg, trans_err_deg: [P]. P = 0 gives NaN everywhere.
    """
    rot = torch.as_tensor(rot_err_deg, dtype=torch.float64).reshape(-1)
    trans = torch.as_tensor(trans_err_deg, dtype=torch.float64).reshape(-1)
    _max_error(rot, trans)                                                    # shape check
    out: dict[str, float] = {}
    for tau in thresholds:
        empty = rot.numel() == 0
        out[f"rra{tau}"] = math.nan if empty else (rot < tau).double().mean().item()
        out[f"rta{tau}"] = math.nan if empty else (trans < tau).double().mean().item()
        out[f"auc{tau}"] = pose_auc(rot, trans, tau)
    return out


def category_mean(per_category: Mapping[str, float], skip_nan: bool = False) -> float:
    """Unweighted mean over categories (VGGT's final CO3Dv2 score). NaN propagates unless skip_nan;
    no (remaining) category gives NaN."""
    vals = [float(v) for v in per_category.values() if not (skip_nan and math.isnan(float(v)))]
    return math.fsum(vals) / len(vals) if vals else math.nan


def category_pose_metrics(errors: Mapping[str, Sequence[tuple[Tensor, Tensor]]],
                          thresholds: Sequence[int] = POSE_THRESHOLDS) -> dict[str, dict[str, float]]:
    """VGGT aggregation: pool the pair errors of every sequence of a category, score the pool, then
    average the categories unweighted.

    Args:
        errors: category -> list of (rot_err_deg [P_s], trans_err_deg [P_s]) per sequence.
    Returns:
        {category: pose_metrics, ..., "mean": per-key unweighted mean over categories}. A category named
        "mean" is rejected.
    """
    if "mean" in errors:
        raise ValueError("'mean' is reserved for the category average; rename that category")
    out: dict[str, dict[str, float]] = {}
    for cat, seqs in errors.items():
        rot = torch.cat([torch.as_tensor(r, dtype=torch.float64).reshape(-1) for r, _ in seqs] or [torch.zeros(0)])
        trans = torch.cat([torch.as_tensor(t, dtype=torch.float64).reshape(-1) for _, t in seqs] or [torch.zeros(0)])
        out[cat] = pose_metrics(rot, trans, thresholds)
    keys = next(iter(out.values())).keys() if out else []
    out["mean"] = {k: category_mean({c: m[k] for c, m in out.items()}) for k in keys}
    return out


def per_category_mean(values: Sequence[float], categories: Sequence[str]) -> tuple[dict[str, float], float]:
    """Group per-scene values by category: ({category: mean}, unweighted mean over categories)."""
    if len(values) != len(categories):
        raise ValueError(f"{len(values)} values but {len(categories)} categories")
    groups: dict[str, list[float]] = {}
    for v, c in zip(values, categories):
        groups.setdefault(c, []).append(float(v))
    per_cat = {c: math.fsum(v) / len(v) for c, v in groups.items()}
    return per_cat, category_mean(per_cat)


# ------------------------------------------------------------------------------------------ alignment
def _points(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64)


def umeyama(src: Tensor, dst: Tensor, with_scale: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity with dst ≈ s·R·src + t (Umeyama 1991).

    Args:
        src: [N, 3] source points (prediction); dst: [N, 3] their correspondences (GT).
        with_scale: False fixes s = 1 (Kabsch, used by ICP).
    Returns:
        s: [] scale, R: [3, 3] proper rotation, t: [3]; detached, in src's dtype and device, computed in
        float64. Rows non-finite in src or dst are dropped first. No rows left, or a collapsed src
        (σ² ≤ 1e-30·(1+|μ|²)) with with_scale, gives s, R, t all NaN. Fewer than 3 points or collinear
        points give a valid but non-unique R.
    """
    x, y = _points(src, "src"), _points(dst, "dst")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"src has {x.shape[0]} points but dst has {y.shape[0]}")
    keep = torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1)
    x, y = x[keep], y[keep]
    like = dict(dtype=src.dtype if src.is_floating_point() else torch.float64, device=src.device)
    nan = (torch.tensor(math.nan, **like), torch.full((3, 3), math.nan, **like), torch.full((3,), math.nan, **like))
    if x.shape[0] == 0:
        return nan
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y
    var_x = (xc ** 2).sum(-1).mean()
    if with_scale and var_x <= 1e-30 * (1 + (mu_x ** 2).sum()):
        return nan
    cov = yc.T @ xc / x.shape[0]                                              # Σ = mean (y-μy)(x-μx)ᵀ
    U, D, Vh = torch.linalg.svd(cov)
    S = torch.eye(3, dtype=torch.float64)
    if torch.det(U) * torch.det(Vh) < 0:
        S[2, 2] = -1
    R = U @ S @ Vh
    s = (D * S.diagonal()).sum() / var_x if with_scale else torch.tensor(1.0, dtype=torch.float64)
    t = mu_y - s * R @ mu_x
    return s.to(**like), R.to(**like), t.to(**like)


def apply_sim3(points: Tensor, s: Tensor | float, R: Tensor, t: Tensor) -> Tensor:
    """s·R·p + t for points: [..., 3] (differentiable in points; s, R, t cast to points' dtype/device)."""
    R = torch.as_tensor(R).to(points)
    return torch.as_tensor(s).to(points) * (points @ R.transpose(-1, -2)) + torch.as_tensor(t).to(points)


def nearest_neighbors(query: Tensor, reference: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Euclidean k-NN of each query point in reference, with scipy's cKDTree.

    query: [N, 3], reference: [M, 3] -> dist [N] (k = 1) or [N, k] float64, idx likewise int64 (CPU).
    An empty reference gives dist = inf and idx = -1.
    """
    q, r = _points(query, "query").numpy(), _points(reference, "reference").numpy()
    shape = (q.shape[0],) if k == 1 else (q.shape[0], k)
    if r.shape[0] == 0 or q.shape[0] == 0:
        return torch.full(shape, math.inf, dtype=torch.float64), torch.full(shape, -1, dtype=torch.int64)
    dist, idx = cKDTree(r).query(q, k=k)
    idx = np.where(np.isfinite(dist), idx, -1)                               # k > M pads with inf / M
    return torch.from_numpy(np.asarray(dist, dtype=np.float64)), torch.from_numpy(np.asarray(idx, dtype=np.int64))


class IcpResult(NamedTuple):
    R: Tensor            # [3, 3]
    t: Tensor            # [3]; dst ≈ R·src + t
    fitness: float       # inlier correspondences / source points
    inlier_rmse: float   # RMSE over inlier correspondences (0 with none)
    iterations: int


def icp(src: Tensor, dst: Tensor, max_distance: float, max_iterations: int = 30,
        relative_fitness: float = 1e-6, relative_rmse: float = 1e-6) -> IcpResult:
    """Rigid point-to-point ICP from the identity, with Open3D ``registration_icp``'s loop and stop rule.

    Each iteration matches every (moved) source point to its nearest dst point, keeps pairs closer than
    max_distance, fits a rigid update (Kabsch) and stops once fitness and inlier RMSE both change by less
    than the relative tolerances. No correspondence at all leaves the identity.
    src: [N, 3], dst: [M, 3] -> IcpResult (R, t detached, in src's dtype and device).
    """
    x, y = _points(src, "src").numpy(), _points(dst, "dst").numpy()
    tree = cKDTree(y) if y.shape[0] else None
    R, t = np.eye(3), np.zeros(3)

    def match(moved: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        if tree is None or moved.shape[0] == 0:
            return np.zeros(0, int), np.zeros(0, int), 0.0, 0.0
        d, j = tree.query(moved, k=1, distance_upper_bound=max_distance)
        ok = np.isfinite(d)
        src_i = np.nonzero(ok)[0]
        rmse = float(np.sqrt(np.mean(d[ok] ** 2))) if ok.any() else 0.0
        return src_i, j[ok], ok.sum() / moved.shape[0], rmse

    moved = x.copy()
    src_i, dst_i, fit, rmse = match(moved)
    it = 0
    for it in range(1, max_iterations + 1):
        if src_i.size == 0:
            break
        _, dR, dt = umeyama(torch.from_numpy(moved[src_i]), torch.from_numpy(y[dst_i]), with_scale=False)
        dR, dt = dR.numpy(), dt.numpy()
        R, t = dR @ R, dR @ t + dt
        moved = moved @ dR.T + dt
        prev_fit, prev_rmse = fit, rmse
        src_i, dst_i, fit, rmse = match(moved)
        if abs(prev_fit - fit) < relative_fitness and abs(prev_rmse - rmse) < relative_rmse:
            break
    like = dict(dtype=src.dtype if src.is_floating_point() else torch.float64, device=src.device)
    return IcpResult(torch.from_numpy(R).to(**like), torch.from_numpy(t).to(**like), float(fit), float(rmse), it)


# ------------------------------------------------------------------------------------- point metrics
def estimate_normals(points: Tensor, k: int = 30, chunk: int = 200_000) -> Tensor:
    """Unoriented PCA normals over the k nearest neighbours (the point included), like Open3D's
    ``estimate_normals(KNN(k))``. points: [N, 3] -> [N, 3] float64 unit vectors; N < 3 gives (0, 0, 1)."""
    p = _points(points, "points")
    n = p.shape[0]
    if n < 3:
        return torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).repeat(n, 1)
    _, idx = nearest_neighbors(p, p, k=min(k, n))
    idx = idx.reshape(n, -1)
    out = torch.empty(n, 3, dtype=torch.float64)
    for a in range(0, n, chunk):
        nb = p[idx[a:a + chunk]]                                              # [c, k, 3]
        nb = nb - nb.mean(1, keepdim=True)
        cov = nb.transpose(1, 2) @ nb                                         # [c, 3, 3]
        out[a:a + chunk] = torch.linalg.eigh(cov)[1][..., 0]                  # smallest eigenvalue
    return out


def _dist_stats(d: Tensor) -> tuple[float, float]:
    return d.mean().item(), d.median().item()


def point_cloud_metrics(pred: Tensor, gt: Tensor, valid: Tensor | None = None, *, align: bool = True,
                        use_icp: bool = True, icp_threshold: float | None = None,
                        normal_k: int = 30, normals: bool = True) -> dict[str, float]:
    """Acc, Comp (mean and median NN distances), Chamfer and normal consistency of one scene.

    Args:
        pred: [..., 3] predicted points (e.g. [S, H, W, 3]), gt: same shape, GT world points.
        valid: [...] bool GT validity (default all); pixels with non-finite pred or gt are also dropped
            (``dropped_nonfinite`` counts them).
        align: Umeyama Sim(3) of pred onto gt on the kept correspondences first.
        use_icp: then rigid ICP with max distance ``icp_threshold`` (default 0.1 × GT scale, the RMS
            distance of GT points to their centroid; use 100 for DTU in mm, 0.1 for metre datasets).
    Returns:
        acc, acc_med, comp, comp_med, chamfer = (acc+comp)/2, nc1, nc1_med, nc2, nc2_med, nc, nc_med,
        n_points, dropped_nonfinite, empty (1.0 when nothing is left: every metric is then NaN).
        ``normals=False`` skips the normal estimation (the nc keys are then NaN).
        Units follow the GT; no outlier cutoff.
    """
    if pred.shape != gt.shape or pred.shape[-1] != 3:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must both be [..., 3] and equal")
    p, g = pred.detach().to("cpu", torch.float64).reshape(-1, 3), gt.detach().to("cpu", torch.float64).reshape(-1, 3)
    mask = torch.ones(p.shape[0], dtype=torch.bool) if valid is None else valid.detach().cpu().reshape(-1).bool()
    if mask.shape[0] != p.shape[0]:
        raise ValueError(f"valid has {mask.shape[0]} entries, expected {p.shape[0]}")
    finite = torch.isfinite(p).all(-1) & torch.isfinite(g).all(-1)
    out = {"dropped_nonfinite": float((mask & ~finite).sum())}
    mask &= finite
    p, g = p[mask], g[mask]
    keys = ("acc", "acc_med", "comp", "comp_med", "chamfer", "nc1", "nc1_med", "nc2", "nc2_med", "nc", "nc_med")
    out["n_points"] = float(p.shape[0])
    if p.shape[0] == 0:
        return {**{k: math.nan for k in keys}, **out, "empty": 1.0}
    if align:
        s, R, t = umeyama(p, g)
        if not torch.isfinite(s):                                             # collapsed prediction
            return {**{k: math.nan for k in keys}, **out, "empty": 0.0}
        p = apply_sim3(p, s, R, t)
    if use_icp:
        gt_scale = (g - g.mean(0)).pow(2).sum(-1).mean().sqrt().item()          # RMS distance to the centroid
        thr = icp_threshold if icp_threshold is not None else 0.1 * gt_scale
        res = icp(p, g, max(thr, 1e-12))
        p = apply_sim3(p, 1.0, res.R, res.t)
    d_pg, i_pg = nearest_neighbors(p, g)                                      # accuracy: pred -> GT
    d_gp, i_gp = nearest_neighbors(g, p)                                      # completeness: GT -> pred
    out["acc"], out["acc_med"] = _dist_stats(d_pg)
    out["comp"], out["comp_med"] = _dist_stats(d_gp)
    out["chamfer"] = (out["acc"] + out["comp"]) / 2
    if not normals:
        return {**out, **{k: math.nan for k in keys if k.startswith("nc")}, "empty": 0.0}
    n_p, n_g = estimate_normals(p, normal_k), estimate_normals(g, normal_k)
    nc1 = (n_p * n_g[i_pg]).sum(-1).abs()
    nc2 = (n_g * n_p[i_gp]).sum(-1).abs()
    out["acc"], out["acc_med"] = _dist_stats(d_pg)
    out["comp"], out["comp_med"] = _dist_stats(d_gp)
    out["chamfer"] = (out["acc"] + out["comp"]) / 2
    out["nc1"], out["nc1_med"] = _dist_stats(nc1)
    out["nc2"], out["nc2_med"] = _dist_stats(nc2)
    out["nc"], out["nc_med"] = (out["nc1"] + out["nc2"]) / 2, (out["nc1_med"] + out["nc2_med"]) / 2
    return {**out, "empty": 0.0}


def depth_metrics(pred_depth: Tensor, gt_depth: Tensor, valid: Tensor | None = None,
                  median_scale: bool = False) -> dict[str, float]:
    """AbsRel = mean |d - d*| / d* and δ<1.25 = mean(max(d/d*, d*/d) < 1.25) over valid pixels.

    pred_depth, gt_depth: [...] same shape; valid: [...] bool (default gt > 1e-4). Pixels with non-finite
    pred, or gt ≤ 1e-4, are excluded; pred ≤ 0 fails δ. median_scale rescales pred by
    median(gt)/median(pred) first.
    Returns {"abs_rel", "delta1", "n_pixels"}; no pixel left gives NaN metrics.
    """
    if pred_depth.shape != gt_depth.shape:
        raise ValueError(f"pred_depth {tuple(pred_depth.shape)} and gt_depth {tuple(gt_depth.shape)} differ")
    d, g = pred_depth.detach().to("cpu", torch.float64), gt_depth.detach().to("cpu", torch.float64)
    mask = torch.isfinite(d) & torch.isfinite(g) & (g > 1e-4)
    if valid is not None:
        mask &= valid.detach().cpu().bool()
    d, g = d[mask], g[mask]
    if d.numel() == 0:
        return {"abs_rel": math.nan, "delta1": math.nan, "n_pixels": 0.0}
    if median_scale:
        d = d * (g.median() / d.median())
    ratio = torch.where(d > 0, torch.maximum(d / g, g / d), torch.full_like(d, math.inf))  # d ≤ 0 fails
    return {"abs_rel": ((d - g).abs() / g).mean().item(), "delta1": (ratio < 1.25).double().mean().item(),
            "n_pixels": float(d.numel())}
