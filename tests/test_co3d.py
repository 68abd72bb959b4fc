"""CO3Dv2 loader: conversions vs hand-computed matrices, a tiny dataset written in the real layout and
loaded back, VGGT's sampling path, and errors that name the offending file."""
from __future__ import annotations

import gzip
import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hess.data import build_scenes, make_scene, scene_key
from hess.data.co3d import (build_frame_id_map, load_frame_id_map, ndc_to_pixel_intrinsics, opencv_to_pt3d_extrinsics,
                            pixel_to_ndc_intrinsics, pt3d_to_opencv_extrinsics, read_co3d_depth, save_frame_id_map,
                            write_co3d_category)

LOAD = dict(num_frames=3, min_num_images=4, load_depth=True)


@pytest.fixture(scope="module")
def scenes():
    opts = dict(preset="orbit", num_frames=6, height=28, width=42)
    return {name: make_scene(scene_key("val", 100 + k), **opts) for k, name in enumerate(["seq_a", "seq_b", "seq_c"])}


@pytest.fixture()
def root(tmp_path, scenes):
    write_co3d_category(tmp_path, "apple", scenes, subsets={"seq_a": "test", "seq_b": "test", "seq_c": "train"},
                        quality={"seq_b": 0.2})
    return tmp_path


def test_pt3d_to_opencv_extrinsics_by_hand():
    R = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])                      # 90° about z
    T = np.array([1.0, 2, 3])
    E = pt3d_to_opencv_extrinsics(R, T)
    np.testing.assert_array_equal(E, [[0, -1, 0, -1], [1, 0, 0, -2], [0, 0, 1, 3]])
    X = np.array([0.3, -0.7, 2.0])
    x_pt3d = X @ R + T                                                        # row-vector convention
    np.testing.assert_allclose(E[:, :3] @ X + E[:, 3], x_pt3d * [-1, -1, 1])  # +X left/+Y up -> right/down
    R2, T2 = opencv_to_pt3d_extrinsics(E)
    np.testing.assert_allclose(R2, R)
    np.testing.assert_allclose(T2, T)


@pytest.mark.parametrize("fmt, expected", [
    ("ndc_isotropic", [[480, 0, 296], [0, 480, 288], [0, 0, 1]]),             # s = min(480, 640)/2 = 240
    ("ndc_norm_image_bounds", [[640, 0, 288], [0, 480, 288], [0, 0, 1]]),     # s_x = 320, s_y = 240
])
def test_ndc_to_pixel_intrinsics_by_hand(fmt, expected):
    K = ndc_to_pixel_intrinsics([2.0, 2.0], [0.1, -0.2], (480, 640), fmt)
    np.testing.assert_allclose(K, expected)
    focal, pp = pixel_to_ndc_intrinsics(K, (480, 640), fmt)
    np.testing.assert_allclose(focal, [2.0, 2.0])
    np.testing.assert_allclose(pp, [0.1, -0.2])
    with pytest.raises(ValueError, match="intrinsics_format"):
        ndc_to_pixel_intrinsics([2.0, 2.0], [0, 0], (480, 640), "screen")


def test_written_dataset_loads_back_exactly(root, scenes):
    out = build_scenes("co3d", root=root, categories=["apple"], image_width=42, **LOAD)
    assert [s.scene_id for s in out] == ["co3d/apple/seq_a"]                 # seq_b: quality 0.2 <= 0.5
    s = out[0]
    ids = np.random.RandomState(0).choice(6, 3, replace=False).tolist()       # VGGT's first draw
    assert s.frame_ids == ids and s.category == "apple" and s.dataset == "co3d"
    ref = scenes["seq_a"].subset(ids)
    torch.testing.assert_close(s.extrinsics, ref.extrinsics, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.intrinsics, ref.intrinsics, atol=1e-4, rtol=0)
    assert torch.equal(s.valid, ref.valid)
    torch.testing.assert_close(s.depth, ref.depth, rtol=1e-3, atol=0)        # float16 depth PNGs
    torch.testing.assert_close(s.world_points[s.valid], ref.world_points[ref.valid], rtol=0, atol=5e-3)
    assert (s.images - ref.images).abs().max() <= 0.5 / 255 + 1e-6


