"""Per-scene measurements of one (possibly sparsified) model: accuracy, realised density, time.

    layout = sequence_layout(model, scene)               # tokens per frame, special tokens, patches
    timing = time_forward(model, scene, warmup=1, repeats=3)   # end-to-end and global-attention ms
    row = scene_metrics(model, scene)                    # auc30, chamfer, ... and the pose pair errors

Metrics (``eval.metrics`` selects the groups of ``METRIC_GROUPS``): pose pair errors ``T_i·T_j⁻¹``
(AUC@30/15, RRA/RTA) per scene and, over scenes, VGGT's per-category mean (``category_pose``); points
Acc / Comp / Chamfer (+ medians, NC) of all frames' point maps per ``evaluation.md`` §2.5 through
``hess.metrics.point_cloud_metrics`` (Umeyama Sim(3) then rigid ICP; DTU in mm); the mean per-pixel
distance after one Umeyama (``point_err``); frame-0 depth AbsRel (π³: its depth field, since its world
frame is not camera 0).  ``PROTOCOLS`` says, per dataset, which protocol the numbers follow.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from hess.evaluate import chamfer_after_sim3  # noqa: F401  (one definition; re-exported for callers)
from hess.runtime import time_fn
from hess.validate import check_finite

POSE_THRESHOLDS = (15, 30)


@dataclass(frozen=True)
class Layout:
    """Global-attention sequence layout of one scene: ``N = S·P`` tokens, ``n_s`` special per frame."""

    num_frames: int
    tokens_per_frame: int
    num_special: int

    @property
    def num_patches(self) -> int:
        """N_p = S · (P − n_s)."""
        return self.num_frames * (self.tokens_per_frame - self.num_special)

    def num_key_blocks(self, k_block: int) -> int:
        """n_k = ceil(N_p / k_block)."""
        return math.ceil(self.num_patches / k_block)


class _ProbeCore(nn.Module):
    """Dense pass-through that records the layout core kwargs of the global attention."""

    def __init__(self, inner: nn.Module, sink: list) -> None:
        super().__init__()
        self.inner, self.sink = inner, sink

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
        self.sink.append((q.shape[2], int(kw["tokens_per_frame"]), int(kw["num_special"])))
        return self.inner(q, k, v, **kw)


class _TimedCore(nn.Module):
    """Pass-through that adds the wall time of ``inner`` (synchronised on CUDA) to ``clock[0]``."""

    def __init__(self, inner: nn.Module, clock: list) -> None:
        super().__init__()
        self.inner, self.clock = inner, clock

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
        _sync(q)
        start = time.perf_counter()
        out = self.inner(q, k, v, **kw)
        _sync(out)
        self.clock[0] += time.perf_counter() - start
        return out


def _sync(t: Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _images(model: nn.Module, scene: Any) -> Tensor:
    p = next(model.parameters())
    return scene.images[None].to(p.device, p.dtype)


@torch.no_grad()
def sequence_layout(model: nn.Module, scene: Any) -> Layout:
    """One dense forward with a probe on the first global layer; raises if the model has none."""
    from hess.scorers import wrapped_cores

    layers = model.global_attention_layers()
    if not layers:
        raise ValueError(f"{type(model).__name__} has no global attention layers")
    sink: list = []
    with wrapped_cores(layers[:1], lambda _, core: _ProbeCore(core, sink)):
        model(_images(model, scene))
    n, p, s = sink[0]
    return Layout(num_frames=n // p, tokens_per_frame=p, num_special=s)


@torch.no_grad()
def time_forward(model: nn.Module, scene: Any, *, warmup: int, repeats: int) -> dict[str, float]:
    """Median end-to-end forward time and the global-attention time of the same forwards (ms).

    Global-attention time is the summed wall time of every global layer's attention core (the op that
    sparsification replaces), measured inside the same forwards as the end-to-end time.
    """
    from hess.scorers import wrapped_cores

    images = _images(model, scene)
    clock = [0.0]
    with wrapped_cores(model.global_attention_layers(), lambda _, core: _TimedCore(core, clock)):
        for _ in range(warmup):
            model(images)
        clock[0] = 0.0
        timing = time_fn(lambda: model(images), warmup=0, repeats=repeats)
    return {"latency_ms": timing.median_ms, "global_attn_ms": clock[0] * 1e3 / repeats}


#: eval.metrics names -> the group computed for them (a group name selects the whole group).  Pose pair
#: errors are always computed (they are cheap and every aggregate needs them).
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "pose": ("auc30", "auc15", "rra15", "rta15", "rra30", "rta30"),
    "points": ("acc", "comp", "chamfer", "acc_med", "comp_med"),
    "nc": ("nc", "nc_med", "nc1", "nc2"),
    "depth": ("abs_rel",),
    "point_err": ("point_err",),
    "chamfer_f0": ("chamfer_f0",),
}
#: per dataset: how each number is aggregated (written into run meta and the tables' notes)
PROTOCOLS: dict[str, str] = {
    "co3d": "pose: VGGT CO3Dv2 protocol, AUC pooled over the pairs of a category, unweighted mean over categories "
            "(per-sequence rows kept); points: evaluation.md §2.5 (Umeyama Sim(3) + rigid ICP, Acc/Comp/Chamfer, "
            "mean over scenes) in GT-normalised units",
    "dtu": "points: evaluation.md §2.5 (π³ mv_recon: Umeyama Sim(3) + rigid ICP at 100 mm, Acc/Comp/Chamfer in mm, "
           "mean over scans); pose: per-scan (category) AUC, mean over scans",
    "synthetic": "pose: AUC pooled over the pairs of a category (one per preset), mean over categories; points: "
                 "evaluation.md §2.5 (Umeyama + rigid ICP at 0.1 x GT scale) in GT-normalised units, mean over scenes",
}
ICP_THRESHOLD_BY_UNITS = {"mm": 100.0}  # evaluation.md §2.5: 100 for DTU (mm); otherwise 0.1 x GT scale


def metric_groups(names: Any) -> set[str]:
    """The groups of METRIC_GROUPS selected by ``eval.metrics`` names (metric or group names); pose always."""
    by_key = {k: g for g, keys in METRIC_GROUPS.items() for k in keys}
    unknown = [n for n in names if n not in METRIC_GROUPS and n not in by_key]
    if unknown:
        known = sorted(set(METRIC_GROUPS) | set(by_key))
        raise ValueError(f"eval.metrics: unknown metric(s) {unknown}; known: {', '.join(known)}")
    return {"pose"} | {n if n in METRIC_GROUPS else by_key[n] for n in names}


def _frame0_depth(model: nn.Module, geo: dict) -> Tensor:
    """Frame 0's predicted depth: π³'s world frame is not camera 0, so its depth field (z of local_points);
    VGGT's world frame is camera 0, so the z of frame 0's world points (as ``hess.evaluate``)."""
    from hess.models.pi3 import Pi3

    if isinstance(model, Pi3) or "world_points" not in geo:
        return geo["depth"][0, 0]
    return geo["world_points"][0, 0, ..., 2]


def point_metrics(pred: Tensor, scene: Any, normalized: Any, *, normals: bool, icp_threshold: Optional[float]) -> dict:
    """``hess.metrics.point_cloud_metrics`` (evaluation.md §2.5) of pred [S, H, W, 3] against the GT: in the
    scene's units when it has some (DTU: mm, ICP 100), else in GT-normalised units (ICP 0.1 x GT scale)."""
    from hess.metrics import point_cloud_metrics

    units = scene.meta.get("units")
    gt = scene if units in ICP_THRESHOLD_BY_UNITS else normalized
    threshold = icp_threshold if icp_threshold is not None else ICP_THRESHOLD_BY_UNITS.get(units)
    return point_cloud_metrics(pred, gt.world_points, gt.valid, icp_threshold=threshold, normals=normals)


