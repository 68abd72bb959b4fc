"""Image loading and resizing for VGGT, with the official conventions (vggt-architecture.md §12).

``load_and_preprocess_images(paths_or_arrays, mode)`` returns ``[N, 3, H, W]`` in [0, 1]:

* RGBA is composited onto **white**; everything is converted to RGB.
* ``mode="crop"`` (default): resize (bicubic) to width 518 and height ``round(h·518/w/14)·14``; a
  height above 518 is center-cropped to 518 (portrait images become 518×518).
* ``mode="pad"``: the long side becomes 518, the short side ``round(·/14)·14``; the image is then padded
  with 1.0 (white) to 518×518, centred.
* Images of different resulting sizes are padded (white, centred) to the largest height and width.

Inputs may be file paths, ``PIL.Image``s, or ``[H, W]``/``[H, W, 3]``/``[H, W, 4]`` arrays: ``uint8``
arrays go through PIL exactly like decoded files; float arrays (values in [0, 1]) are resized channel by
channel in PIL's float mode (bicubic), without quantisation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from hess.config import ConfigError

TARGET_SIZE = 518
PATCH = 14

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def _crop_size(width: int, height: int) -> tuple[int, int]:
    return TARGET_SIZE, round(height * (TARGET_SIZE / width) / PATCH) * PATCH


def _pad_size(width: int, height: int) -> tuple[int, int]:
    if width >= height:
        return TARGET_SIZE, round(height * (TARGET_SIZE / width) / PATCH) * PATCH
    return round(width * (TARGET_SIZE / height) / PATCH) * PATCH, TARGET_SIZE


# mode -> (width, height) -> (new_width, new_height)
_RESIZE_RULES: dict[str, Callable[[int, int], tuple[int, int]]] = {"crop": _crop_size, "pad": _pad_size}


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def _resize_pil(img: Image.Image, size: tuple[int, int]) -> Tensor:
    """RGB PIL image → resized [3, h, w] float in [0, 1]."""
    arr = np.asarray(_pil_to_rgb(img).resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _resize_float(arr: np.ndarray, mode: str) -> Tensor:
    """Float [H, W, C] in [0, 1] → resized [3, h, w] (alpha composited onto white)."""
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4]
        arr = arr[..., :3] * alpha + (1.0 - alpha)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    size = _RESIZE_RULES[mode](arr.shape[1], arr.shape[0])
    chans = [
        np.asarray(Image.fromarray(arr[..., c].astype(np.float32), mode="F").resize(size, Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return torch.from_numpy(np.stack(chans, axis=0).astype(np.float32))


def _load_one(item: ImageInput, mode: str) -> Tensor:
    """One input → resized (not yet cropped/padded) [3, h, w] in [0, 1]."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                return _resize_pil(img, _RESIZE_RULES[mode](*img.size))
        except (UnidentifiedImageError, OSError) as err:
            raise ConfigError(f"{path} is not an image that can be read ({type(err).__name__}); "
                              "pass PNG or JPEG files only") from err
    if isinstance(item, Image.Image):
        return _resize_pil(item, _RESIZE_RULES[mode](*item.size))
    if isinstance(item, np.ndarray):
        arr = item[..., None] if item.ndim == 2 else item
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {item.shape}")
        if arr.dtype == np.uint8:
            pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
            return _resize_pil(pil, _RESIZE_RULES[mode](*pil.size))
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise ValueError("image array contains NaN or inf")
            return _resize_float(arr, mode)
        raise ValueError(f"image array dtype must be uint8 or float in [0, 1], got {arr.dtype}")
    raise TypeError(f"expected a path, PIL.Image or numpy array, got {type(item).__name__}")


def _pad_to(img: Tensor, height: int, width: int) -> Tensor:
    """Centre ``img [3, h, w]`` in a white ``[3, height, width]`` canvas (extra pixel at bottom/right)."""
    dh, dw = height - img.shape[1], width - img.shape[2]
    if dh <= 0 and dw <= 0:
        return img
    return F.pad(img, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="constant", value=1.0)


def load_and_preprocess_images(paths_or_arrays: Sequence[ImageInput], mode: str = "crop") -> Tensor:
    """Load and resize images for VGGT.

    Args:
        paths_or_arrays: N image paths / PIL images / arrays (see module docstring).
        mode: ``"crop"`` or ``"pad"``.
    Returns:
        [N, 3, H, W] float32 in [0, 1]; H and W multiples of 14, W = 518 in crop mode, 518×518 in pad mode.
    """
    if mode not in _RESIZE_RULES:
        raise ValueError(f"mode must be one of {sorted(_RESIZE_RULES)}, got {mode!r}")
    if isinstance(paths_or_arrays, (str, os.PathLike, Image.Image, np.ndarray)):
        paths_or_arrays = [paths_or_arrays]
    if len(paths_or_arrays) == 0:
        raise ValueError("no images given")
    images = []
    for item in paths_or_arrays:
        img = _load_one(item, mode)
        if mode == "crop" and img.shape[1] > TARGET_SIZE:
            top = (img.shape[1] - TARGET_SIZE) // 2
            img = img[:, top : top + TARGET_SIZE]
        elif mode == "pad":
            img = _pad_to(img, TARGET_SIZE, TARGET_SIZE)
        images.append(img)
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    return torch.stack([_pad_to(img, height, width) for img in images])
