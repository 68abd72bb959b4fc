"""Synthetic scenes: GT agrees with the geometry, determinism, splits, correspondences, Scene contract."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from hess import metrics as M
from hess.data import (SPLITS, Scene, build_scenes, exact_correspondences, make_scene, normalize_scene,
                       project_points, reproject_pixels, scene_key)
from hess.data.render import Box, Rect, Sphere
from hess.data.splits import check_disjoint, split_of


@pytest.fixture(scope="module", params=["orbit", "grid", "forward", "orbit+walls"])
def scene(request) -> Scene:
    preset, *extra = request.param.split("+")
    return make_scene(scene_key("val", 7), preset=preset, num_frames=4, height=56, width=84,
                      **{name: True for name in extra})


def test_walls_add_two_vertical_rects_and_keep_everything_else():
    key, opts = scene_key("val", 3), dict(preset="orbit", num_frames=4, height=56, width=84, arc_deg=(15, 60))
    bare, walled = make_scene(key, **opts), make_scene(key, walls=True, **opts)
    assert torch.equal(bare.extrinsics, walled.extrinsics) and torch.equal(bare.intrinsics, walled.intrinsics)
    g_bare, g_walled = bare.meta["geometry"], walled.meta["geometry"]
    extra = g_walled.primitives[len(g_bare.primitives):]
    assert len(extra) == 2 and all(isinstance(w, Rect) and abs(w.axes[2][2]) < 1e-12 for w in extra)
    assert np.allclose(g_walled.light, g_bare.light)
    # the walls are seen: some pixels are farther in the bare scene (or background) than on a wall
    on_wall = (walled.depth > 0) & ((bare.depth == 0) | (walled.depth < bare.depth - 1e-6))
    assert on_wall.float().mean() > 0.02


def reference_hit(prim, o: np.ndarray, d: np.ndarray) -> float:
    """Nearest positive hit of one ray, written independently of hess.data.render (scalar maths)."""
    if isinstance(prim, Sphere):
        oc = o - prim.center
        a, b, c = d @ d, 2 * d @ oc, oc @ oc - prim.radius ** 2
        disc = b * b - 4 * a * c
        if disc < 0:
            return math.inf
        roots = [r for r in ((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)) if r > 1e-6]
        return min(roots, default=math.inf)
    if isinstance(prim, Rect):
        n = prim.axes[2]
        if abs(d @ n) < 1e-15:
            return math.inf
        t = (prim.center - o) @ n / (d @ n)
        p = o + t * d - prim.center
        ok = abs(p @ prim.axes[0]) <= prim.half[0] and abs(p @ prim.axes[1]) <= prim.half[1]
        return t if ok and t > 1e-6 else math.inf
    assert isinstance(prim, Box)
    best = math.inf
    for axis in range(3):                                                     # the six faces as rectangles
        for sign in (-1, 1):
            n = prim.rot[:, axis] * sign
            center = prim.center + n * prim.half[axis]
            others = [k for k in range(3) if k != axis]
            face = Rect(center, np.stack([prim.rot[:, others[0]], prim.rot[:, others[1]], n]),
                        prim.half[others], prim.material)
            best = min(best, reference_hit(face, o, d))
    return best


def test_depth_and_points_agree_with_projection_and_geometry(scene):
    geometry = scene.meta["geometry"]
    gen = np.random.default_rng(0)
    S, (H, W) = scene.num_frames, scene.image_hw
    for k in range(S):
        K, E = scene.intrinsics[k].double().numpy(), scene.extrinsics[k].double().numpy()
        R, t = E[:, :3], E[:, 3]
        vs, us = gen.integers(0, H, 40), gen.integers(0, W, 40)
        for v, u in zip(vs, us):
            d = R.T @ np.linalg.inv(K) @ np.array([u, v, 1.0])
            hits = [reference_hit(p, -R.T @ t, d) for p in geometry.primitives]
            t_ref = min(hits)
            if not math.isfinite(t_ref):
                assert not scene.valid[k, v, u] and scene.depth[k, v, u] == 0
                continue
            assert scene.valid[k, v, u]
            assert scene.depth[k, v, u].item() == pytest.approx(t_ref, rel=1e-6)
            assert int(scene.extras["object_id"][k, v, u]) == int(np.argmin(hits))
        # every valid pixel's world point projects back onto its own pixel centre
        uv, z = project_points(scene.world_points[k], scene.intrinsics[k], scene.extrinsics[k])
        vv, uu = torch.nonzero(scene.valid[k], as_tuple=True)
        err = (uv[vv, uu] - torch.stack([uu, vv], -1).double()).norm(dim=-1)
        assert err.max() < 1e-3
        torch.testing.assert_close(z[vv, uu].float(), scene.depth[k, vv, uu], rtol=1e-5, atol=0)


def test_world_points_lie_on_their_primitive(scene):
    geometry = scene.meta["geometry"]
    ids = scene.extras["object_id"]
    for k, prim in enumerate(geometry.primitives):
        pts = scene.world_points[ids == k].double().numpy()
        if not len(pts):
            continue
        if isinstance(prim, Sphere):
            resid = np.abs(np.linalg.norm(pts - prim.center, axis=-1) - prim.radius)
        elif isinstance(prim, Rect):
            resid = np.abs((pts - prim.center) @ prim.axes[2])
        else:
            q = np.abs((pts - prim.center) @ prim.rot) - prim.half
            resid = np.abs(q.max(-1))                                          # on the boundary: max = 0
        assert resid.max() < 1e-5, type(prim).__name__


def test_same_seed_same_scene_and_different_seed_differs():
    a = make_scene(scene_key("train", 3), preset="orbit", num_frames=3, height=28, width=42)
    b = make_scene(scene_key("train", 3), preset="orbit", num_frames=3, height=28, width=42)
    c = make_scene(scene_key("train", 4), preset="orbit", num_frames=3, height=28, width=42)
    for name in ("images", "extrinsics", "intrinsics", "depth", "world_points", "valid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)


def test_sizes_must_be_multiples_of_14_and_options_are_checked():
    assert make_scene(1, num_frames=1, height=14, width=28).image_hw == (14, 28)
    with pytest.raises(ValueError, match="multiple of 14"):
        make_scene(1, height=30)
    with pytest.raises(TypeError, match="unknown synthetic option"):
        make_scene(1, heigth=28)
    with pytest.raises(KeyError, match="orbit"):
        make_scene(1, preset="spiral")
    with pytest.raises(KeyError, match="synthetic"):
        build_scenes("imagenet")


def test_grid_preset_takes_dtu_stride_subsets():
    full = make_scene(scene_key("test", 1), preset="grid", num_frames=49, roll_deg=0.0, height=14, width=14)
    ten = make_scene(scene_key("test", 1), preset="grid", num_frames=10, roll_deg=0.0, height=14, width=14)
    torch.testing.assert_close(full.subset(list(range(0, 46, 5))).extrinsics, ten.extrinsics)


def test_forward_preset_sees_depth_everywhere_and_moves_forward():
    s = make_scene(scene_key("val", 2), preset="forward", num_frames=5, height=42, width=56)
    assert s.valid.all()
    c = s.camera_centers()
    assert (c[1:, 1] > c[:-1, 1]).all()                                       # +y is forward


def test_splits_never_overlap():
    keys = {split: {scene_key(split, i, seed) for i in range(50) for seed in range(3)} for split in SPLITS}
    for a in SPLITS:
        assert all(split_of(k) == a for k in keys[a])
        for b in SPLITS:
            if a < b:
                assert not keys[a] & keys[b]
    states = {split: np.random.default_rng(list(scene_key(split, 0))).integers(0, 2 ** 62) for split in SPLITS}
    assert len(set(states.values())) == len(SPLITS)
    tiny = dict(num_scenes=2, num_frames=1, height=14, width=14)
    ids = [s.scene_id for split in ("train", "calib") for s in build_scenes("synthetic", split=split, **tiny)]
    assert len(set(ids)) == 4
    with pytest.raises(ValueError, match="overlap: b"):
        check_disjoint(["a", "b"], ["b", "c"], "sequences")
    with pytest.raises(ValueError, match="2\\*\\*32"):
        scene_key("train", -1)


def test_test_split_is_shuffled_per_scene_reproducibly():
    opts = dict(num_scenes=3, num_frames=6, height=14, width=14)
    shuffled = build_scenes("synthetic", split="test", **opts)
    again = build_scenes("synthetic", split="test", **opts)
    plain = build_scenes("synthetic", split="test", shuffle_frames=False, **opts)
    assert any(s.frame_ids != list(range(6)) for s in shuffled)
    assert len({tuple(s.frame_ids) for s in shuffled}) > 1                   # a different order per scene
    for s, a, p in zip(shuffled, again, plain):
        assert s.frame_ids == a.frame_ids
        assert torch.equal(s.extrinsics, p.subset(s.frame_ids).extrinsics)
    assert build_scenes("synthetic", split="calib", **opts)[0].frame_ids == list(range(6))


def test_exact_correspondences_match_a_reference_shadow_ray(scene):
    uv, vis = exact_correspondences(scene, 1, 3)
    assert vis.any() and torch.isnan(uv[~vis]).all()
    H, W = scene.image_hw
    uv_all, z = project_points(scene.world_points[1], scene.intrinsics[3], scene.extrinsics[3])
    inside = scene.valid[1] & (z > 0) & (uv_all[..., 0] > -0.5) & (uv_all[..., 0] < W - 0.5) \
        & (uv_all[..., 1] > -0.5) & (uv_all[..., 1] < H - 0.5)
    assert not (vis & ~inside).any() and (inside & ~vis).any()               # some occlusion to test
    torch.testing.assert_close(uv[vis], uv_all[vis].float())
    # visibility against an independent scalar ray caster, on a sample of in-frame pixels
    center = scene.camera_centers()[3].double().numpy()
    rows, cols = torch.nonzero(inside, as_tuple=True)
    pick = np.random.default_rng(1).choice(len(rows), min(150, len(rows)), replace=False)
    for r, c in zip(rows[pick].tolist(), cols[pick].tolist()):
        p = scene.world_points[1, r, c].double().numpy()
        t = min(reference_hit(prim, center, p - center) for prim in scene.meta["geometry"].primitives)
        assert bool(vis[r, c]) == (t >= 1 - 1e-5), (r, c, t)
    # a visible pixel lands where frame 3 sees (nearly) the same 3-D point
    v0, u0 = torch.nonzero(vis, as_tuple=True)
    uj = uv[v0, u0].round().long()
    dst = scene.world_points[3, uj[:, 1], uj[:, 0]]
    footprint = 2 * scene.depth[3, uj[:, 1], uj[:, 0]] / scene.intrinsics[3, 0, 0]   # ~ two pixels
    near = (scene.world_points[1, v0, u0] - dst).norm(dim=-1) <= footprint
    assert near.float().mean() > 0.93                                         # misses: grazing ground at 56 px


def test_depth_test_reprojection_is_conservative(scene):
    _, vis = exact_correspondences(scene, 0, 1)
    uv_d, vis_d = reproject_pixels(scene, 0, 1)
    assert vis_d.any() and torch.isnan(uv_d[~vis_d]).all()
    assert (vis_d & ~vis).sum() <= 0.03 * vis_d.sum()                       # rarely claims an occluded pixel
    assert (vis_d & vis).sum() >= 0.75 * vis.sum()                         # misses: grazing surfaces


def test_exact_correspondences_survive_permute_and_normalize():
    s = make_scene(scene_key("val", 9), num_frames=3, height=42, width=42)
    uv, vis = exact_correspondences(s, 0, 2)
    p = s.permute([2, 0, 1])
    uv_p, vis_p = exact_correspondences(p, 1, 0)
    assert torch.equal(vis, vis_p) and torch.allclose(uv[vis], uv_p[vis_p])
    n = normalize_scene(s)
    uv_n, vis_n = exact_correspondences(n, 0, 2)
    assert (vis_n == vis).float().mean() > 0.999 and (uv_n[vis & vis_n] - uv[vis & vis_n]).abs().max() < 1e-3


def test_normalize_scene_first_camera_and_unit_mean_distance():
    s = make_scene(scene_key("val", 4), num_frames=4, height=28, width=28, units="mm")
    n = normalize_scene(s)
    torch.testing.assert_close(n.extrinsics[0], torch.eye(3, 4), atol=1e-5, rtol=0)
    assert n.world_points[n.valid].norm(dim=-1).mean().item() == pytest.approx(1.0, abs=1e-5)
    rot, trans = M.relative_pose_errors(n.extrinsics, s.extrinsics)
    assert rot.max() < 1e-2 and trans.max() < 1e-2                            # a similarity of the world
    with pytest.raises(ValueError, match="already normalised"):
        normalize_scene(n)
    first = s.subset([0])
    empty = normalize_scene(dataclasses.replace(first, valid=torch.zeros_like(first.valid)))
    assert empty.meta["normalization_degenerate"] and empty.meta["normalization"]["scale"] == 1.0


def test_scene_contract_and_helpers():
    s = make_scene(scene_key("val", 5), num_frames=4, height=14, width=28)
    assert s.num_frames == 4 and s.image_hw == (14, 28) and s.dataset == "synthetic" and s.category == "orbit"
    sub = s.subset([3, 1])
    assert sub.frame_ids == [3, 1] and torch.equal(sub.images[0], s.images[3])
    assert torch.equal(sub.extras["object_id"][1], s.extras["object_id"][1])
    assert s.to("cpu").images.device.type == "cpu"
    centers = s.camera_centers()
    torch.testing.assert_close((s.extrinsics[:, :, :3] @ centers[..., None])[..., 0] + s.extrinsics[:, :, 3],
                               torch.zeros(4, 3), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="permutation"):
        s.permute([0, 0, 1, 2])
    fields = {k: getattr(s, k) for k in ("images", "extrinsics", "intrinsics", "depth", "world_points", "valid")}
    bad = {"extrinsics": s.extrinsics[:, :, :3], "valid": s.valid.float(), "images": s.images * 2,
           "depth": s.depth.masked_fill(~s.valid, float("nan"))}
    for name, value in bad.items():
        with pytest.raises((ValueError, TypeError), match=name):
            Scene(**{**fields, name: value}, scene_id="x", frame_ids=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="frame_ids"):
        Scene(**fields, scene_id="x", frame_ids=[0])


@pytest.mark.slow
def test_render_speed_ten_frames_224():
    torch.set_num_threads(1)
    make_scene(scene_key("train", 0), num_frames=2)                           # warm-up
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        make_scene(scene_key("train", i), num_frames=10, height=224, width=224)
        times.append(time.perf_counter() - t0)
    print(f"10 frames 224x224: {min(times):.3f}s best, {np.mean(times):.3f}s mean")
    assert min(times) < 1.0
