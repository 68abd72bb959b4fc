"""DINOv2 ViT with register tokens: the patch embedder of VGGT (``aggregator.patch_embed``).

State-dict compatible with the official ``DinoVisionTransformer`` as VGGT builds it (``block_chunks=0``,
so block keys are flat ``blocks.i.*``).  Differences from the torch.hub DINOv2 that matter for parity
(vggt-architecture.md §7):

* ``pos_embed`` (1 cls + M×M positions, M = img_size / patch) is resized *bicubic with antialias*
  straight to the patch grid ``(H/p, W/p)`` (``interpolate_offset=0``); the resize is skipped only when
  the grid already has M×M patches and H == W.
* every block has LayerScale (``init_values=1.0``), LayerNorm eps is 1e-6, no q/k norm.
* ``mask_token`` is kept in the state_dict (frozen by the aggregator) although inference never uses it.

Drop-path is not implemented (the constructor accepts only ``drop_path_rate=0``), which also keeps the
constructor free of ``.item()`` calls, so the model can be built on the meta device.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hess.models.layers import Block

# Official DINOv2 sizes VGGT can use as ``patch_embed`` (vggt/layers/vision_transformer.py).
DINOV2_VARIANTS: dict[str, dict[str, int]] = {
    "dinov2_vits14_reg": dict(embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14_reg": dict(embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14_reg": dict(embed_dim=1024, depth=24, num_heads=16),
    "dinov2_vitg2_reg": dict(embed_dim=1536, depth=40, num_heads=24),
}


def _pair(x: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens with one strided conv.  Keys ``proj.{weight,bias}``.

    Used both inside DINOv2 and directly as the aggregator's ``patch_embed="conv"``.

    Args:
        img_size: nominal image size (only sets ``num_patches``; any multiple of ``patch_size`` works).
        patch_size: p.
        in_chans: input channels.
        embed_dim: C.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 518,
        patch_size: Union[int, tuple[int, int]] = 14,
        in_chans: int = 3,
        embed_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] → [B, (H/p)·(W/p), C], patches row-major."""
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with register tokens, as VGGT's ``patch_embed`` (defaults: ViT-L/14-reg, VGGT settings).

    Token layout inside the trunk: ``[cls, registers(R), patches(N)]``.  ``forward`` returns the
    official dict: ``x_norm_clstoken [B, C]``, ``x_norm_regtokens [B, R, C]``,
    ``x_norm_patchtokens [B, N, C]``, ``x_prenorm [B, 1+R+N, C]``, ``masks``.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: Optional[float] = 1.0,
        ffn_layer: str = "mlp",
        block_chunks: int = 0,
        num_register_tokens: int = 4,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if drop_path_rate:
            raise ValueError(f"drop_path_rate={drop_path_rate}: drop-path is not implemented (use 0.0)")
        if ffn_layer != "mlp":
            raise ValueError(f"ffn_layer={ffn_layer!r}: only 'mlp' is implemented")
        if block_chunks:
            raise ValueError(f"block_chunks={block_chunks}: only 0 (flat 'blocks.i' keys, as in VGGT) is supported")
        del drop_path_uniform  # only meaningful with drop-path
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_tokens = 1
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.use_checkpoint = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        # Parameter registration order = official state_dict order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                ffn_bias=ffn_bias, init_values=init_values, norm_layer=norm_layer, qk_norm=qk_norm,
            )
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Position embedding for an image of ``height × width`` pixels.

        Args:
            x: [B, 1 + N, C] tokens (cls + patches); only its length and dtype are used.
            height, width: image size in pixels.
        Returns:
            [1, 1 + N, C]: cls position first, then the (H/p)×(W/p) grid resized bicubic from M×M.
        """
        num_patches = x.shape[1] - 1
        M2 = self.pos_embed.shape[1] - 1
        if num_patches == M2 and height == width:
            return self.pos_embed
        M = int(math.sqrt(M2))
        if M * M != M2:
            raise ValueError(f"pos_embed holds {M2} patch positions, not a square grid")
        pos = self.pos_embed.float()
        cls_pos, grid = pos[:, :1], pos[:, 1:]
        h0, w0 = height // self.patch_size, width // self.patch_size
        if self.interpolate_offset:
            size_kw = dict(scale_factor=((h0 + self.interpolate_offset) / M, (w0 + self.interpolate_offset) / M))
        else:
            size_kw = dict(size=(h0, w0))
        grid = grid.reshape(1, M, M, -1).permute(0, 3, 1, 2)  # [1, C, M, M]
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **size_kw)
        if tuple(grid.shape[-2:]) != (h0, w0):
            raise RuntimeError(f"pos_embed resized to {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)  # [1, h0*w0, C] row-major
        return torch.cat([cls_pos, grid], dim=1).to(x.dtype)

    def prepare_tokens(self, x: Tensor, masks: Optional[Tensor] = None) -> Tensor:
        """x: [B, 3, H, W] (normalised), masks: [B, N] bool or None → [B, 1 + R + N, C]."""
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)  # [B, N, C]
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, H, W)
        if self.register_tokens is not None:  # registers carry no position embedding
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(B, -1, -1), tokens[:, 1:]], dim=1)
        return tokens

    def forward(self, x: Tensor, masks: Optional[Tensor] = None) -> dict[str, Optional[Tensor]]:
        """x: [B, 3, H, W] normalised images → dict of normalised cls/register/patch tokens (see class)."""
        tokens = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, use_reentrant=False)
            else:
                tokens = blk(tokens)
        normed = self.norm(tokens)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : R + 1],
            "x_norm_patchtokens": normed[:, R + 1 :],
            "x_prenorm": tokens,
            "masks": masks,
        }


def build_dinov2(variant: str, **kwargs) -> DinoVisionTransformer:
    """DINOv2 of a named size (``DINOV2_VARIANTS``) with VGGT's settings; ``kwargs`` override them."""
    if variant not in DINOV2_VARIANTS:
        raise KeyError(f"unknown DINOv2 variant {variant!r}; known: {', '.join(sorted(DINOV2_VARIANTS))}")
    return DinoVisionTransformer(**{**DINOV2_VARIANTS[variant], **kwargs})
