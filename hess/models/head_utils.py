"""Pieces shared by the VGGT prediction heads: output activations, sin/cos embeddings, precision guard.

- ``ACTIVATIONS``: name → function on a channel-last tensor ``[..., C]``.  The DPT heads use it for
  their values (``inv_log`` for points, ``exp`` for depth) and confidence (``expp1``), the camera head
  for the translation / quaternion / field-of-view slices of the pose encoding.
- ``uv_grid`` and ``sincos_embed_1d``: the DPT positional embedding (sin/cos of an image-plane grid
  normalised by the image diagonal, base 100, computed in float64) and the tracker's grid embedding
  (base 10000) share the 1-D formula.
- ``autocast_disabled``: heads run in their parameter dtype even when the caller is under autocast,
  as the official ``VGGT.forward`` does with ``torch.cuda.amp.autocast(enabled=False)``.
- ``HeadMlp``: ``fc1 → GELU → fc2`` with distinct in/hidden/out widths (keys ``fc1.*``, ``fc2.*``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hess.registry import Registry

ACTIVATIONS: Registry[Callable[[Tensor], Tensor]] = Registry("head activation")


def inverse_log_transform(y: Tensor) -> Tensor:
    """``sign(y) · (exp(|y|) − 1)``, the inverse of ``sign(x) · log(1 + |x|)``."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def _norm_exp(x: Tensor) -> Tensor:
    norm = x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return x / norm * torch.expm1(norm)


def _xy_inv_log(x: Tensor) -> Tensor:
    xy, z = x.split([2, 1], dim=-1)
    z = inverse_log_transform(z)
    return torch.cat([xy * z, z], dim=-1)


for _name, _fn in {
    "linear": lambda x: x,
    "relu": F.relu,
    "exp": torch.exp,
    "expp0": torch.exp,
    "expp1": lambda x: 1 + torch.exp(x),
    "sigmoid": torch.sigmoid,
    "inv_log": inverse_log_transform,
    "norm_exp": _norm_exp,  # acts on the whole last dim
    "norm": lambda x: x / x.norm(dim=-1, keepdim=True),  # acts on the whole last dim
    "xy_inv_log": _xy_inv_log,  # last dim must be 3
}.items():
    ACTIVATIONS.register(_name)(_fn)


def activate_head(out: Tensor, activation: str, conf_activation: str) -> tuple[Tensor, Tensor]:
    """Split a dense prediction into activated values and confidence.

    Args:
        out: [N, C, H, W]; channels ``0..C-2`` are values, channel ``C-1`` is confidence.
        activation: ``ACTIVATIONS`` name for the values.
        conf_activation: ``ACTIVATIONS`` name for the confidence.
    Returns:
        values [N, H, W, C-1], conf [N, H, W].
    """
    fmap = out.permute(0, 2, 3, 1)  # [N, H, W, C]
    values = ACTIVATIONS.get(activation)(fmap[..., :-1])
    conf = ACTIVATIONS.get(conf_activation)(fmap[..., -1])
    return values, conf


def activate_pose(
    pose_enc: Tensor, trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "linear"
) -> Tensor:
    """Activate the slices of a pose encoding ``[..., 3 + 4 + F]`` (translation, quaternion, FoV/focal)."""
    trans, quat, fl = pose_enc[..., :3], pose_enc[..., 3:7], pose_enc[..., 7:]
    return torch.cat(
        [ACTIVATIONS.get(trans_act)(trans), ACTIVATIONS.get(quat_act)(quat), ACTIVATIONS.get(fl_act)(fl)], dim=-1
    )


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Image-plane coordinates of a ``height × width`` grid, normalised by the image diagonal.

    With ``a = aspect_ratio`` (W/H of the input image) the x span is ``a/√(a²+1)`` and the y span
    ``1/√(a²+1)``; each axis takes evenly spaced points from ``−span·(n−1)/n`` to ``+span·(n−1)/n``.

    Returns:
        [height, width, 2] with ``[..., 0] = x``, ``[..., 1] = y``.
    """
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    end_x, end_y = span_x * (width - 1) / width, span_y * (height - 1) / height
    x = torch.linspace(-end_x, end_x, width, dtype=dtype, device=device)
    y = torch.linspace(-end_y, end_y, height, dtype=dtype, device=device)
    grid_x, grid_y = torch.meshgrid(x, y, indexing="xy")  # each [height, width]
    return torch.stack([grid_x, grid_y], dim=-1)


def sincos_embed_1d(pos: Tensor, dim: int, omega_0: float) -> Tensor:
    """``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = omega_0^(−k/(dim/2))``, ``k < dim/2``; float64 inside.

    Args:
        pos: any shape, flattened to [M].
        dim: even embedding width.
    Returns:
        [M, dim] float32.
    """
    if dim % 2:
        raise ValueError(f"sin/cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega  # [dim/2]
    angles = torch.outer(pos.reshape(-1).to(torch.float64), omega)  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def uv_grid_to_embed(grid: Tensor, dim: int, omega_0: float = 100.0) -> Tensor:
    """grid: [H, W, 2] (x, y) → [H, W, dim] = ``[embed(x) (dim/2), embed(y) (dim/2)]``."""
    height, width, _ = grid.shape
    flat = grid.reshape(-1, 2)
    emb_x = sincos_embed_1d(flat[:, 0], dim // 2, omega_0)
    emb_y = sincos_embed_1d(flat[:, 1], dim // 2, omega_0)
    emb = torch.cat([emb_x, emb_y], dim=-1)
    return emb.view(height, width, dim)


@contextmanager
def autocast_disabled(device_type: str) -> Iterator[None]:
    """Turn autocast off for ``device_type`` (no-op for device types without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


class HeadMlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with ``in → hidden → out`` widths.  Keys ``fc1.*``, ``fc2.*``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] → [..., out]."""
        return self.fc2(self.act(self.fc1(x)))
