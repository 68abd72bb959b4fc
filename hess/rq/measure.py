"""Per-scene measurements of one (possibly sparsified) model: accuracy, realised density, time.

    layout = sequence_layout(model, scene)               # tokens per frame, special tokens, patches
    timing = time_forward(model, scene, warmup=1, repeats=3)   # end-to-end and global-attention ms
    row = scene_metrics(model, scene)                    # auc30, chamfer, ... and the pose pair errors

Metric definitions are those of ``hess.evaluate.evaluate_model`` (the model card's): pose pair errors
``T_i·T_j⁻¹`` (AUC@30/15, RRA/RTA), Chamfer (Acc + Comp)/2 of all frames' point maps after one
Umeyama Sim(3) onto the normalised GT, the mean per-pixel distance after it (``point_err``), frame-0
Chamfer and frame-0 depth AbsRel.  Pose AUC pooled over
the pairs of several scenes is the pair-weighted mean of the per-scene AUCs (``pooled_pose``).
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


@torch.no_grad()
def scene_metrics(model: nn.Module, scene: Any) -> tuple[dict[str, float], tuple[Tensor, Tensor]]:
    """Accuracy of one forward on ``scene`` (whatever attention the model currently has).

    Returns:
        ({auc30, auc15, rra15, rta15, rra30, rta30, chamfer, point_err, chamfer_f0, abs_rel}, (rot_err [P], trans_err [P]))
        with P = S(S-1)/2 frame pairs; point metrics are NaN for a model without a point head.
    """
    from hess.data import normalize_scene
    from hess.metrics import depth_metrics, pose_metrics, relative_pose_errors

    gt = scene if "normalization" in scene.meta else normalize_scene(scene)
    geo = model.geometry(model(_images(model, scene)))
    check_finite(geo, f"model output on scene {scene.scene_id}")
    rot, trans = relative_pose_errors(geo["extrinsics"][0].double(), gt.extrinsics.double())
    out = dict(pose_metrics(rot, trans, thresholds=POSE_THRESHOLDS))
    out = {k: out[k] for k in ("auc30", "auc15", "rra15", "rta15", "rra30", "rta30")}
    if "world_points" in geo:
        wp = geo["world_points"][0].float().cpu()
        out["chamfer"], out["point_err"] = chamfer_after_sim3(wp, gt.world_points, gt.valid)
        out["chamfer_f0"] = chamfer_after_sim3(wp[0], gt.world_points[0], gt.valid[0])[0]
        out["abs_rel"] = depth_metrics(wp[0, ..., 2], gt.depth[0], gt.valid[0], median_scale=True)["abs_rel"]
    else:
        out.update(chamfer=math.nan, point_err=math.nan, chamfer_f0=math.nan, abs_rel=math.nan)
    return out, (rot, trans)


def pooled_pose(errors: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Pose metrics over the pairs of all scenes pooled (VGGT's aggregation within a dataset)."""
    from hess.metrics import pose_metrics

    rot = torch.cat([r.reshape(-1) for r, _ in errors])
    trans = torch.cat([t.reshape(-1) for _, t in errors])
    out = pose_metrics(rot, trans, thresholds=POSE_THRESHOLDS)
    return {k: out[k] for k in ("auc30", "auc15", "rra15", "rta15", "rra30", "rta30")}


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
