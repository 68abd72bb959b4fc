"""Transformer building blocks shared by every model in hess (VGGT aggregator, DINOv2, π³).

The one seam that the rest of hess relies on is ``Attention.core``: every attention module
projects ``x [B, N, C]`` to ``q, k, v [B, H, N, D]`` (q/k-norm and 2-D RoPE applied) and hands
them to ``self.core(q, k, v, **core_kwargs) -> [B, H, N, D]``.  The default core is dense SDPA;
``hess.patch.sparsify`` swaps in a head-wise block-sparse core, calibration scorers wrap it to
gate or inspect heads.  A core holds no parameters or persistent buffers, so swapping it never
changes ``state_dict`` keys.

``core_kwargs`` that global blocks receive from the aggregator: ``tokens_per_frame`` (P, tokens of
one frame including the special tokens) and ``num_special`` (special tokens at the start of every
frame).  Dense cores ignore them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenseCore(nn.Module):
    """Exact dense attention: ``softmax(q kᵀ / √D) v`` via SDPA.

    Args:
        q, k, v: [B, H, N, D].
        **core_kwargs: layout hints (``tokens_per_frame``, ``num_special``); ignored here.
    Returns:
        [B, H, N, D].
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class RotaryPositionEmbedding2D(nn.Module):
    """2-D rotary embedding on integer (y, x) positions (VGGT / π³ convention).

    The head dimension is split in halves: the first rotates with y, the second with x.  Within a
    half of width d the rotate-half (non-interleaved) form is used with
    ``inv_freq = base^(-(0, 2, …, d-2)/d)`` duplicated to ``[angles, angles]``.  Position (0, 0)
    is the identity, which is what special tokens get.  Holds no state_dict entries.
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.base_frequency = float(frequency)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _table(self, dim: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (dim, length, device, dtype)
        if key not in self._tables:
            inv_freq = 1.0 / self.base_frequency ** (torch.arange(0, dim, 2, device=device).float() / dim)
            angles = torch.outer(torch.arange(length, device=device, dtype=inv_freq.dtype), inv_freq)
            angles = torch.cat([angles, angles], dim=-1).to(dtype)  # [length, dim]
            self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._tables[key]

    @staticmethod
    def _rotate_half(t: Tensor) -> Tensor:
        a, b = t.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    def _rotate(self, t: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # t: [B, H, N, d]; pos: [B, N] integer
        c = F.embedding(pos, cos)[:, None]  # [B, 1, N, d]
        s = F.embedding(pos, sin)[:, None]
        return t * c + self._rotate_half(t) * s

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens: [B, H, N, D]; positions: [B, N, 2] integer (y, x) → [B, H, N, D]."""
        if positions.dtype.is_floating_point:
            raise TypeError(f"RoPE positions must be integer, got {positions.dtype}")
        half = tokens.shape[-1] // 2
        cos, sin = self._table(half, int(positions.max()) + 1, tokens.device, tokens.dtype)
        ty, tx = tokens.chunk(2, dim=-1)
        return torch.cat(
            [self._rotate(ty, positions[..., 0], cos, sin), self._rotate(tx, positions[..., 1], cos, sin)],
            dim=-1,
        )


class PositionGetter:
    """Integer (row, col) positions of an h×w patch grid, row-major: ``[B, h*w, 2]``. Cached."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensor] = {}

    def __call__(self, batch_size: int, height: int, width: int, device: torch.device) -> Tensor:
        key = (height, width, device)
        if key not in self._cache:
            y = torch.arange(height, device=device)
            x = torch.arange(width, device=device)
            self._cache[key] = torch.cartesian_prod(y, x)  # [h*w, 2]
        grid = self._cache[key]
        return grid.view(1, height * width, 2).expand(batch_size, -1, -1).clone()


class Attention(nn.Module):
    """Multi-head self-attention with fused ``qkv``, optional q/k LayerNorm and RoPE, swappable core.

    ``qkv.weight`` is ``[3C, C]`` with output rows ordered (q|k|v, head, dim): head h's query
    projection is rows ``h*D:(h+1)*D``.  Keys: ``qkv.{weight,bias}``, ``q_norm.*``, ``k_norm.*``,
    ``proj.{weight,bias}``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        qk_norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        rope: Optional[RotaryPositionEmbedding2D] = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = qk_norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk_norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope
        self.core: nn.Module = DenseCore()

    def project(self, x: Tensor, pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, N, C] → q, k, v: [B, H, N, D] (q/k normalised, RoPE applied when ``pos`` given)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v

    def forward(self, x: Tensor, pos: Optional[Tensor] = None, **core_kwargs) -> Tensor:
        """x: [B, N, C], pos: [B, N, 2] int or None → [B, N, C]."""
        B, N, C = x.shape
        q, k, v = self.project(x, pos)
        out = self.core(q, k, v, **core_kwargs)  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}"


class Mlp(nn.Module):
    """fc1 → activation → fc2.  Keys ``fc1.*``, ``fc2.*``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale ``x * gamma``; key ``gamma`` [C]."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))``.

    Same keys as VGGT's ``Block`` and DINOv2's ``NestedTensorBlock``.  ``core_kwargs`` are passed
    to the attention core (see module docstring).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: Optional[float] = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        qk_norm: bool = False,
        rope: Optional[RotaryPositionEmbedding2D] = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias, act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, pos: Optional[Tensor] = None, **core_kwargs) -> Tensor:
        """x: [B, N, C], pos: [B, N, 2] or None → [B, N, C]."""
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos, **core_kwargs))
        return x + self.ls2(self.mlp(self.norm2(x)))
