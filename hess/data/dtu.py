"""DTU loader for the MVSNet camera format with depth and mask folders (``evaluation.md`` §2.2-2.4), the
Spann3R-preprocessed layout used by π³:

    DTU_ROOT/scan{N}/images/{id:08d}.jpg|png   cams/{id:08d}_cam.txt   depths/{id:08d}.npy
                     binary_masks/{id:08d}.png

    scenes = build_scenes("dtu", root=...)          # the 22 test scans, views 0, 5, ..., 45

The root comes from ``root=`` or ``$HESS_DTU_ROOT``. Units are the files' (mm for DTU).
``write_dtu_scan`` writes a Scene in exactly this layout (the format adapter the tests load back).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from hess.data.co3d import resolve_root
from hess.data.preprocess import load_rgb, resize_nearest, resize_rgb, scale_intrinsics, stack_views, vggt_size
from hess.data.scene import DATASETS, Scene

DTU_TEST_SCANS = (1, 4, 9, 10, 11, 12, 13, 15, 23, 24, 29, 32, 33, 34, 48, 49, 62, 75, 77, 110, 114, 118)
DTU_VAL_SCANS = (3, 5, 17, 21, 28, 35, 37, 38, 40, 43, 56, 59, 66, 67, 82, 86, 106, 117)
_IMAGE_EXTS = (".jpg", ".png")


def read_mvsnet_cam(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Parse an MVSNet ``*_cam.txt``: "extrinsic", 16 numbers (4×4 world-to-camera, row-major),
    "intrinsic", 9 numbers (3×3 K), then DEPTH_MIN DEPTH_INTERVAL [DEPTH_NUM [DEPTH_MAX]].

    Returns (E [4, 4], K [3, 3], (depth_min, depth_interval, depth_num, depth_max)); DEPTH_NUM defaults to
    192 and DEPTH_MAX to min + interval·num. A missing file or a malformed one raises an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MVSNet camera file not found: {path}")
    tok = path.read_text().split()
    if len(tok) < 29 or tok[0] != "extrinsic" or tok[17] != "intrinsic":
        raise ValueError(f"malformed MVSNet camera file {path}: expected 'extrinsic' + 16 numbers, "
                         f"'intrinsic' + 9 numbers and a depth range, got {len(tok)} tokens")
    try:
        E = np.array(tok[1:17], dtype=np.float64).reshape(4, 4)
        K = np.array(tok[18:27], dtype=np.float64).reshape(3, 3)
        rng = [float(x) for x in tok[27:31]]
    except ValueError as exc:
        raise ValueError(f"malformed MVSNet camera file {path}: {exc}") from exc
    d_min, d_int = rng[0], rng[1]
    d_num = rng[2] if len(rng) > 2 else 192.0
    d_max = rng[3] if len(rng) > 3 else d_min + d_int * d_num
    return E, K, (d_min, d_int, d_num, d_max)


def write_mvsnet_cam(path: Path, E: np.ndarray, K: np.ndarray, depth_min: float = 425.0,
                     depth_interval: float = 2.5, depth_num: float | None = None) -> None:
    """Write E [4, 4] (or [3, 4]) and K [3, 3] in the MVSNet format."""
    E4 = np.eye(4)
    E4[:3] = np.asarray(E, np.float64)[:3]
    rows = ["extrinsic", *(" ".join(f"{v:.17g}" for v in r) for r in E4), "",
            "intrinsic", *(" ".join(f"{v:.17g}" for v in r) for r in np.asarray(K, np.float64)), "",
            " ".join(f"{v:.17g}" for v in ([depth_min, depth_interval] + ([depth_num] if depth_num else [])))]
    Path(path).write_text("\n".join(rows) + "\n")


def erode_mask(mask: np.ndarray, size: int = 10) -> np.ndarray:
    """Binary erosion by a size×size square with OpenCV's anchor (size//2) and border rule (outside
    counts as set): out[i] = all(mask[i - size//2 : i - size//2 + size]) per axis."""
    if size <= 1:
        return mask.astype(bool)
    return ndimage.minimum_filter(mask.astype(np.uint8), size=size, mode="constant", cval=1).astype(bool)


def _image_path(scan_dir: Path, view: int) -> Path:
    for ext in _IMAGE_EXTS:
        p = scan_dir / "images" / f"{view:08d}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"DTU image not found: {scan_dir / 'images' / f'{view:08d}.jpg'} (or .png)")


def count_views(scan_dir: Path) -> int:
    """Number of contiguous views 00000000, 00000001, … in scan_dir/images (a gap raises)."""
    names = sorted(p.stem for p in (scan_dir / "images").glob("*") if p.suffix in _IMAGE_EXTS)
    if not names:
        raise FileNotFoundError(f"no DTU images in {scan_dir / 'images'}")
    if names != [f"{i:08d}" for i in range(len(names))]:
        raise ValueError(f"DTU images in {scan_dir / 'images'} must be contiguous 00000000..{len(names) - 1:08d}")
    return len(names)


def load_dtu_view(scan_dir: Path, view: int, image_width: int = 518, erode_size: int = 10,
                  parity: bool = True, max_height: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GT of one view (§2.4): image, depth (mask-eroded), valid, K, E at width ``image_width``.

    The image is resized to the depth size, the mask binarised (> 0.5), resized (nearest) and eroded
    with a size×size kernel, then multiplied into the depth; everything is resized to width
    image_width and height round(H·w/W/14)·14 (depth/mask nearest). parity=True scales K by
    max(out/in) on both axes, as π³ does (the GT is then slightly anisotropic); False scales per axis.
    """
    scan_dir = Path(scan_dir)
    img = load_rgb(_image_path(scan_dir, view))
    E, K, _ = read_mvsnet_cam(scan_dir / "cams" / f"{view:08d}_cam.txt")
    depth_path, mask_path = scan_dir / "depths" / f"{view:08d}.npy", scan_dir / "binary_masks" / f"{view:08d}.png"
    if not depth_path.is_file():
        raise FileNotFoundError(f"DTU depth not found: {depth_path}")
    if not mask_path.is_file():
        raise FileNotFoundError(f"DTU mask not found: {mask_path}")
    try:
        depth = np.nan_to_num(np.load(depth_path).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    except ValueError as exc:
        raise ValueError(f"malformed DTU depth {depth_path}: {exc}") from exc
    if depth.ndim != 2:
        raise ValueError(f"DTU depth {depth_path} must be [H, W], got {depth.shape}")
    H, W = depth.shape
    K = scale_intrinsics(K, W / img.size[0], H / img.size[1])               # identity when sizes agree
    with Image.open(mask_path) as m:
        mask = np.asarray(m.convert("L"), dtype=np.float32) / 255.0 > 0.5
    mask = erode_mask(resize_nearest(mask, (H, W)), erode_size)
    depth = depth * mask
    new_h, new_w = vggt_size(H, W, image_width)
    image = resize_rgb(img, (new_h, new_w))
    depth = resize_nearest(depth, (new_h, new_w))
    sx, sy = new_w / W, new_h / H
    K = scale_intrinsics(K, max(sx, sy), max(sx, sy)) if parity else scale_intrinsics(K, sx, sy)
    if max_height is not None and new_h > max_height:                       # centre crop, as VGGT's loader
        top = (new_h - int(max_height)) // 2
        image, depth = image[top:top + int(max_height)], depth[top:top + int(max_height)]
        K = K.copy()
        K[1, 2] -= top
    return image, depth, depth > 1e-4, K, E


@DATASETS.register("dtu")
def build_dtu(root: str | Path | None = None, scans: Sequence[int] = DTU_TEST_SCANS, view_stride: int = 5,
              views: Sequence[int] | None = None, image_width: int = 518, erode_size: int = 10,
              parity: bool = True, num_frames: int | None = None, seed: int = 0,
              max_height: int | None = None) -> list[Scene]:
    """DTU scans as Scenes; views 0, stride, 2·stride, … < number of images (0..45 for 49 views), or the
    explicit ``views``. category = "scan{N}".

    ``num_frames``: keep that many of those views, a seeded (``seed``) subset in increasing view order
    (None = all, the protocol's 10); more than the scan offers raises.  ``max_height``: centre-crop taller
    frames (518-wide DTU frames are 392 high).  Only the scans in ``scans`` are read.
    """
    root = resolve_root(root, "HESS_DTU_ROOT", "DTU")
    scenes = []
    for scan in scans:
        scan_dir = root / f"scan{scan}"
        if not scan_dir.is_dir():
            raise FileNotFoundError(f"DTU scan folder not found: {scan_dir}")
        ids = list(views) if views is not None else list(range(0, count_views(scan_dir), view_stride))
        if num_frames is not None:
            if num_frames > len(ids):
                raise ValueError(f"{scan_dir} offers {len(ids)} views (stride {view_stride}) but num_frames={num_frames}")
            pick = np.random.RandomState(seed).choice(len(ids), num_frames, replace=False)
            ids = [ids[i] for i in sorted(pick.tolist())]
        per_view = [load_dtu_view(scan_dir, v, image_width, erode_size, parity, max_height) for v in ids]
        images, depths, valids, Ks, Es = (list(x) for x in zip(*per_view))
        scenes.append(Scene(**stack_views(images, depths, valids, Ks, Es), scene_id=f"dtu/scan{scan}",
                            frame_ids=ids, category=f"scan{scan}", dataset="dtu", meta={"units": "mm"}))
    return scenes


def write_dtu_scan(root: Path, scan: int, scene: Scene, mask: np.ndarray | None = None,
                   image_ext: str = ".png") -> Path:
    """Write a Scene as ``root/scan{scan}`` in the layout above (view k = frame k); mask [S, H, W]
    defaults to scene.valid. Returns the scan folder."""
    scan_dir = Path(root) / f"scan{scan}"
    for sub in ("images", "cams", "depths", "binary_masks"):
        (scan_dir / sub).mkdir(parents=True, exist_ok=True)
    masks = scene.valid.numpy() if mask is None else np.asarray(mask)
    for k in range(scene.num_frames):
        rgb = (scene.images[k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(scan_dir / "images" / f"{k:08d}{image_ext}")
        write_mvsnet_cam(scan_dir / "cams" / f"{k:08d}_cam.txt", scene.extrinsics[k].double().numpy(),
                         scene.intrinsics[k].double().numpy())
        np.save(scan_dir / "depths" / f"{k:08d}.npy", scene.depth[k].numpy().astype(np.float32))
        Image.fromarray((masks[k] > 0).astype(np.uint8) * 255).save(scan_dir / "binary_masks" / f"{k:08d}.png")
    return scan_dir
