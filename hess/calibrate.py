"""HeSS calibration: per-head empirical Fisher traces of two ground-truth errors (method.md §3).

For every calibration scene the dense model predicts cameras and a point map; a detached similarity
``sg(H)`` (Umeyama on pixel correspondences, then rigid ICP) aligns the prediction to the normalised GT,
and two errors are formed::

    e_cam = 1/(2N)   Σ_i     ||H(ĉ_i) - c_i||²                 camera centres ĉ = -Rᵀt
    e_pc  = 1/(2|I|) Σ_{j∈I} ||H(p̂_j) - nn_GT(H(p̂_j))||²      inliers: NN distance < inlier_eps

One backward per error gives ``||∂e/∂W||²`` for the q, k and v rows of every head of every global layer;
the traces ``[error, proj, scene, L, H]`` go into a :class:`hess.scoring.HeadScores`::

    scores = calibrate(model, build_scenes("synthetic", split="calib", num_scenes=4), CalibConfig())
    scores.hess(lam=0.5)   # [L, H]
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from hess.data.scene import Scene, normalize_scene
from hess.metrics import apply_sim3, icp, nearest_neighbors, umeyama
from hess.models.pose import unproject_depth_map_to_point_map
from hess.scorers import ErrorFn, grad_only_for
from hess.scoring import ERRORS, PROJS, SCORERS, HeadScores, ScoreContext

POINT_SOURCES = ("point_head", "depth")
AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CalibConfig:
    """Calibration settings (method.md §3, D7-D10).

    Attributes:
        seed: seeds the frame and point subsampling (per scene, from ``(seed, scene_id)``).
        inlier_eps: inlier radius of e_pc in normalised GT units (mean GT point distance 1).
        use_icp: refine Umeyama with rigid point-to-point ICP.
        icp_max_distance, icp_iterations: ICP correspondence radius (normalised units) and iteration cap.
        icp_max_points: fit ICP on a seeded subset of this many predicted points (None = all); ICP only
            refines the detached alignment, and VGGT-1B at 20 frames has ~4M points.
        points_source: "point_head" (``world_points``) or "depth" (depth unprojected with the predicted cameras).
        max_frames: use at most this many frames per scene (seeded subset, order kept); None = all.
        max_points: at most this many predicted points enter e_pc (seeded subset); None = all valid pixels.
        autocast: None (full precision), "bfloat16" or "float16" autocast of the forward; errors are fp32.
        checkpointing: set ``model.aggregator.use_checkpoint`` during calibration.
        include_bias: add the squared gradient of each head's qkv bias rows to its trace.
        device: run on this device (scenes are moved); None = the model's device.
        progress: tqdm progress bar over scenes.
    """

    seed: int = 0
    inlier_eps: float = 0.05
    use_icp: bool = True
    icp_max_distance: float = 0.1
    icp_iterations: int = 30
    icp_max_points: Optional[int] = 4096
    points_source: str = "point_head"
    max_frames: Optional[int] = None
    max_points: Optional[int] = None
    autocast: Optional[str] = None
    checkpointing: bool = False
    include_bias: bool = False
    device: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.points_source not in POINT_SOURCES:
            raise ValueError(f"points_source must be one of {POINT_SOURCES}, got {self.points_source!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {list(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if not self.inlier_eps > 0:
            raise ValueError(f"inlier_eps must be > 0, got {self.inlier_eps}")
        for name in ("max_frames", "max_points", "icp_max_points"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")

    def key(self) -> dict:
        """The fields that change the traces (for cache keys): everything but device and progress."""
        return {k: v for k, v in asdict(self).items() if k not in ("device", "progress")}


@dataclass
class ErrorTargets:
    """What the errors of one scene hold fixed (stop-gradient), computed from the detached prediction.

    Attributes:
        scale, rotation [3, 3], translation [3]: sg(H), aligned = scale·R·p + t.
        gt_centers: [S, 3] normalised GT camera centres.
        point_index: [N] long, flat indices (into [S·H·W]) of the predicted points considered for e_pc.
        inlier: [M] long, positions in ``point_index`` whose aligned NN distance is < inlier_eps.
        inlier_targets: [M, 3] the nearest GT point of each inlier.
    """

    scale: Tensor
    rotation: Tensor
    translation: Tensor
    gt_centers: Tensor
    point_index: Tensor
    inlier: Tensor
    inlier_targets: Tensor


def _rng(config: CalibConfig, scene_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(scene_id.encode()))


def prepare_scene(scene: Scene, config: CalibConfig, device: torch.device) -> Scene:
    """Seeded frame subset (``max_frames``), GT normalisation (first camera, mean point distance 1), device."""
    if not isinstance(scene, Scene):
        raise TypeError(f"calibration scenes must be hess.data.Scene, got {type(scene).__name__}")
    if config.max_frames is not None and scene.num_frames > config.max_frames:
        pick = torch.randperm(scene.num_frames, generator=_rng(config, scene.scene_id))[: config.max_frames]
        scene = scene.subset(pick.sort().values)
    if "normalization" not in scene.meta:
        scene = normalize_scene(scene)
    if scene.meta.get("normalization_degenerate"):
        raise ValueError(f"scene {scene.scene_id!r} has no valid GT points; it cannot be calibrated on")
    return scene.to(device)


def predict_geometry(model: nn.Module, scene: Scene, config: CalibConfig) -> dict[str, Tensor]:
    """Dense forward → ``extrinsics [S, 3, 4]`` and ``world_points [S, H, W, 3]`` (at least fp32, with graph)."""
    dtype = AUTOCAST_DTYPES[config.autocast]
    device_type = scene.images.device.type
    amp = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with amp:
        geo = model.geometry(model(scene.images[None]))
    up = lambda t: t[0].to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731  [B=1, ...] → [...]
    ext = up(geo["extrinsics"])
    if config.points_source == "depth":
        points = unproject_depth_map_to_point_map(up(geo["depth"]), ext, up(geo["intrinsics"]))
    else:
        points = up(geo["world_points"])
    if tuple(points.shape[:3]) != tuple(scene.valid.shape):
        raise ValueError(f"predicted points {tuple(points.shape)} do not match the GT pixel grid {tuple(scene.valid.shape)}")
    return {"extrinsics": ext, "world_points": points}


def camera_centers(extrinsics: Tensor) -> Tensor:
    """extrinsics: [S, 3, 4] world-to-camera → centres ``-Rᵀt``: [S, 3] (differentiable)."""
    R, t = extrinsics[:, :, :3], extrinsics[:, :, 3:]
    return (-R.transpose(1, 2) @ t)[..., 0]


def error_targets(pred: dict[str, Tensor], scene: Scene, config: CalibConfig) -> ErrorTargets:
    """Alignment sg(H), inlier set and NN targets from the detached prediction (no gradient).

    Args:
        pred: ``predict_geometry`` output. scene: the prepared (normalised) GT scene.
    """
    with torch.no_grad():
        valid = scene.valid.reshape(-1)
        flat = pred["world_points"].detach().reshape(-1, 3)
        gt_cloud = scene.world_points.reshape(-1, 3)[valid]
        s, R, t = umeyama(flat[valid], gt_cloud, with_scale=True)
        if not torch.isfinite(s):
            raise ValueError(f"scene {scene.scene_id!r}: Umeyama failed (collapsed or non-finite prediction)")
        s, R, t = s.double().cpu(), R.double().cpu(), t.double().cpu()
        if config.use_icp:
            src = flat[valid].double().cpu()
            if config.icp_max_points is not None and src.shape[0] > config.icp_max_points:
                src = src[torch.randperm(src.shape[0], generator=_rng(config, scene.scene_id))[: config.icp_max_points]]
            fit = icp(apply_sim3(src, s, R, t), gt_cloud, config.icp_max_distance, config.icp_iterations)
            R, t = fit.R.double().cpu() @ R, fit.R.double().cpu() @ t + fit.t.double().cpu()
        index = valid.nonzero().flatten()
        if config.max_points is not None and index.numel() > config.max_points:
            pick = torch.randperm(index.numel(), generator=_rng(config, scene.scene_id))[: config.max_points]
            index = index[pick.sort().values.to(index.device)]
        aligned = apply_sim3(flat[index].double().cpu(), s, R, t)
        dist, nn_idx = nearest_neighbors(aligned, gt_cloud)
        inlier = (dist < config.inlier_eps).nonzero().flatten()
        device = pred["world_points"].device
        return ErrorTargets(
            scale=s.to(device), rotation=R.to(device), translation=t.to(device),
            gt_centers=scene.camera_centers().double().to(device), point_index=index.to(device),
            inlier=inlier.to(device), inlier_targets=gt_cloud.double().cpu()[nn_idx[inlier]].to(device),
        )


def calibration_errors(pred: dict[str, Tensor], targets: ErrorTargets) -> dict[str, Tensor]:
    """Differentiable ``e_cam`` and ``e_pc`` with the alignment and NN targets held fixed (method.md §3.2).

    Returns:
        {"cam": [], "pc": []} in the prediction's dtype (>= fp32); ``e_pc`` is a constant 0 without inliers.
    """
    dtype = pred["world_points"].dtype
    H = [x.to(dtype) for x in (targets.scale, targets.rotation, targets.translation)]
    centers = apply_sim3(camera_centers(pred["extrinsics"]), *H)
    e_cam = 0.5 * (centers - targets.gt_centers.to(dtype)).pow(2).sum(-1).mean()
    if targets.inlier.numel() == 0:
        return {"cam": e_cam, "pc": torch.zeros((), dtype=dtype, device=centers.device)}
    points = pred["world_points"].reshape(-1, 3)[targets.point_index[targets.inlier]]
    e_pc = 0.5 * (apply_sim3(points, *H) - targets.inlier_targets.to(dtype)).pow(2).sum(-1).mean()
    return {"cam": e_cam, "pc": e_pc}


def head_traces(grads: Sequence[Optional[Tensor]], num_heads: int) -> Tensor:
    """Squared Frobenius norms of each head's q, k, v rows.

    Args:
        grads: per layer, the gradient of ``qkv.weight`` [3C, C] or ``qkv.bias`` [3C] (None = zero).
        num_heads: H; row ``p*C + h*D + d`` belongs to projection p, head h.
    Returns:
        [3, L, H] float64.
    """
    out = []
    for g in grads:
        if g is None:
            out.append(torch.zeros(3, num_heads, dtype=torch.float64))
        else:
            out.append(g.reshape(3, num_heads, -1).double().pow(2).sum(-1).cpu())
    return torch.stack(out, dim=1)


def _params(model: nn.Module, include_bias: bool) -> tuple[list, list]:
    layers = model.global_attention_layers()
    if not layers:
        raise ValueError("model.global_attention_layers() is empty")
    weights = [a.qkv.weight for a in layers]
    biases = [a.qkv.bias for a in layers] if include_bias else []
    if any(b is None for b in biases):
        raise ValueError("include_bias=True but a global layer's qkv has no bias")
    return weights, biases


def scene_traces(model: nn.Module, scene: Scene, config: CalibConfig) -> tuple[Tensor, dict]:
    """Traces of one prepared scene: ([2 (cam, pc), 3 (q, k, v), L, H] float64, info) with two backwards."""
    weights, biases = _params(model, config.include_bias)
    H = model.global_attention_layers()[0].num_heads
    pred = predict_geometry(model, scene, config)
    targets = error_targets(pred, scene, config)
    errors = calibration_errors(pred, targets)
    out = torch.zeros(len(ERRORS), len(PROJS), len(weights), H, dtype=torch.float64)
    for j, name in enumerate(ERRORS):
        if errors[name].requires_grad:
            grads = torch.autograd.grad(errors[name], weights + biases, retain_graph=j + 1 < len(ERRORS),
                                        allow_unused=True)
            out[j] = head_traces(grads[: len(weights)], H)
            if biases:
                out[j] += head_traces(grads[len(weights):], H)
    info = {"e_cam": errors["cam"].item(), "e_pc": errors["pc"].item(), "num_inliers": int(targets.inlier.numel()),
            "num_points": int(targets.point_index.numel())}
    return out, info


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    agg = getattr(model, "aggregator", None)
    if not enabled:
        yield
        return
    if agg is None and hasattr(model, "use_checkpoint"):                     # π³: the flag lives on the model
        agg = model
    if agg is None or not hasattr(agg, "use_checkpoint"):
        warnings.warn(f"{type(model).__name__} has no aggregator.use_checkpoint; checkpointing ignored")
        yield
        return
    before = agg.use_checkpoint
    try:
        agg.use_checkpoint = True
        yield
    finally:
        agg.use_checkpoint = before


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of every state_dict entry's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _device(model: nn.Module, config: CalibConfig) -> torch.device:
    return torch.device(config.device) if config.device else next(model.parameters()).device


def calibrate(model: nn.Module, scenes: Sequence[Scene], config: Optional[CalibConfig] = None) -> HeadScores:
    """Per-head Fisher traces of e_cam and e_pc over calibration scenes (method.md §3.6).

    Only the global blocks' ``qkv`` weights (and biases with ``include_bias``) require grad during the
    run, the model is in eval mode; both are restored afterwards.  With ``config.device`` set, the model
    is moved there (and stays).

    Args:
        model: a hess model (``global_attention_layers()``, ``geometry()``), dense.
        scenes: calibration scenes with GT; disjoint from evaluation scenes (the caller's split).
        config: :class:`CalibConfig`; defaults when None.
    Returns:
        :class:`HeadScores` with traces [2, 3, len(scenes), L, H]; per-scene errors, inlier counts and
        scenes without inliers (``e_pc = 0``, flagged) in ``meta``.
    """
    from tqdm.auto import tqdm

    config = config or CalibConfig()
    if len(scenes) == 0:
        raise ValueError("calibrate needs at least one scene")
    bad = [type(s).__name__ for s in scenes if not isinstance(s, Scene)]
    if bad:
        raise TypeError(f"calibration scenes must be hess.data.Scene, got {bad}")
    ids = [s.scene_id for s in scenes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"calibration scene ids must be unique, got {ids}")
    device = _device(model, config)
    model.to(device)
    weights, biases = _params(model, config.include_bias)
    per_scene, infos = [], []
    with grad_only_for(model, weights + biases), _checkpointing(model, config.checkpointing):
        for scene in tqdm(scenes, desc="calibrate", disable=not config.progress):
            traces, info = scene_traces(model, prepare_scene(scene, config, device), config)
            per_scene.append(traces)
            infos.append(info)
    empty = [sid for sid, info in zip(ids, infos) if info["num_inliers"] == 0]
    if empty:
        warnings.warn(f"no e_pc inliers (eps={config.inlier_eps}) in scenes {empty}; their e_pc traces are 0")
    return HeadScores(
        traces=torch.stack(per_scene, dim=2), scene_ids=ids, config=asdict(config),
        model_id=str(getattr(model, "model_id", type(model).__name__)), model_hash=model_fingerprint(model),
        meta={"scenes": dict(zip(ids, infos)), "empty_inlier_scenes": empty},
    )


def run_calibration(model: nn.Module, scenes: Sequence[Scene], config: CalibConfig, out_path: str | Path) -> HeadScores:
    """Calibrate and write the artifact to ``out_path`` (``.safetensors`` + ``.json`` sidecar)."""
    scores = calibrate(model, scenes, config)
    scores.save(out_path)
    return scores


def calibration_error_fn(config: CalibConfig, lam: float = 0.5) -> ErrorFn:
    """``(model, scene) -> λ·e_cam + (1-λ)·e_pc`` with alignment recomputed (detached) on every call.

    The objective of the ``head-importance`` and ``oracle`` scorers.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")

    def error(model: nn.Module, scene: Any) -> Tensor:
        scene = prepare_scene(scene, config, _device(model, config))
        pred = predict_geometry(model, scene, config)
        errors = calibration_errors(pred, error_targets(pred, scene, config))
        return lam * errors["cam"] + (1.0 - lam) * errors["pc"]

    return error


def fixed_target_errors(config: CalibConfig, chamfer_points: int = 4096) -> tuple[Any, Any]:
    """``(prepare, measure)`` of the faithful oracle (``hess.scorers.oracle_deltas``).

    ``prepare(model, scene)``: the *dense* prediction's detached alignment sg(H), inlier set and NN targets
    (``error_targets``), plus seeded fixed subsets of ``chamfer_points`` predicted pixels and GT points.
    ``measure(model, state)``: ``{"cam": e_cam, "pc": e_pc, "chamfer": (Acc + Comp)/2}`` of the current
    model's prediction with all of that held fixed: e_pc over the dense inlier pixels against their dense
    NN targets (a point that degrades stays in the set and raises e_pc), Chamfer of the fixed-aligned
    point subset against the GT subset (untruncated: no inlier radius).
    """

    def prepare(model: nn.Module, scene: Any) -> tuple:
        scene = prepare_scene(scene, config, _device(model, config))
        pred = predict_geometry(model, scene, config)
        targets = error_targets(pred, scene, config)
        valid = scene.valid.reshape(-1).nonzero().flatten()
        gen = _rng(config, scene.scene_id + "/chamfer")
        pick = valid[torch.randperm(valid.numel(), generator=gen)[:chamfer_points].to(valid.device)]
        gt = scene.world_points.reshape(-1, 3)[valid[torch.randperm(valid.numel(), generator=gen)[:chamfer_points]
                                                     .to(valid.device)]].double().cpu()
        return scene, targets, pick, gt

    def measure(model: nn.Module, state: tuple) -> dict[str, float]:
        scene, targets, pick, gt = state
        pred = predict_geometry(model, scene, config)
        errors = calibration_errors(pred, targets)
        pts = apply_sim3(pred["world_points"].reshape(-1, 3)[pick].double().cpu(), targets.scale.double().cpu(),
                         targets.rotation.double().cpu(), targets.translation.double().cpu())
        chamfer = 0.5 * (nearest_neighbors(pts, gt)[0].mean() + nearest_neighbors(gt, pts)[0].mean())
        return {"cam": float(errors["cam"]), "pc": float(errors["pc"]), "chamfer": float(chamfer)}

    return prepare, measure


def score_heads(name: str, model: nn.Module, scenes: Sequence[Scene], config: CalibConfig, *,
                head_scores: Optional[HeadScores] = None, lam: float = 0.5, proj: str = "q",
                normalize: bool = True, seed: int = 0, keep_ratio: float = 0.25, min_blocks: int = 1,
                q_block: int = 128, k_block: int = 64, cache_dir: Optional[str | Path] = None) -> Tensor:
    """Run scorer ``name`` of ``SCORERS`` with the calibration objective; returns [L, H].

    ``keep_ratio``, ``min_blocks``, ``q_block``, ``k_block``: the sparsity the ``oracle`` scorer probes (and
    ``sparsity-taylor`` estimates); ``cache_dir``: where ``sparsity-taylor`` caches its artifacts.
    """
    if config.max_frames is not None:  # so that model-only scorers see the same frames as the error
        scenes = [prepare_scene(s, config, _device(model, config)) for s in scenes]
    ctx = ScoreContext(head_scores=head_scores, model=model, scenes=scenes, error_fn=calibration_error_fn(config, lam),
                       lam=lam, proj=proj, normalize=normalize, seed=seed, keep_ratio=keep_ratio, min_blocks=min_blocks,
                       q_block=q_block, k_block=k_block, calib=config, cache_dir=cache_dir)
    return SCORERS.get(name)(ctx)