@torch.no_grad()
def scene_metrics(model: nn.Module, scene: Any, metrics: Any = ("pose", "points", "depth", "point_err"),
                  icp_threshold: Optional[float] = None) -> tuple[dict[str, float], tuple[Tensor, Tensor]]:
    """Accuracy of one forward on ``scene`` (whatever attention the model currently has).

    Args:
        metrics: ``eval.metrics`` names (``METRIC_GROUPS``): what is computed and returned.
        icp_threshold: ICP radius of the point metrics (None: 100 mm for DTU, else 0.1 x GT scale).
    Returns:
        ({selected keys of METRIC_GROUPS}, (rot_err [P], trans_err [P])) with P = S(S-1)/2 frame pairs;
        point metrics are NaN for a model without a point head.
    """
    from hess.data import normalize_scene
    from hess.metrics import depth_metrics, pose_metrics, relative_pose_errors

    groups = metric_groups(metrics)
    gt = scene if "normalization" in scene.meta else normalize_scene(scene)
    geo = model.geometry(model(_images(model, scene)))
    # only what the metrics read: π³'s intrinsics are a least-squares fit that may be undefined for
    # degenerate (e.g. random-weight) point maps, and no metric uses them
    check_finite({k: v for k, v in geo.items() if k in ("extrinsics", "world_points", "depth")},
                 f"model output on scene {scene.scene_id}")
    rot, trans = relative_pose_errors(geo["extrinsics"][0].double(), gt.extrinsics.double())
    pose = pose_metrics(rot, trans, thresholds=POSE_THRESHOLDS)
    out = {k: pose[k] for k in METRIC_GROUPS["pose"]}
    wp = geo["world_points"][0].float().cpu() if "world_points" in geo else None
    if "points" in groups or "nc" in groups:
        keys = METRIC_GROUPS["points"] + (METRIC_GROUPS["nc"] if "nc" in groups else ())
        pm = (point_metrics(wp, scene, gt, normals="nc" in groups, icp_threshold=icp_threshold) if wp is not None
              else {})
        out.update({k: float(pm.get(k, math.nan)) for k in keys})
    if "point_err" in groups:
        out["point_err"] = chamfer_after_sim3(wp, gt.world_points, gt.valid)[1] if wp is not None else math.nan
    if "chamfer_f0" in groups:
        out["chamfer_f0"] = (point_metrics(wp[:1], scene.subset([0]), gt.subset([0]), normals=False,
                                           icp_threshold=icp_threshold)["chamfer"] if wp is not None else math.nan)
    if "depth" in groups:
        depth0 = _frame0_depth(model, geo) if ("depth" in geo or wp is not None) else None
        out["abs_rel"] = (depth_metrics(depth0.float().cpu(), gt.depth[0], gt.valid[0], median_scale=True)["abs_rel"]
                          if depth0 is not None else math.nan)
    return out, (rot, trans)


def category_pose(errors: list[tuple[Tensor, Tensor]], categories: list[str]) -> tuple[dict[str, float], dict]:
    """VGGT's aggregation: pair errors pooled per category, AUC per category, unweighted mean over categories.

    Returns (mean metrics {auc30, ...}, {category: metrics}).
    """
    from hess.metrics import category_pose_metrics

    grouped: dict[str, list] = {}
    for pair, cat in zip(errors, categories):
        grouped.setdefault(cat or "all", []).append(pair)
    per_cat = category_pose_metrics(grouped, thresholds=POSE_THRESHOLDS)
    mean = per_cat.pop("mean")
    return {k: mean[k] for k in METRIC_GROUPS["pose"]}, per_cat


def nanmean(values: list[float]) -> float:
    """Mean of the non-NaN values; NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def realized(model: nn.Module) -> Optional[tuple[float, float]]:
    """(density, density with sink columns) of the last forward of a sparsified model, else None."""
    from hess.patch import HeadSparseCore, realized_density

    if not all(isinstance(a.core, HeadSparseCore) for a in model.global_attention_layers()):
        return None
    rd = realized_density(model)
    return rd.overall, rd.with_sinks
