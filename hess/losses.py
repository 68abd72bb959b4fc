"""Training targets and losses of the embedded tiny VGGT (``hess.train``).

* ``make_batch``: bank tensors → normalised GT (frame-0 camera frame, mean point distance 1, VGGT's
  normalisation), optional horizontal mirror, pose encodings and patch-level cross-view targets.
* ``camera_loss`` (VGGT: L1 on T, quaternion and ½·FoV, summed over the refinement iterations with
  weights γ^(n-1-i)), ``point_loss`` (confidence-weighted L1, ``c·|p-g| - α·log c``).
* ``AttentionProbe``: a dense attention core that also keeps the logits of chosen heads, and
  ``attention_match_loss``: cross-entropy that puts a frame-i patch query's attention (over ALL keys
  of the sequence) on the frame-j (j ≠ i) key patches that hold its GT correspondence.
* ``location_loss``: the training-only head predicts, from a frame-i patch token, where the 3-D point
  at the patch centre projects in frame 0 (normalised to [-1, 1]); this needs frame 0's content.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hess.data.geometry import unproject_depth
from hess.models.pose import extri_intri_to_pose_encoding


def make_batch(bank: dict[str, Tensor], scene_idx: Tensor, frames: Tensor, mirror: Tensor,
               patch: int = 14) -> dict[str, Tensor]:
    """Normalised inputs and targets of one batch.

    Args:
        bank: ``images`` [N, V, 3, H, W] uint8, ``depth`` [N, V, H, W], ``extrinsics`` [N, V, 3, 4],
            ``intrinsics`` [N, V, 3, 3].
        scene_idx: [B] long; frames: [B, S] long (order = input order; column 0 is the reference);
        mirror: [B] bool, flip each chosen scene left-right (a mirrored world is still a rigid scene).
    Returns:
        images [B, S, 3, H, W], points [B, S, H, W, 3] (frame-0 coords), valid [B, S, H, W],
        extrinsics [B, S, 3, 4], intrinsics [B, S, 3, 3], pose_enc [B, S, 9],
        match [B, S, Pi, S] long (key patch of frame j holding frame-i patch p's point, -1 if unseen),
        loc0 [B, S, Pi, 2] (patch-centre point projected into frame 0, normalised), loc0_valid [B, S, Pi].
    """
    B, S = frames.shape
    gather = lambda t: t[scene_idx[:, None], frames]                          # noqa: E731
    images = gather(bank["images"]).float() / 255.0
    depth, E, K = gather(bank["depth"]).double(), gather(bank["extrinsics"]).double(), gather(bank["intrinsics"]).double()
    H, W = images.shape[-2:]
    valid = depth > 0
    pts = torch.stack([unproject_depth(depth[b], K[b], E[b]) for b in range(B)])    # world, [B, S, H, W, 3]
    R0, t0 = E[:, 0, :, :3], E[:, 0, :, 3]
    pts = torch.einsum("bij,bshwj->bshwi", R0, pts) + t0[:, None, None, None]
    dist = (pts.norm(dim=-1) * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp(min=1)
    s = 1.0 / dist.clamp(min=1e-6)
    R = E[..., :3] @ R0.transpose(1, 2)[:, None]
    t = E[..., 3] - (R @ t0[:, None, :, None])[..., 0]
    t = t * s[:, None, None]
    pts = pts * s[:, None, None, None, None]
    depth = depth * s[:, None, None, None]
    if mirror.any():                                                          # x -> -x in every camera
        Fm = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=R.dtype))
        m = mirror.to(torch.bool)
        R[m] = Fm @ R[m] @ Fm
        t[m] = t[m] * Fm.diagonal()
        pts[m] = pts[m].flip(-2) * Fm.diagonal()
        images[m], depth[m], valid[m] = images[m].flip(-1), depth[m].flip(-1), valid[m].flip(-1)
        K = K.clone()
        K[m, :, 0, 2] = (W - 1) - K[m, :, 0, 2]
    ext = torch.cat([R, t[..., None]], -1)
    pose_enc = extri_intri_to_pose_encoding(ext.float(), K.float(), (H, W))
    # ---- patch-level cross-view targets (patch centre pixel) -------------------------------------
    h, w = H // patch, W // patch
    c = patch // 2
    pc = pts[:, :, c::patch, c::patch][:, :, :h, :w].reshape(B, S, h * w, 3)  # [B, S, Pi, 3]
    vc = valid[:, :, c::patch, c::patch][:, :, :h, :w].reshape(B, S, h * w)
    cam = torch.einsum("bjxy,bipy->bipjx", R, pc) + t[:, None, None]         # [B, S_i, Pi, S_j, 3]
    z = cam[..., 2]
    uv = torch.einsum("bjxy,bipjy->bipjx", K, cam)[..., :2] / z.clamp(min=1e-9)[..., None]
    u, v = uv[..., 0], uv[..., 1]
    col, row = torch.floor((u + 0.5) / patch), torch.floor((v + 0.5) / patch)
    inside = vc[..., None] & (z > 1e-6) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    ui = torch.nan_to_num(u.round(), nan=0.0).long().clamp(0, W - 1)
    vi = torch.nan_to_num(v.round(), nan=0.0).long().clamp(0, H - 1)
    bidx = torch.arange(B)[:, None, None, None]
    jidx = torch.arange(S)[None, None, None, :]
    dj = depth[bidx, jidx, vi, ui]
    seen = inside & valid[bidx, jidx, vi, ui] & ((z - dj).abs() <= 0.03 * z.abs())
    match = torch.where(seen, (row * w + col).long(), torch.full_like(col, -1).long())
    eye = torch.eye(S, dtype=torch.bool)[None, :, None, :]
    match = torch.where(eye, torch.full_like(match, -1), match)
    loc0 = torch.stack([u[..., 0] / W * 2 - 1, v[..., 0] / H * 2 - 1], -1)   # into frame 0
    loc0_valid = vc & (z[..., 0] > 1e-6) & (loc0.abs() < 3).all(-1)
    return {"images": images, "points": pts.float(), "valid": valid, "extrinsics": ext.float(),
            "intrinsics": K.float(), "pose_enc": pose_enc, "match": match,
            "loc0": torch.nan_to_num(loc0).clamp(-3, 3).float(), "loc0_valid": loc0_valid}


def camera_loss(pose_enc_list: list[Tensor], target: Tensor, gamma: float = 0.6) -> Tensor:
    """VGGT camera loss. pose_enc_list: n × [B, S, 9]; target: [B, S, 9] → scalar."""
    n = len(pose_enc_list)
    total = target.new_zeros(())
    for i, pred in enumerate(pose_enc_list):
        err = (pred - target).abs()
        term = err[..., :3].mean() + err[..., 3:7].mean() + 0.5 * err[..., 7:].mean()
        total = total + gamma ** (n - 1 - i) * term
    return total


def point_loss(points: Tensor, conf: Tensor, target: Tensor, valid: Tensor, alpha: float = 0.2) -> Tensor:
    """Confidence-weighted L1. points, target: [B, S, H, W, 3]; conf, valid: [B, S, H, W] → scalar."""
    err = (points - target).abs().sum(-1)
    per = conf * err - alpha * torch.log(conf.clamp(min=1e-6))
    return per[valid].mean() if valid.any() else per.sum() * 0


class AttentionProbe(nn.Module):
    """Dense core (SDPA) that also stores the logits ``q_h k_hᵀ/√D`` [B, h, N, N] of ``heads``.

    q, k, v: [B, H, N, D] → [B, H, N, D], identical to ``DenseCore``.  ``heads = None``: every head
    (needed when the match loss pools the attention of all heads, ``ATTENTION_POOLS["mean"]``).
    """

    def __init__(self, heads: Optional[Sequence[int]] = (0,)) -> None:
        super().__init__()
        self.heads = None if heads is None else list(heads)
        self.logits: Optional[Tensor] = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        qh, kh = (q, k) if self.heads is None else (q[:, self.heads], k[:, self.heads])
        self.logits = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5     # [B, h, N, N]
        return F.scaled_dot_product_attention(q, k, v)


def _each_head(logp: Tensor) -> Tensor:
    """[B, h, ..., N] log-attention per head → unchanged: every probed head is supervised on its own."""
    return logp


def _head_mean(logp: Tensor) -> Tensor:
    """[B, h, ..., N] → [B, 1, ..., N]: log of the head-averaged attention, log(1/h Σ_h softmax_h).

    The layer as a whole must attend to the match; WHICH heads carry it is left to training."""
    return torch.logsumexp(logp, dim=1, keepdim=True) - math.log(logp.shape[1])


#: How the attention of the probed heads is pooled before the match cross-entropy.
ATTENTION_POOLS = {"each": _each_head, "mean": _head_mean}


def attention_match_loss(logits: Tensor, match: Tensor, num_special: int, pool: str = "each") -> Tensor:
    """Cross-entropy of supervised heads' attention onto GT cross-view matches.

    Args:
        logits: [B, h, N, N] with N = S·P, P = num_special + Pi.
        match: [B, S, Pi, S] key patch index in frame j (-1: no visible match; j = i is -1).
        pool: ``ATTENTION_POOLS`` key: ``"each"`` supervises every probed head on its own,
            ``"mean"`` the head-averaged attention of the layer (no head is hard-wired to match).
    Returns:
        mean over (pooled head, query with ≥ 1 match) of -mean_targets log attention[target].
    """
    if pool not in ATTENTION_POOLS:
        raise ValueError(f"attention pool must be one of {sorted(ATTENTION_POOLS)}, got {pool!r}")
    B, _, N, _ = logits.shape
    _, S, Pi, _ = match.shape
    P = num_special + Pi
    logp = logits.float().log_softmax(-1).reshape(B, -1, S, P, N)[:, :, :, num_special:]  # [B, h, S, Pi, N]
    logp = ATTENTION_POOLS[pool](logp)
    h = logp.shape[1]
    key = torch.arange(S)[None, None, None, :] * P + num_special + match.clamp(min=0)      # [B, S, Pi, S]
    ok = (match >= 0).float()
    picked = logp.gather(-1, key[:, None].expand(B, h, S, Pi, S))                         # [B, h, S, Pi, S]
    count = ok.sum(-1)                                                                    # [B, S, Pi]
    per_query = -(picked * ok[:, None]).sum(-1) / count.clamp(min=1)[:, None]
    has = (count > 0)[:, None].expand_as(per_query)
    return per_query[has].mean() if has.any() else logits.sum() * 0


class LocationHead(nn.Module):
    """Training-only head: patch token [.., 2C] → location of its point in frame 0, in [-1, 1]² units."""

    def __init__(self, dim_in: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, dim_in // 2), nn.GELU(),
                                 nn.Linear(dim_in // 2, 2))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)


def location_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """L1 on the frame-0 location. pred, target: [B, S, Pi, 2]; valid: [B, S, Pi] → scalar."""
    err = (pred - target).abs().sum(-1)
    return err[valid].mean() if valid.any() else pred.sum() * 0


class PoseProbes(nn.Module):
    """Training-only deep supervision: one linear map per aggregator layer, camera token [.., 2C] → [.., 9].

    It gives the camera token of EVERY layer a direct pose gradient, so that it starts pooling the
    cross-view evidence of the patch tokens early instead of settling on a constant.
    """

    def __init__(self, dim_in: int, num_layers: int) -> None:
        super().__init__()
        self.probes = nn.ModuleList(nn.Linear(dim_in, 9) for _ in range(num_layers))

    def forward(self, tokens: list[Tensor]) -> list[Tensor]:
        """tokens: L × [B, S, P, 2C] → L × [B, S, 9]."""
        return [p(t[:, :, 0]) for p, t in zip(self.probes, tokens)]


def _relative_translations(enc: Tensor) -> Tensor:
    """enc: [B, S, 9] → translations of T_i·T_j⁻¹ for all pairs i < j: [B, S(S-1)/2, 3]."""
    from hess.models.pose import quat_to_mat

    R, t = quat_to_mat(enc[..., 3:7]), enc[..., :3]
    i, j = torch.triu_indices(enc.shape[1], enc.shape[1], 1, device=enc.device)
    Rij = R[:, i] @ R[:, j].transpose(-1, -2)
    return t[:, i] - (Rij @ t[:, j, :, None])[..., 0]


def translation_direction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean 1 - cos between predicted and GT relative translations of every frame pair i < j (the
    direction the pose metric scores, VGGT ``T_i·T_j⁻¹``). pred, target: [B, S, 9] → scalar."""
    tp, tg = _relative_translations(pred), _relative_translations(target)
    ok = tg.norm(dim=-1) > 1e-6
    cos = F.cosine_similarity(tp, tg, dim=-1, eps=1e-6)
    return (1 - cos)[ok].mean() if ok.any() else pred.sum() * 0
