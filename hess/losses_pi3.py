"""Training losses of the embedded tiny π³ (``hess train --family pi3``): reference-frame free.

π³ predicts every camera and every local point map in ITS OWN arbitrary world frame and scale, so its
losses compare only what is invariant to that choice (π³ paper, §3.3, in our simplified form):

* ``optimal_scale``: the least-squares scale s* that maps the predicted local points onto the GT ones
  (per sequence, detached: it is an alignment, not a prediction);
* ``local_point_loss``: depth-normalised L1 between s*·local_points and the GT camera-frame points;
* ``relative_pose_loss``: for every ordered pair i ≠ j, the relative pose ``T_i⁻¹·T_j`` (camera j → camera i)
  against GT; rotation by the chordal (Frobenius) distance, translation (scaled by s*) by Huber;
* ``confidence_loss``: BCE of the confidence logit against "this pixel's normalised error < τ".

The cross-view attention supervision (``hess.losses.attention_match_loss``) applies unchanged: π³'s
global tokens are frame-major ``[registers ×5, patches]`` per frame, like VGGT's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hess.models.pose import closed_form_inverse_se3


def gt_local_points(points: Tensor, extrinsics: Tensor) -> Tensor:
    """points [B, S, H, W, 3] (any world frame), extrinsics [B, S, 3, 4] world→camera → [B, S, H, W, 3] camera frame."""
    R, t = extrinsics[..., :3], extrinsics[..., 3]
    return torch.einsum("bsij,bshwj->bshwi", R, points) + t[:, :, None, None]


def optimal_scale(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """argmin_s Σ_valid |s·pred − gt|² per sequence (detached, clamped > 0).

    pred, gt: [B, S, H, W, 3]; valid: [B, S, H, W] → [B].
    """
    m = valid[..., None].to(pred.dtype)
    num = (pred.detach() * gt * m).sum((1, 2, 3, 4))
    den = (pred.detach() ** 2 * m).sum((1, 2, 3, 4)).clamp(min=1e-9)
    return (num / den).clamp(min=1e-4)


def local_point_loss(pred: Tensor, gt: Tensor, valid: Tensor, scale: Tensor) -> Tensor:
    """Mean over valid pixels of |s*·pred − gt|₁ / z_gt. pred, gt: [B, S, H, W, 3]; valid [B, S, H, W]; scale [B]."""
    err = (scale[:, None, None, None, None] * pred - gt).abs().sum(-1) / gt[..., 2].clamp(min=1e-3)
    return err[valid].mean() if valid.any() else pred.sum() * 0


def confidence_loss(conf_logit: Tensor, pred: Tensor, gt: Tensor, valid: Tensor, scale: Tensor,
                    tau: float = 0.1) -> Tensor:
    """BCE of conf_logit [B, S, H, W] against (‖s*·pred − gt‖ / z_gt < τ), on valid pixels."""
    with torch.no_grad():
        err = (scale[:, None, None, None, None] * pred - gt).norm(dim=-1) / gt[..., 2].clamp(min=1e-3)
        target = (err < tau).to(conf_logit.dtype)
    bce = F.binary_cross_entropy_with_logits(conf_logit, target, reduction="none")
    return bce[valid].mean() if valid.any() else conf_logit.sum() * 0


def relative_poses(c2w: Tensor) -> Tensor:
    """c2w [B, S, 4, 4] → T_i⁻¹·T_j for every ordered pair i ≠ j: [B, S·(S−1), 4, 4] (camera j → camera i)."""
    S = c2w.shape[1]
    i, j = torch.where(~torch.eye(S, dtype=torch.bool, device=c2w.device))
    inv = closed_form_inverse_se3(c2w)
    return inv[:, i] @ c2w[:, j]


def relative_pose_loss(pred_c2w: Tensor, gt_w2c: Tensor, scale: Tensor, huber: float = 0.1) -> Tensor:
    """Relative-pose loss over all ordered pairs; pred_c2w [B, S, 4, 4], gt_w2c [B, S, 3, 4], scale [B] → scalar."""
    gt_c2w = closed_form_inverse_se3(gt_w2c)                                  # [B, S, 4, 4]
    rp, rg = relative_poses(pred_c2w), relative_poses(gt_c2w.to(pred_c2w.dtype))
    rot = (rp[..., :3, :3] - rg[..., :3, :3]).pow(2).sum((-1, -2)).add(1e-12).sqrt().mean()
    trans = F.huber_loss(scale[:, None, None] * rp[..., :3, 3], rg[..., :3, 3], delta=huber)
    return rot + trans
