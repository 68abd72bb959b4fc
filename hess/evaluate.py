"""Compact evaluation of a VGGT on synthetic scenes (model card, training curves, suite smoke checks).

    scenes = eval_scenes_default("test", 60)                 # shuffled frame order per scene
    m = evaluate_model(model, scenes)                         # dense global attention
    m_local = evaluate_model(model, scenes, attention="frame-local")
    m_sparse = evaluate_model(model, scenes, attention=SparsePlan(keep_ratio=0.1, q_block=12, k_block=6))

Metrics (pooled over all pairs / scenes): pose ``auc30``, ``auc15``, ``rra15``, ``rta15``, ``rra30``,
``rta30`` (VGGT ``T_i·T_j⁻¹`` pair errors, ``hess.metrics``); ``chamfer``: the point maps of ALL frames
(VGGT ``world_points``, i.e. expressed in frame 0's camera frame) against the GT, after one Umeyama
Sim(3) on valid pixels, (Acc + Comp)/2 in units of the GT scene normalisation (mean point distance 1);
``chamfer_f0``: frame 0's point map alone, likewise; ``point_err``: mean per-pixel distance after
that Sim(3) (all frames; unlike Chamfer it sees a frame placed at the wrong pose); ``abs_rel``: frame-0 depth read as the z of its
point map, median-scaled.  Baselines: ``constant_pose_metrics`` and a random-init model.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hess.data.scene import Scene, normalize_scene
from hess.metrics import apply_sim3, depth_metrics, nearest_neighbors, pose_metrics, relative_pose_errors, umeyama

POSE_KEYS = ("auc30", "auc15", "rra15", "rta15", "rra30", "rta30")
ATTENTION_MODES = ("dense", "frame-local", "frame-only")


class FrameLocalCore(nn.Module):
    """Global attention restricted to each query's own frame (+ every frame's special tokens).

    q, k, v: [B, H, N, D] with N = S·P; ``tokens_per_frame`` P and ``num_special`` n_s come from the
    aggregator.  ``keep_special=False`` gives the fully frame-local variant (own frame only).
    """

    def __init__(self, keep_special: bool = True) -> None:
        super().__init__()
        self.keep_special = keep_special

    def forward(self, q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: Optional[int] = None,
                num_special: int = 0, **core_kwargs) -> Tensor:
        if tokens_per_frame is None:
            raise ValueError("FrameLocalCore needs tokens_per_frame (it only applies to global attention)")
        N = q.shape[-2]
        idx = torch.arange(N, device=q.device)
        frame, slot = idx // tokens_per_frame, idx % tokens_per_frame
        mask = frame[:, None] == frame[None, :]                                   # [N, N] query x key
        if self.keep_special:
            mask = mask | (slot < num_special)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def eval_scenes_default(split: str = "test", num_scenes: int = 60, seed: int = 0,
                        options: Optional[dict] = None) -> list[Scene]:
    """Scenes of the embedded model's distribution (``hess.data.synthetic.EMBEDDED_SCENE_OPTIONS``), frames shuffled."""
    from hess.data import build_scenes
    from hess.data.synthetic import EMBEDDED_SCENE_OPTIONS as SCENE_OPTIONS

    return build_scenes("synthetic", split=split, num_scenes=num_scenes, seed=seed, shuffle_frames=True,
                        **{**SCENE_OPTIONS, **(options or {})})


def _set_attention(model: nn.Module, attention: Any) -> list[nn.Module]:
    """Swap every global core per ``attention``; returns the previous cores (to restore)."""
    from hess.patch import SparsePlan, sparsify

    layers = model.global_attention_layers()
    previous = [a.core for a in layers]
    if isinstance(attention, SparsePlan):
        sparsify(model, attention)
    elif attention == "dense":
        from hess.models.layers import DenseCore

        for a in layers:
            a.core = DenseCore()
    elif attention in ("frame-local", "frame-only"):
        for a in layers:
            a.core = FrameLocalCore(keep_special=attention == "frame-local")
    else:
        raise ValueError(f"attention must be one of {ATTENTION_MODES} or a hess.patch.SparsePlan, got {attention!r}")
    return previous


