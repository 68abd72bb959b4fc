"""Input checks shared by every model in hess (VGGT, π³)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor


def check_images(images: Tensor, patch_size: int, model_name: str, frames: str = "S") -> Tensor:
    """Validate a multi-view image batch and add the batch dimension when it is missing.

    Args:
        images: [S, 3, H, W] or [B, S, 3, H, W], float, values in [0, 1] (H, W multiples of ``patch_size``).
        model_name: named in the out-of-range warning (the model normalises images itself).
        frames: the letter the model's docs use for the frame axis (VGGT: S, π³: N).
    Returns:
        [B, S, 3, H, W].
    Raises:
        TypeError / ValueError naming the problem: not a tensor, wrong rank or channel count, non-float
        dtype, H or W not a multiple of the patch size, NaN.  Values outside [0, 1] only warn.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 4:
        images = images.unsqueeze(0)
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be [{frames}, 3, H, W] or [B, {frames}, 3, H, W], got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}")
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image height and width must be multiples of the patch size {patch_size}, got {H}x{W}")
    if images.device.type != "meta" and images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images.detach()))
        if lo != lo or hi != hi:
            raise ValueError("images contain NaN")
        if lo < 0.0 or hi > 1.0:
            warnings.warn(f"images should be in [0, 1] ({model_name} normalises them itself); "
                          f"got range [{lo:.3g}, {hi:.3g}]", stacklevel=3)
    return images