def test_legacy_intrinsics_format_round_trips(tmp_path, scenes):
    write_co3d_category(tmp_path, "apple", {"seq_a": scenes["seq_a"]}, {"seq_a": "test"},
                        intrinsics_format="ndc_norm_image_bounds")
    s = build_scenes("co3d", root=tmp_path, categories=["apple"], image_width=42, **LOAD)[0]
    torch.testing.assert_close(s.intrinsics, scenes["seq_a"].intrinsics[:3], atol=1e-4, rtol=0)


def test_portrait_frames_are_center_cropped(tmp_path):
    tall = make_scene(scene_key("val", 200), num_frames=4, height=56, width=28)
    write_co3d_category(tmp_path, "bench", {"s": tall}, {"s": "test"})
    s = build_scenes("co3d", root=tmp_path, categories=["bench"], image_width=28, **LOAD)[0]
    ref = tall.subset(s.frame_ids)
    assert s.image_hw == (28, 28)                                             # height 56 > 28: crop rows 14..41
    torch.testing.assert_close(s.intrinsics[:, 1, 2], ref.intrinsics[:, 1, 2] - 14)
    assert (s.images - ref.images[:, :, 14:42]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(s.valid, ref.valid[:, 14:42])
    torch.testing.assert_close(s.world_points[s.valid], ref.world_points[:, 14:42][s.valid], rtol=0, atol=5e-3)


def test_downscaling_follows_the_nearest_rule_and_pixel_centre_intrinsics(tmp_path):
    wide = make_scene(scene_key("val", 201), num_frames=4, height=28, width=56)
    write_co3d_category(tmp_path, "cup", {"s": wide}, {"s": "test"})
    s = build_scenes("co3d", root=tmp_path, categories=["cup"], image_width=28, **LOAD)[0]
    ref = wide.subset(s.frame_ids)
    assert s.image_hw == (14, 28)
    f = ref.intrinsics[0, 0, 0].item()
    # K scaled by 1/2 with the pixel-centre shift: c' = 0.5·(c + 0.5) - 0.5, c = (28, 14)
    torch.testing.assert_close(s.intrinsics[0].double(), torch.tensor([[f / 2, 0, 13.75], [0, f / 2, 6.75], [0, 0, 1]],
                                                                      dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.depth, ref.depth[:, ::2, ::2], rtol=1e-3, atol=0)


def test_depth_png_holds_float16_bits(tmp_path):
    depth = np.array([[0.5, 1.25], [np.nan, 3.0]], dtype=np.float16)
    Image.fromarray(depth.view(np.uint16)).save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_co3d_depth(tmp_path / "d.png", 2.0), [[1.0, 2.5], [0.0, 6.0]])


def _frames(n: int, t_sum: float = 0.0) -> list[dict]:
    return [{"T": [t_sum, 0.0, 0.0]} for _ in range(n)]


def test_frame_id_map_follows_vggt_rng_path():
    ann = {"apple": {"c": _frames(60), "a": _frames(60), "b": _frames(30), "d": _frames(70, 2e5)},
           "bench": {"e": _frames(55)}}
    got = build_frame_id_map(ann, seed=0)
    ref = np.random.RandomState(0)                                            # b and d skip without a draw
    draw = lambda n: ref.choice(n, 10, replace=False).tolist()              # noqa: E731
    expected = {"apple/a": draw(60), "apple/c": draw(60), "bench/e": draw(55)}
    assert got == expected and list(got) == list(expected)
    without_skipped = build_frame_id_map({"apple": {"a": _frames(60), "c": _frames(60)}, "bench": {"e": _frames(55)}})
    assert without_skipped == got


def test_fast_eval_samples_ten_sequences_with_python_random():
    names = [f"s{k:02d}" for k in range(12)]
    got = build_frame_id_map({"apple": {n: _frames(50) for n in names}}, seed=3, fast_eval=True)
    kept = sorted(random.Random(3).sample(names, 10))
    assert [k.split("/")[1] for k in got] == kept


def test_frozen_map_round_trip_and_errors(root, tmp_path_factory):
    path = tmp_path_factory.mktemp("maps") / "ids.json"
    save_frame_id_map(path, {"apple/seq_a": [5, 0, 2]})
    assert load_frame_id_map(path) == {"apple/seq_a": [5, 0, 2]}
    s = build_scenes("co3d", root=root, categories=["apple"], frame_id_map=path, image_width=42)[0]
    assert s.frame_ids == [5, 0, 2]
    with pytest.raises(ValueError, match="apple/seq_b"):                     # filtered by quality
        build_scenes("co3d", root=root, categories=["apple"], frame_id_map={"apple/seq_b": [0]}, image_width=42)
    path.write_text('{"apple/seq_a": "oops"}')
    with pytest.raises(ValueError, match="ids.json"):
        load_frame_id_map(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_frame_id_map(path.parent / "nope.json")


def test_calibration_split_uses_train_and_rejects_shared_sequences(root, scenes):
    calib = build_scenes("co3d", root=root, categories=["apple"], split="calib", image_width=42, **LOAD)
    assert [s.scene_id for s in calib] == ["co3d/apple/seq_c"]
    lists = root / "apple" / "set_lists" / "set_lists_fewview_dev.json"
    data = json.loads(lists.read_text())
    data["train"].append(data["test"][0])
    lists.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="overlap: seq_a"):
        build_scenes("co3d", root=root, categories=["apple"], split="calib", image_width=42, **LOAD)


def test_missing_and_malformed_files_name_the_file(root):
    cat = root / "apple"
    shutil.copy(cat / "frame_annotations.jgz", root / "frames.bak")
    (cat / "frame_annotations.jgz").unlink()
    with pytest.raises(FileNotFoundError, match="frame_annotations.jgz"):
        build_scenes("co3d", root=root, categories=["apple"], **LOAD)
    (cat / "frame_annotations.jgz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="frame_annotations.jgz"):
        build_scenes("co3d", root=root, categories=["apple"], **LOAD)
    with gzip.open(root / "frames.bak", "rt") as f:
        frames = json.load(f)
    del frames[0]["viewpoint"]["R"]
    with gzip.open(cat / "frame_annotations.jgz", "wt") as f:
        json.dump(frames, f)
    with pytest.raises(ValueError, match="frame_annotations.jgz"):
        build_scenes("co3d", root=root, categories=["apple"], **LOAD)
    shutil.copy(root / "frames.bak", cat / "frame_annotations.jgz")
    (cat / "seq_a" / "images" / "frame000000.png").unlink()
    with pytest.raises(FileNotFoundError, match="frame000000.png"):
        build_scenes("co3d", root=root, categories=["apple"], frame_id_map={"apple/seq_a": [0]})
    (cat / "set_lists" / "set_lists_fewview_dev.json").unlink()
    with pytest.raises(FileNotFoundError, match="set_lists_fewview_dev.json"):
        build_scenes("co3d", root=root, categories=["apple"], **LOAD)
    with pytest.raises(FileNotFoundError, match="banana"):
        build_scenes("co3d", root=root, categories=["banana"])


def test_root_from_env_or_a_clear_error(root, monkeypatch, tmp_path_factory):
    monkeypatch.delenv("HESS_CO3D_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="HESS_CO3D_ROOT"):
        build_scenes("co3d")
    monkeypatch.setenv("HESS_CO3D_ROOT", str(root))
    assert [s.scene_id for s in build_scenes("co3d", image_width=42, **LOAD)] == ["co3d/apple/seq_a"]
    with pytest.raises(FileNotFoundError, match="no CO3D category"):
        build_scenes("co3d", root=tmp_path_factory.mktemp("empty"))