def chamfer_after_sim3(pred: Tensor, gt: Tensor, valid: Tensor, max_points: int = 4000) -> tuple[float, float]:
    """After Umeyama Sim(3) of pred onto gt: ((Acc + Comp)/2, mean per-pixel distance).

    pred, gt: [..., 3]; valid: [...].  Points are subsampled with a fixed stride to ``max_points``.
    """
    p, g = pred.reshape(-1, 3).double().cpu(), gt.reshape(-1, 3).double().cpu()
    m = valid.reshape(-1).cpu() & torch.isfinite(p).all(-1)
    p, g = p[m], g[m]
    if p.shape[0] < 3:
        return math.nan, math.nan
    stride = max(1, p.shape[0] // max_points)                                  # deterministic subsample
    p, g = p[::stride], g[::stride]
    s, R, t = umeyama(p, g)
    if not torch.isfinite(torch.as_tensor(s)).all():
        return math.nan, math.nan
    p = apply_sim3(p, s, R, t)
    chamfer = 0.5 * (nearest_neighbors(p, g)[0].mean().item() + nearest_neighbors(g, p)[0].mean().item())
    return chamfer, (p - g).norm(dim=-1).mean().item()


@torch.no_grad()
def evaluate_model(model: nn.Module, scenes: Sequence[Scene], *,
                   attention: Union[str, Any] = "dense") -> dict[str, float]:
    """Pose AUC / RRA / RTA, point-map Chamfer (all frames, frame 0) and frame-0 depth AbsRel.

    Args:
        model: a VGGT (camera head required; point head for the point metrics) or a π³.
        scenes: Scenes in input order (use shuffled test scenes, ``eval_scenes_default``).
        attention: "dense", "frame-local" (own frame + special tokens), "frame-only", or a SparsePlan.
    Returns:
        dict with ``POSE_KEYS``, ``chamfer``, ``chamfer_f0``, ``point_err``, ``abs_rel``, ``num_scenes``, ``num_pairs``.
    """
    if not scenes:
        raise ValueError("evaluate_model needs at least one scene")
    was_training = model.training
    model.eval()
    previous = _set_attention(model, attention)
    rot, trans, ch, ch0, rel, perr = [], [], [], [], [], []
    try:
        for sc in scenes:
            gt = normalize_scene(sc) if "normalization" not in sc.meta else sc
            preds = model(gt.images[None].float())
            geo = model.geometry(preds)
            r, t = relative_pose_errors(geo["extrinsics"][0].double(), gt.extrinsics.double())
            rot.append(r)
            trans.append(t)
            if "world_points" in geo:
                wp = geo["world_points"][0]
                c_all, e_all = chamfer_after_sim3(wp, gt.world_points, gt.valid)
                ch.append(c_all)
                perr.append(e_all)
                ch0.append(chamfer_after_sim3(wp[0], gt.world_points[0], gt.valid[0])[0])
                # frame-0 depth: the model's own depth map where it has one (π³: z of its local points; its
                # world frame is not camera 0), else the z of VGGT's frame-0-coordinate point map.
                d0 = geo["depth"][0, 0] if "depth" in geo else wp[0, ..., 2]
                rel.append(depth_metrics(d0, gt.depth[0], gt.valid[0], median_scale=True)["abs_rel"])
    finally:
        for a, core in zip(model.global_attention_layers(), previous):
            a.core = core
        model.train(was_training)
    pm = pose_metrics(torch.cat(rot), torch.cat(trans), thresholds=(15, 30))
    out = {k: pm[k] for k in POSE_KEYS}
    nanmean = lambda xs: float(torch.tensor(xs, dtype=torch.float64).nanmean()) if xs else math.nan  # noqa: E731
    out.update(chamfer=nanmean(ch), chamfer_f0=nanmean(ch0), point_err=nanmean(perr), abs_rel=nanmean(rel),
               num_scenes=len(scenes), num_pairs=int(torch.cat(rot).numel()))
    return out


def mean_pose_encoding(scenes: Sequence[Scene], side: int = 0) -> Tensor:
    """Mean absT_quaR_FoV encoding [9] of frames 1.. of normalised scenes (the constant baseline's value).

    side = +1 / -1 averages only the frames whose GT translation has t_x > 0 / < 0 (a constant
    "one orbit step to one side": on orbits it gets the direction right about half the time).
    """
    from hess.models.pose import extri_intri_to_pose_encoding

    encs = []
    for sc in scenes:
        n = normalize_scene(sc)
        encs.append(extri_intri_to_pose_encoding(n.extrinsics[None], n.intrinsics[None], n.image_hw)[0, 1:])
    enc = torch.cat(encs)
    if side:
        enc = enc[enc[:, 0] * side > 0]
    return enc.mean(0)


def constant_pose_metrics(scenes: Sequence[Scene], encoding: Optional[Tensor] = None) -> dict[str, float]:
    """Pose metrics of the constant predictor: frame 0 = identity, every other frame = ``encoding``
    (default: identity rotation, t = 0, i.e. 'no motion')."""
    from hess.models.pose import pose_encoding_to_extri_intri

    rot, trans = [], []
    for sc in scenes:
        S = sc.num_frames
        enc = torch.zeros(1, S, 9)
        enc[..., 6] = 1.0
        enc[..., 7:] = 1.0
        if encoding is not None:
            enc[:, 1:] = encoding.float()
        ext, _ = pose_encoding_to_extri_intri(enc, sc.image_hw)
        r, t = relative_pose_errors(ext[0].double(), sc.extrinsics.double())
        rot.append(r)
        trans.append(t)
    pm = pose_metrics(torch.cat(rot), torch.cat(trans), thresholds=(15, 30))
    return {k: pm[k] for k in POSE_KEYS}
