"""hess.calibrate: error terms, Fisher traces and the calibration loop, with known answers.

A tiny stand-in model (global ``Block``s + linear heads around the GT geometry) keeps the answers
computable: an unused head has zero trace, traces scale with the square of the error, gradients match
finite differences in float64, an exact prediction has zero error.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from hess.calibrate import (
    CalibConfig,
    ErrorTargets,
    calibrate,
    calibration_errors,
    error_targets,
    head_traces,
    model_fingerprint,
    predict_geometry,
    prepare_scene,
    run_calibration,
    scene_traces,
)
from hess.data.scene import Scene
from hess.models.layers import Block
from hess.scoring import HeadScores


# --------------------------------------------------------------------------- stand-ins
def make_scene(seed: int = 0, frames: int = 3, size: int = 8, dtype=torch.float32, scene_id: str | None = None) -> Scene:
    """Cameras translated along x above a bumpy surface z = 4 + 0.3 sin(x) cos(y), looking down +z."""
    g = torch.Generator().manual_seed(seed)
    f = float(size)
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]], dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    ray = torch.stack([(u - size / 2) / f, (v - size / 2) / f, torch.ones_like(u)], -1)  # z = 1
    ext, depth, points = [], [], []
    for i in range(frames):
        c = torch.tensor([0.4 * i - 0.4, 0.1 * torch.rand(1, generator=g).item(), 0.0], dtype=torch.float64)
        d = 4.0 + 0.3 * torch.sin(ray[..., 0] * 3 + i) * torch.cos(ray[..., 1] * 2)  # a depth map, not a ray cast
        X = c + d[..., None] * ray
        ext.append(torch.cat([torch.eye(3, dtype=torch.float64), -c[:, None]], 1))  # R = I, t = -c
        depth.append(d)
        points.append(X)
    return Scene(
        images=torch.rand(frames, 3, size, size, generator=g).to(dtype),
        extrinsics=torch.stack(ext).to(dtype), intrinsics=K.expand(frames, 3, 3).clone().to(dtype),
        depth=torch.stack(depth).to(dtype), world_points=torch.stack(points).to(dtype),
        valid=torch.ones(frames, size, size, dtype=torch.bool), scene_id=scene_id or f"tiny-{seed}",
        frame_ids=list(range(frames)),
    )


class TinyGeoModel(nn.Module):
    """Global-attention blocks over frame-major tokens; heads add small learned offsets to a base geometry.

    ``world_points = base_points + 0.1 · point_head(patch tokens)``, extrinsics ``[R_base | t_base + 0.1 ·
    cam_head(camera token)]``: the prediction is near the GT (inliers exist), and every weight matters.
    """

    def __init__(self, scene: Scene, dim: int = 16, heads: int = 4, depth: int = 2, patch: int = 4, num_special: int = 1):
        super().__init__()
        S, _, Hi, Wi = scene.images.shape
        self.patch, self.num_special_tokens, self.model_id = patch, num_special, "tiny-geo"
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.special = nn.Parameter(0.5 * torch.randn(num_special, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.point_head = nn.Linear(dim, 3 * patch * patch)
        self.cam_head = nn.Linear(dim, 3)
        self.register_buffer("base_points", scene.world_points.clone())
        self.register_buffer("base_extrinsics", scene.extrinsics.clone())

    def global_attention_layers(self):
        return [b.attn for b in self.blocks]

    def forward(self, images):  # [B, S, 3, H, W]
        B, S, _, Hi, Wi = images.shape
        p = self.patch
        x = images.unfold(3, p, p).unfold(4, p, p)  # [B, S, 3, h, w, p, p]
        h, w = x.shape[3], x.shape[4]
        x = self.embed(x.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, S, h * w, -1))
        x = torch.cat([self.special.expand(B, S, -1, -1), x], dim=2)  # [B, S, P, C]
        P = x.shape[2]
        x = x.reshape(B, S * P, -1)
        for blk in self.blocks:
            x = blk(x, tokens_per_frame=P, num_special=self.num_special_tokens)
        x = x.reshape(B, S, P, -1)
        pts = self.point_head(x[:, :, self.num_special_tokens:])  # [B, S, h*w, 3*p*p]
        pts = pts.reshape(B, S, h, w, 3, p, p).permute(0, 1, 2, 5, 3, 6, 4).reshape(B, S, Hi, Wi, 3)
        return {"points": self.base_points + 0.1 * pts, "cam": self.cam_head(x[:, :, 0])}

    def geometry(self, raw):
        ext = self.base_extrinsics.expand(raw["cam"].shape[0], -1, -1, -1)
        ext = torch.cat([ext[..., :3], ext[..., 3:] + 0.1 * raw["cam"][..., None]], dim=-1)
        return {"extrinsics": ext, "world_points": raw["points"]}


def tiny(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    scene = make_scene(seed, dtype=dtype)
    return TinyGeoModel(scene, **kw).to(dtype), scene


QUIET = dict(progress=False)


# --------------------------------------------------------------------------- error terms
def test_camera_error_formula():
    """Identity alignment, predicted centres = GT + δ_i → e_cam = mean_i |δ_i|² / 2."""
    gt = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0]], dtype=torch.float64)
    delta = torch.tensor([[0.1, 0, 0], [0, 0.2, 0], [0, 0, -0.3]], dtype=torch.float64)
    ext = torch.cat([torch.eye(3, dtype=torch.float64).expand(3, 3, 3), -(gt + delta)[..., None]], -1)
    targets = ErrorTargets(torch.tensor(1.0, dtype=torch.float64), torch.eye(3, dtype=torch.float64),
                           torch.zeros(3, dtype=torch.float64), gt, torch.arange(2), torch.tensor([1]),
                           torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64))
    pts = torch.zeros(3, 1, 2, 3, dtype=torch.float64)
    pts[0, 0, 1] = torch.tensor([1.0, 1.0, 1.5])  # flat index 1 is the one inlier, 0.5 off its target
    errors = calibration_errors({"extrinsics": ext, "world_points": pts}, targets)
    assert errors["cam"].item() == pytest.approx((0.01 + 0.04 + 0.09) / 3 / 2, abs=1e-15)
    assert errors["pc"].item() == pytest.approx(0.25 / 2, abs=1e-15)


def test_alignment_recovers_a_similarity_and_exact_prediction_has_zero_error():
    scene = prepare_scene(make_scene(1, dtype=torch.float64), CalibConfig(**QUIET), torch.device("cpu"))
    s, R = 2.5, torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    R = R * torch.det(R)  # proper rotation
    t = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    pts = s * scene.world_points @ R.T + t  # prediction = Sim3(GT)
    # extrinsics in the predicted world: x_cam = R_i X + t_i with X = Sim3⁻¹ of the predicted world point
    E = scene.extrinsics
    Rp = E[:, :, :3] @ R.T  # x_cam = s·(E_R X + E_t) with X = Rᵀ(X_p - t)/s
    tp = s * E[:, :, 3] - (Rp @ t[:, None])[..., 0]
    pred = {"extrinsics": torch.cat([Rp, tp[..., None]], -1), "world_points": pts}
    for cfg in (dict(use_icp=False), dict(use_icp=True), dict(use_icp=True, icp_max_points=50)):
        targets = error_targets(pred, scene, CalibConfig(**cfg, **QUIET))
        assert targets.scale.item() == pytest.approx(1 / s, rel=1e-9)
        assert torch.allclose(targets.rotation, R.T, atol=1e-9)
        assert targets.inlier.numel() == scene.valid.sum()  # every point is an inlier
        errors = calibration_errors(pred, targets)
        assert errors["cam"].item() < 1e-18 and errors["pc"].item() < 1e-18


def test_inliers_exclude_points_beyond_eps():
    scene = prepare_scene(make_scene(2, dtype=torch.float64), CalibConfig(**QUIET), torch.device("cpu"))
    pts = scene.world_points.clone()
    pts[0, 0, :4] += torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)  # 4 points pushed 0.5 off the surface
    pred = {"extrinsics": scene.extrinsics, "world_points": pts}
    targets = error_targets(pred, scene, CalibConfig(**QUIET))  # Umeyama is pulled slightly; ICP re-fits
    inliers = set(targets.point_index[targets.inlier].tolist())
    assert not inliers & {0, 1, 2, 3}  # frame 0, row 0, columns 0-3
    assert len(inliers) == int(scene.valid.sum()) - 4


def test_gt_normalisation_first_camera_unit_mean_distance():
    scene = prepare_scene(make_scene(3), CalibConfig(**QUIET), torch.device("cpu"))
    assert scene.world_points[scene.valid].norm(dim=-1).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(scene.camera_centers()[0], torch.zeros(3), atol=1e-6)


# --------------------------------------------------------------------------- traces
def test_head_traces_row_layout():
    """Row p*C + h*D + d of qkv.weight belongs to projection p, head h."""
    C, H = 8, 2
    g = torch.zeros(3 * C, C)
    g[C + 1 * 4 + 2, 5] = 3.0  # k, head 1
    g[2 * C + 0 * 4 + 0, 0] = 2.0  # v, head 0
    out = head_traces([g, None], H)
    assert out.shape == (3, 2, H) and out.dtype == torch.float64
    expected = torch.zeros(3, 2, H, dtype=torch.float64)
    expected[1, 0, 1], expected[2, 0, 0] = 9.0, 4.0
    assert torch.equal(out, expected)


def test_unused_head_has_zero_score():
    model, scene = tiny()
    layer, head = 1, 2
    D = model.blocks[layer].attn.head_dim
    with torch.no_grad():
        model.blocks[layer].attn.proj.weight[:, head * D:(head + 1) * D] = 0  # head output unused
    scores = calibrate(model, [scene], CalibConfig(**QUIET))
    assert (scores.traces[:, :, :, layer, head] == 0).all()  # exactly, all errors and projections
    others = scores.traces.clone()
    others[:, :, :, layer, head] = 1.0
    assert (others > 0).all()  # every other head has a non-zero trace
    assert scores.hess(0.5)[layer, head] == 0


def test_traces_scale_with_square_of_error():
    model, scene = tiny()
    config = CalibConfig(**QUIET)
    weights = [a.qkv.weight for a in model.global_attention_layers()]
    scene = prepare_scene(scene, config, torch.device("cpu"))
    pred = predict_geometry(model, scene, config)
    errors = calibration_errors(pred, error_targets(pred, scene, config))
    base = head_traces(torch.autograd.grad(errors["pc"], weights, retain_graph=True), 4)
    scaled = head_traces(torch.autograd.grad(3.0 * errors["pc"], weights), 4)
    assert (base > 0).all()
    assert torch.allclose(scaled, 9.0 * base, rtol=1e-5, atol=0)


def test_traces_match_finite_differences_float64():
    """||∂e/∂W_q^{l,h}||² from autograd == the squared finite-difference gradient (alignment held fixed)."""
    model, scene = tiny(torch.float64, dim=8, heads=2)
    config = CalibConfig(**QUIET)
    scene = prepare_scene(scene, config, torch.device("cpu"))
    traces, _ = scene_traces(model, scene, config)
    pred = predict_geometry(model, scene, config)
    targets = error_targets(pred, scene, config)
    W = model.blocks[1].attn.qkv.weight
    D, C = 4, 8
    for proj, head in ((0, 1), (2, 0)):  # q rows of head 1, v rows of head 0 (layer 1)
        fd = torch.zeros(2, D, C, dtype=torch.float64)  # [error (cam, pc), d, c]
        for d in range(D):
            for c in range(C):
                row, vals = proj * C + head * D + d, []
                for sign in (1, -1):
                    with torch.no_grad():
                        W[row, c] += sign * 1e-6
                        e = calibration_errors(predict_geometry(model, scene, config), targets)
                        vals.append(torch.stack([e["cam"], e["pc"]]))
                        W[row, c] -= sign * 1e-6
                fd[:, d, c] = (vals[0] - vals[1]) / 2e-6
        for e in range(2):
            assert traces[e, proj, 1, head].item() == pytest.approx(fd[e].pow(2).sum().item(), rel=1e-5)


# --------------------------------------------------------------------------- the loop
def test_calibrate_restores_state_counts_backwards_and_is_deterministic(monkeypatch):
    model, scene = tiny()
    scenes = [scene, make_scene(5, scene_id="other")]
    model.train()
    model.cam_head.weight.requires_grad_(False)  # a caller's frozen param stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cores = [a.core for a in model.global_attention_layers()]
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    scores = calibrate(model, scenes, CalibConfig(**QUIET))
    assert len(calls) == 2 * len(scenes)  # one backward per error per scene
    assert scores.traces.shape == (2, 3, 2, 2, 4) and scores.scene_ids == ["tiny-0", "other"]
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [a.core for a in model.global_attention_layers()] == cores
    assert scores.model_id == "tiny-geo" and scores.model_hash == model_fingerprint(model)
    assert scores.meta["scenes"]["tiny-0"]["num_inliers"] > 0 and scores.meta["empty_inlier_scenes"] == []
    again = calibrate(model, scenes, CalibConfig(**QUIET))
    assert torch.equal(scores.traces, again.traces)
    # a λ / projection / normalisation change reads the stored traces: no gradient is computed
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: pytest.fail("recomputed gradients"))
    lams = [scores.hess(lam) for lam in (0.0, 0.5, 1.0)]
    assert not torch.allclose(lams[0], lams[2])
    assert torch.allclose(lams[1], 0.5 * (lams[0] + lams[2]))
    scores.hess(1.0, proj="k", normalize=False)


def test_max_frames_and_points_are_seeded_subsets():
    model, scene = tiny()
    scores = calibrate(model, [scene], CalibConfig(max_points=50, seed=7, **QUIET))
    assert scores.meta["scenes"]["tiny-0"]["num_points"] == 50
    cfg = CalibConfig(max_frames=3, seed=7, **QUIET)
    scene5 = make_scene(0, frames=5)
    prepared = prepare_scene(scene5, cfg, torch.device("cpu"))
    assert prepared.num_frames == 3 and prepared.frame_ids == sorted(prepared.frame_ids)
    assert prepare_scene(scene5, cfg, torch.device("cpu")).frame_ids == prepared.frame_ids
    others = {tuple(prepare_scene(scene5, CalibConfig(max_frames=3, seed=k, **QUIET), torch.device("cpu")).frame_ids)
              for k in range(8)}
    assert len(others) > 1  # the seed matters


def test_empty_inlier_set_flags_the_scene():
    model, scene = tiny()
    with pytest.warns(UserWarning, match="no e_pc inliers"):
        scores = calibrate(model, [scene], CalibConfig(inlier_eps=1e-12, **QUIET))
    assert scores.meta["empty_inlier_scenes"] == ["tiny-0"]
    assert (scores.traces[1] == 0).all() and (scores.traces[0] > 0).any()


def test_checkpointing_flag_is_set_and_restored():
    model, scene = tiny()
    seen = []

    class Agg(nn.Module):
        use_checkpoint = False

    model.aggregator = Agg()
    orig = model.forward
    model.forward = lambda images: seen.append(model.aggregator.use_checkpoint) or orig(images)
    calibrate(model, [scene], CalibConfig(checkpointing=True, **QUIET))
    assert seen == [True] and model.aggregator.use_checkpoint is False


def test_bad_inputs_raise():
    model, scene = tiny()
    with pytest.raises(ValueError, match="points_source"):
        CalibConfig(points_source="conf")
    with pytest.raises(ValueError, match="autocast"):
        CalibConfig(autocast="fp8")
    with pytest.raises(ValueError, match="at least one scene"):
        calibrate(model, [], CalibConfig(**QUIET))
    with pytest.raises(ValueError, match="unique"):
        calibrate(model, [scene, scene], CalibConfig(**QUIET))
    with pytest.raises(TypeError, match="hess.data.Scene"):
        calibrate(model, [object()], CalibConfig(**QUIET))


def test_run_calibration_writes_a_loadable_artifact(tmp_path):
    model, scene = tiny()
    out = tmp_path / "calib" / "head_scores.safetensors"
    scores = run_calibration(model, [scene], CalibConfig(**QUIET), out)
    loaded = HeadScores.load(out)
    assert torch.equal(loaded.traces, scores.traces) and loaded.config["inlier_eps"] == 0.05


# --------------------------------------------------------------------------- the real model
def _vggt_and_scenes():
    models = pytest.importorskip("hess.models")
    data = pytest.importorskip("hess.data")
    if not hasattr(models, "build_vggt") or not hasattr(data, "build_scenes"):
        pytest.skip("hess.models.build_vggt / hess.data.build_scenes not available yet")
    torch.manual_seed(0)
    model = models.build_vggt("vggt-parity-a").eval()
    # the parity fixture's input size (56×84), 4 frames
    scenes = data.build_scenes("synthetic", split="calib", num_scenes=4, num_frames=4, height=56, width=84)
    return model, scenes


def test_vggt_parity_calibration_one_scene():
    """The real model through the real contract: finite, non-negative traces for every global layer/head."""
    model, scenes = _vggt_and_scenes()
    scores = calibrate(model, scenes[:1], CalibConfig(max_frames=2, **QUIET))
    L, H = len(model.global_attention_layers()), model.global_attention_layers()[0].num_heads
    assert scores.traces.shape == (2, 3, 1, L, H) and torch.isfinite(scores.traces).all()
    assert (scores.traces[0] > 0).any() and scores.model_id == getattr(model, "model_id", scores.model_id)
    # depth + predicted cameras as the point source: same grid, differentiable
    cfg = CalibConfig(points_source="depth", max_frames=2, **QUIET)
    scene = prepare_scene(scenes[0], cfg, torch.device("cpu"))
    pred = predict_geometry(model, scene, cfg)
    assert pred["world_points"].shape == (*scene.valid.shape, 3) and torch.isfinite(pred["world_points"]).all()


@pytest.mark.slow
def test_vggt_parity_calibration_speed():
    """Calibrating the parity-sized VGGT on 4 synthetic scenes of 4 frames: < 60 s on CPU.

    Prints the time per scene relative to one dense forward (target <= 4x; min of 3 forwards).
    """
    model, scenes = _vggt_and_scenes()
    images = scenes[0].images[None]
    with torch.no_grad():
        model(images)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - t0)
    forward = min(times)
    t0 = time.perf_counter()
    scores = calibrate(model, scenes, CalibConfig(**QUIET))
    total = time.perf_counter() - t0
    assert scores.traces.shape[:3] == (2, 3, 4) and torch.isfinite(scores.traces).all()
    assert total < 60
    print(f"calibration {total / len(scenes):.3f} s/scene = {total / len(scenes) / forward:.2f}x a dense forward")
