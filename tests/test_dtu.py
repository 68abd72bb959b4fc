"""DTU loader: MVSNet cameras vs hand-written files, erosion and intrinsics scaling by hand, a scan
written in the Spann3R layout and loaded back, and errors naming the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hess.data import build_scenes, make_scene, scene_key
from hess.data.dtu import (DTU_TEST_SCANS, erode_mask, load_dtu_view, read_mvsnet_cam, write_dtu_scan,
                           write_mvsnet_cam)
from hess.data.preprocess import vggt_size

CAM_TXT = """extrinsic
0.970263 0.00747983 0.241939 -191.02
-0.0147429 0.999493 0.0282234 3.28832
-0.241605 -0.0309588 0.969881 22.5401
0.0 0.0 0.0 1.0

intrinsic
2892.33 0 823.205
0 2883.18 619.071
0 0 1

425 2.5
"""


@pytest.fixture(scope="module")
def grid_scene():
    return make_scene(scene_key("val", 300), preset="grid", num_frames=12, height=28, width=42, units="mm")


def test_read_mvsnet_cam_by_hand(tmp_path):
    (tmp_path / "c.txt").write_text(CAM_TXT)
    E, K, rng = read_mvsnet_cam(tmp_path / "c.txt")
    np.testing.assert_array_equal(E[0], [0.970263, 0.00747983, 0.241939, -191.02])
    np.testing.assert_array_equal(E[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(K, [[2892.33, 0, 823.205], [0, 2883.18, 619.071], [0, 0, 1]])
    assert rng == (425.0, 2.5, 192.0, 425.0 + 2.5 * 192)                     # DEPTH_NUM defaults to 192
    (tmp_path / "d.txt").write_text(CAM_TXT.replace("425 2.5", "425 2.5 256 1065"))
    assert read_mvsnet_cam(tmp_path / "d.txt")[2] == (425.0, 2.5, 256.0, 1065.0)


def test_mvsnet_cam_write_read_is_identity(tmp_path):
    E = np.eye(4)
    E[:3, :3] = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    E[:3, 3] = [12.5, -3.25, 700.125]
    K = np.array([[1234.5, 0, 400.25], [0, 1230.75, 300.5], [0, 0, 1]])
    write_mvsnet_cam(tmp_path / "c.txt", E, K, 425.0, 2.5)
    E2, K2, rng = read_mvsnet_cam(tmp_path / "c.txt")
    np.testing.assert_array_equal(E2, E)
    np.testing.assert_array_equal(K2, K)
    assert rng[:2] == (425.0, 2.5)


def test_malformed_or_missing_cam_names_the_file(tmp_path):
    (tmp_path / "a_cam.txt").write_text(CAM_TXT.replace("intrinsic", "intrinsics"))
    with pytest.raises(ValueError, match="a_cam.txt"):
        read_mvsnet_cam(tmp_path / "a_cam.txt")
    (tmp_path / "b_cam.txt").write_text(CAM_TXT.replace("2892.33", "abc"))
    with pytest.raises(ValueError, match="b_cam.txt"):
        read_mvsnet_cam(tmp_path / "b_cam.txt")
    (tmp_path / "c_cam.txt").write_text("extrinsic 1 0 0")
    with pytest.raises(ValueError, match="c_cam.txt"):
        read_mvsnet_cam(tmp_path / "c_cam.txt")
    with pytest.raises(FileNotFoundError, match="z_cam.txt"):
        read_mvsnet_cam(tmp_path / "z_cam.txt")


def test_erosion_uses_opencv_anchor_and_border():
    mask = np.ones((20, 20), bool)
    mask[10, 10] = False
    expected = np.ones((20, 20), bool)
    expected[6:16, 6:16] = False                                              # offsets -5..+4 -> rows 6..15
    np.testing.assert_array_equal(erode_mask(mask, 10), expected)
    np.testing.assert_array_equal(erode_mask(np.ones((8, 8), bool), 10), np.ones((8, 8), bool))  # border kept


def test_intrinsics_scaling_by_hand(tmp_path):
    assert vggt_size(1200, 1600) == (392, 518)
    scene = make_scene(scene_key("val", 301), preset="grid", num_frames=1, height=84, width=112)
    scan = write_dtu_scan(tmp_path, 1, scene)
    K = np.array([[100.0, 0, 50], [0, 100, 37.5], [0, 0, 1]])
    write_mvsnet_cam(scan / "cams" / "00000000_cam.txt", scene.extrinsics[0].double().numpy(), K)
    # 112x84 -> width 56, height round(84·0.5/14)·14 = 42: sx = sy = 0.5
    _, depth, _, K2, _ = load_dtu_view(scan, 0, image_width=56)
    assert depth.shape == (42, 56)
    np.testing.assert_allclose(K2, [[50, 0, 24.75], [0, 50, 18.5], [0, 0, 1]])
    # 112x84 -> width 70, height round(84·0.625/14)·14 = 56: sx = 0.625, sy = 2/3; parity scales by max
    _, depth, _, K3, _ = load_dtu_view(scan, 0, image_width=70)
    s = 56 / 84
    np.testing.assert_allclose(K3, [[100 * s, 0, s * 50.5 - 0.5], [0, 100 * s, s * 38 - 0.5], [0, 0, 1]])
    _, _, _, K4, _ = load_dtu_view(scan, 0, image_width=70, parity=False)
    np.testing.assert_allclose(K4, [[62.5, 0, 0.625 * 50.5 - 0.5], [0, 100 * s, s * 38 - 0.5], [0, 0, 1]])


def test_written_scan_loads_back(tmp_path, grid_scene):
    write_dtu_scan(tmp_path, 1, grid_scene)
    s = build_scenes("dtu", root=tmp_path, scans=[1], view_stride=1, image_width=42, erode_size=1)[0]
    assert s.scene_id == "dtu/scan1" and s.category == "scan1" and s.frame_ids == list(range(12))
    torch.testing.assert_close(s.extrinsics, grid_scene.extrinsics, atol=1e-3, rtol=0)     # mm
    torch.testing.assert_close(s.intrinsics, grid_scene.intrinsics)
    assert torch.equal(s.valid, grid_scene.valid) and torch.equal(s.depth, grid_scene.depth)
    torch.testing.assert_close(s.world_points[s.valid], grid_scene.world_points[s.valid], atol=1e-2, rtol=0)
    assert (s.images - grid_scene.images).abs().max() <= 0.5 / 255 + 1e-6


def test_stride_five_views_and_mask_erosion(tmp_path, grid_scene):
    write_dtu_scan(tmp_path, 4, grid_scene)
    s = build_scenes("dtu", root=tmp_path, scans=[4], image_width=42)[0]     # default stride 5, erode 10
    assert s.frame_ids == [0, 5, 10]
    eroded = torch.from_numpy(np.stack([erode_mask(grid_scene.valid[k].numpy(), 10) for k in (0, 5, 10)]))
    assert torch.equal(s.valid, eroded & grid_scene.valid[[0, 5, 10]])
    assert list(DTU_TEST_SCANS) == [1, 4, 9, 10, 11, 12, 13, 15, 23, 24, 29, 32, 33, 34, 48, 49, 62, 75, 77, 110,
                                    114, 118]


def test_missing_files_and_root_name_the_problem(tmp_path, grid_scene, monkeypatch):
    scan = write_dtu_scan(tmp_path, 9, grid_scene)
    (scan / "depths" / "00000005.npy").unlink()
    with pytest.raises(FileNotFoundError, match="00000005.npy"):
        build_scenes("dtu", root=tmp_path, scans=[9], image_width=42)
    (scan / "images" / "00000003.png").unlink()
    with pytest.raises(ValueError, match="contiguous"):
        build_scenes("dtu", root=tmp_path, scans=[9], image_width=42)
    with pytest.raises(FileNotFoundError, match="scan10"):
        build_scenes("dtu", root=tmp_path, scans=[10])
    monkeypatch.delenv("HESS_DTU_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="HESS_DTU_ROOT"):
        build_scenes("dtu")
    monkeypatch.setenv("HESS_DTU_ROOT", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="absent"):
        build_scenes("dtu")
