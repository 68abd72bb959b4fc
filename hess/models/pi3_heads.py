"""π³ prediction heads: per-frame head decoders, the linear patch-to-pixel head and the camera head.

π³ (``yyfz/Pi3``) feeds the concatenated last two decoder outputs ``[B·N, P, 2C]`` into three small
transformers (points, confidence, camera) that attend **within each frame only**, then:

- ``LinearPts3d``: one Linear per patch token to ``out·p²`` values, unfolded to pixels with
  ``pixel_shuffle`` (channel index ``c·p² + dy·p + dx``);
- ``CameraHead``: two residual MLP blocks on the patch tokens, mean-pool over patches, an MLP, then a
  translation and a 9-D rotation projected onto SO(3) (row-normalised, SVD with reflection fix).

``estimate_intrinsics`` recovers a pinhole camera from the point head's camera-frame points (π³
predicts no intrinsics).

Attribute names reproduce the official state_dict keys (``projects``, ``blocks``, ``linear_out``,
``proj``, ``res_conv``, ``more_mlps``, ``fc_t``, ``fc_rot``).  The transformer blocks are the shared
``hess.models.layers.Block``.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hess.models.layers import Block, RotaryPositionEmbedding2D

LAYER_NORM_EPS = 1e-6  # every π³ block LayerNorm (q/k norms keep torch's default 1e-5)


class TransformerDecoder(nn.Module):
    """Per-frame RoPE transformer: ``linear_out(blocks(projects(x)))``, no LayerScale, no qk-norm.

    Keys: ``projects.*`` (absent when ``need_project`` is False), ``blocks.{i}.*``, ``linear_out.*``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dec_embed_dim: int = 512,
        depth: int = 5,
        dec_num_heads: int = 8,
        mlp_ratio: float = 4.0,
        need_project: bool = True,
        rope: Optional[RotaryPositionEmbedding2D] = None,
    ) -> None:
        super().__init__()
        if not need_project and in_dim != dec_embed_dim:
            raise ValueError(f"need_project=False requires in_dim == dec_embed_dim, got {in_dim} != {dec_embed_dim}")
        self.projects = nn.Linear(in_dim, dec_embed_dim) if need_project else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(
                dec_embed_dim,
                dec_num_heads,
                mlp_ratio=mlp_ratio,
                init_values=None,
                norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS),
                qk_norm=False,
                rope=rope,
            )
            for _ in range(depth)
        )
        self.linear_out = nn.Linear(dec_embed_dim, out_dim)

    def forward(self, hidden: Tensor, pos: Optional[Tensor] = None) -> Tensor:
        """hidden: [B·N, P, in_dim], pos: [B·N, P, 2] int → [B·N, P, out_dim]."""
        hidden = self.projects(hidden)
        for block in self.blocks:
            hidden = block(hidden, pos=pos)
        return self.linear_out(hidden)


