"""Image/depth resizing shared by the real-data loaders, and the intrinsics bookkeeping that goes with it.

Conventions: integer pixel centres (u = column, v = row). Resizing an axis by ``s`` maps a pixel
coordinate x to ``s·(x + 0.5) - 0.5``, so ``f' = s·f`` and ``c' = s·(c + 0.5) - 0.5`` (the ±0.5
pixel-centre shift of ``evaluation.md`` §2.4); cropping subtracts the crop offset from c.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hess.data.geometry import unproject_depth


def load_rgb(path: Path) -> Image.Image:
    """An RGB PIL image; a missing or unreadable file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:                                                 # PIL raises many types
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def vggt_size(H: int, W: int, width: int = 518) -> tuple[int, int]:
    """(new_H, new_W) of VGGT's crop preprocessing before the crop: width ``width`` and height
    ``round(H·width/W/14)·14`` (Python's round)."""
    return int(round(H * (width / W) / 14) * 14), int(width)


def resize_rgb(img: Image.Image, size_hw: tuple[int, int], resample: int = Image.BICUBIC) -> np.ndarray:
    """PIL resize to size_hw -> float32 [H, W, 3] in [0, 1]."""
    out = img.resize((size_hw[1], size_hw[0]), resample) if img.size != (size_hw[1], size_hw[0]) else img
    return np.asarray(out, dtype=np.float32) / 255.0


def resize_nearest(arr: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with OpenCV's INTER_NEAREST rule: source index = floor(i·in/out).

    arr: [H, W, ...] -> [h, w, ...].
    """
    H, W = arr.shape[:2]
    h, w = size_hw
    rows = np.minimum(np.floor(np.arange(h) * (H / h)).astype(np.int64), H - 1)
    cols = np.minimum(np.floor(np.arange(w) * (W / w)).astype(np.int64), W - 1)
    return arr[rows][:, cols]


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K [3, 3] of an image resized by (sx, sy) along (u, v), with the pixel-centre shift."""
    K = np.array(K, dtype=np.float64)
    K[0, 0], K[0, 2] = K[0, 0] * sx, sx * (K[0, 2] + 0.5) - 0.5
    K[1, 1], K[1, 2] = K[1, 1] * sy, sy * (K[1, 2] + 0.5) - 0.5
    return K


def crop_resize(img: Image.Image, depth: np.ndarray | None, valid: np.ndarray | None, K: np.ndarray,
                width: int = 518, max_height: int | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """VGGT ``load_and_preprocess_images(mode="crop")`` plus the matching depth, mask and intrinsics.

    BICUBIC to width ``width`` and height round(H·width/W/14)·14; if that height exceeds ``max_height``
    (default ``width``, VGGT's rule), centre-crop it to ``max_height``. Depth and mask are resized with
    the nearest rule.
    Returns image [h, w, 3] float32, depth [h, w] or None, valid [h, w] or None, K [3, 3].
    """
    limit = width if max_height is None else int(max_height)
    W, H = img.size
    new_h, new_w = vggt_size(H, W, width)
    image = resize_rgb(img, (new_h, new_w))
    K = scale_intrinsics(K, new_w / W, new_h / H)
    if depth is not None:
        depth = resize_nearest(depth, (new_h, new_w))
    if valid is not None:
        valid = resize_nearest(valid, (new_h, new_w))
    if new_h > limit:
        top = (new_h - limit) // 2
        image = image[top:top + limit]
        depth = None if depth is None else depth[top:top + limit]
        valid = None if valid is None else valid[top:top + limit]
        K[1, 2] -= top
    return image, depth, valid, K


def stack_views(images: list[np.ndarray], depths: list[np.ndarray], valids: list[np.ndarray],
                Ks: list[np.ndarray], Es: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Per-view arrays -> the tensor fields of a Scene (float32; depth 0 where invalid; world points by
    unprojection). Raises if the views do not share one image size."""
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"views of one scene must share an image size after preprocessing, got {sorted(shapes)}")
    valid = torch.from_numpy(np.stack(valids)).bool()
    depth = torch.from_numpy(np.stack(depths).astype(np.float64))
    valid &= torch.isfinite(depth) & (depth > 1e-4)
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    K = torch.from_numpy(np.stack(Ks)).double()
    E = torch.from_numpy(np.stack(Es)[:, :3, :4]).double()
    return {"images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().contiguous(),
            "extrinsics": E.float(), "intrinsics": K.float(), "depth": depth.float(),
            "world_points": unproject_depth(depth, K, E).float(), "valid": valid}