class LinearPts3d(nn.Module):
    """Patch tokens → per-pixel maps: ``proj`` to ``out·p²`` values, unfolded by ``pixel_shuffle``.

    Keys: ``proj.{weight,bias}`` with ``proj.weight: [output_dim·p², dec_embed_dim]``.
    """

    def __init__(self, patch_size: int, dec_embed_dim: int, output_dim: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dec_embed_dim, output_dim * patch_size**2)

    def forward(self, tokens: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """tokens: [B·N, h·w, D] patch tokens (row-major) → [B·N, H, W, output_dim]."""
        H, W = image_hw
        p = self.patch_size
        BN, hw, _ = tokens.shape
        if hw != (H // p) * (W // p):
            raise ValueError(f"{hw} patch tokens do not tile a {H}x{W} image with patch {p}")
        feat = self.proj(tokens).transpose(-1, -2)  # [B·N, out·p², h·w], channel = c·p² + dy·p + dx
        feat = feat.reshape(BN, -1, H // p, W // p)
        return F.pixel_shuffle(feat, p).permute(0, 2, 3, 1)  # [B·N, H, W, out]


class ResConvBlock(nn.Module):
    """Residual MLP on tokens: ``x + relu(L3(relu(L2(relu(L1(x))))))``.

    Named "conv" after the official 1x1-conv origin; keys ``res_conv{1,2,3}.*`` (Linear layers).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.head_skip = nn.Identity()  # official: a 1x1 projection only when in != out; never here
        self.res_conv1 = nn.Linear(dim, dim)
        self.res_conv2 = nn.Linear(dim, dim)
        self.res_conv3 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] → [..., dim]."""
        y = F.relu(self.res_conv1(x))
        y = F.relu(self.res_conv2(y))
        y = F.relu(self.res_conv3(y))
        return self.head_skip(x) + y


def svd_orthogonalize(m: Tensor) -> Tensor:
    """Closest rotation (Frobenius) to each row-normalised 3x3 matrix, reflections fixed.

    Rows of ``m`` are L2-normalised, then with ``mᵀ = U S Vᵀ``:
    ``R = V · diag(1, 1, det(V Uᵀ)) · Uᵀ`` (det R = +1).  Computed in at least float32.

    Args:
        m: [..., 9] (row-major 3x3) or [..., 3, 3].
    Returns:
        [..., 3, 3] rotation matrices, dtype of ``m`` (float32 when ``m`` is half precision).
    """
    if m.shape[-1] == 9:
        m = m.reshape(*m.shape[:-1], 3, 3)
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"expected [..., 9] or [..., 3, 3], got {tuple(m.shape)}")
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    m_t = F.normalize(work, p=2, dim=-1).transpose(-1, -2)
    u, _, vh = torch.linalg.svd(m_t)
    v = vh.transpose(-1, -2)
    det = torch.det(v @ u.transpose(-1, -2))  # [...], ±1
    v = torch.cat([v[..., :-1], v[..., -1:] * det[..., None, None]], dim=-1)
    return v @ u.transpose(-1, -2)


class CameraHead(nn.Module):
    """Patch tokens of one frame → camera-to-world pose ``[[R, t], [0, 0, 0, 1]]``.

    Keys: ``res_conv.{0,1}.res_conv{1,2,3}.*``, ``more_mlps.{0,2}.*``, ``fc_t.*``, ``fc_rot.*``.
    """

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.res_conv = nn.ModuleList(ResConvBlock(dim) for _ in range(2))
        self.more_mlps = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_rot = nn.Linear(dim, 9)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [B·N, h·w, dim] patch tokens → poses [B·N, 4, 4] (camera-to-world)."""
        feat = tokens
        for block in self.res_conv:
            feat = block(feat)
        feat = self.more_mlps(feat.mean(dim=1))  # mean over patches = the official AdaptiveAvgPool2d(1)
        t = self.fc_t(feat)  # [B·N, 3]
        R = svd_orthogonalize(self.fc_rot(feat)).to(t.dtype)  # [B·N, 3, 3]
        top = torch.cat([R, t[:, :, None]], dim=-1)  # [B·N, 3, 4]
        bottom = torch.zeros_like(top[:, :1])
        bottom[..., 3] = 1.0
        return torch.cat([top, bottom], dim=1)


def estimate_intrinsics(local_points: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Pinhole intrinsics that best explain camera-frame points (weighted least squares, closed form).

    With the principal point fixed at ``(W/2, H/2)`` and integer pixel centres ``(u, v)`` (the hess
    convention, ``hess.models.pose``): ``fx = Σ w (u - cx) a / Σ w a²`` with ``a = X/Z``; same for fy.

    Args:
        local_points: [..., H, W, 3] with Z > 0.
        weights: [..., H, W] non-negative (e.g. confidences) or None (uniform).
    Returns:
        [..., 3, 3] intrinsics, dtype of ``local_points``.
    """
    H, W = local_points.shape[-3:-1]
    dev, dt = local_points.device, local_points.dtype
    v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=dt), torch.arange(W, device=dev, dtype=dt), indexing="ij")
    cx, cy = W / 2, H / 2
    z = local_points[..., 2].clamp_min(torch.finfo(dt).tiny)
    a, b = local_points[..., 0] / z, local_points[..., 1] / z
    w = torch.ones_like(z) if weights is None else weights.to(dt)
    dims = (-2, -1)
    eps = torch.finfo(dt).tiny
    fx = (w * (u - cx) * a).sum(dims) / (w * a * a).sum(dims).clamp_min(eps)
    fy = (w * (v - cy) * b).sum(dims) / (w * b * b).sum(dims).clamp_min(eps)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    K = torch.stack([fx, zero, zero + cx, zero, fy, zero + cy, zero, zero, one], dim=-1)
    return K.reshape(*fx.shape, 3, 3)
