"""DPT dense head of VGGT: depth, point map, or (``feature_only``) the track head's feature maps.

Four aggregator layers (``intermediate_layer_idx``) are read at their patch tokens, normalised by one
shared LayerNorm, projected by 1×1 convs and resized to strides 4, 8, 16, 32 of the patch grid
(ConvT k4s4, ConvT k2s2, identity, Conv k3s2p1).  ``scratch`` fuses them coarse-to-fine
(``refinenet4 → 3 → 2 → 1``), ``output_conv1`` reduces channels, the result is upsampled bilinearly
(``align_corners=True``) to ``(h·p/down_ratio, w·p/down_ratio)`` and ``output_conv2`` (conv3×3 → ReLU →
conv1×1) predicts values + confidence.  With ``pos_embed`` a scaled (×0.1) sin/cos embedding of the
image-plane grid is added after every projection and after the final upsampling.

The in-place ReLU trap: the official ``ResidualConvUnit`` starts with ``nn.ReLU(inplace=True)`` on its
input, so its skip connection adds ``relu(x)``, not ``x``.  ``ResidualConvUnit`` here writes that out.

Keys (official): ``norm``, ``projects.{0..3}``, ``resize_layers.{0,1,3}``, ``scratch.layer{1..4}_rn``
(no bias), ``scratch.refinenet{1..4}.{out_conv,resConfUnit1,resConfUnit2}`` (``refinenet4`` has no
``resConfUnit1``), ``scratch.output_conv1``, ``scratch.output_conv2.{0,2}`` (absent when feature_only).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hess.models.head_utils import ACTIVATIONS, activate_head, autocast_disabled, uv_grid, uv_grid_to_embed

_MAX_INTERP_ELEMENTS = 1_610_612_736  # beyond this, interpolate in batch chunks (int32 indexing limit)


def interpolate_bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize with ``align_corners=True``; splits the batch when the output would be huge.

    x: [N, C, h, w] → [N, C, size[0], size[1]].
    """
    size = (int(size[0]), int(size[1]))
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= _MAX_INTERP_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = torch.chunk(x, elements // _MAX_INTERP_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks]).contiguous()


class ResidualConvUnit(nn.Module):
    """``conv2(relu(conv1(relu(x)))) + relu(x)``: the skip adds relu(x), as the official in-place ReLU does.

    x: [N, F, H, W] → [N, F, H, W].  ``x`` itself is left unchanged.  Keys ``conv1.*``, ``conv2.*``.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)  # the official nn.ReLU(inplace=True) overwrites x here, so the skip sees relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """``out_conv(upsample(RCU2(x + RCU1(skip))))``; without residual: ``out_conv(upsample(RCU2(x)))``.

    Keys ``out_conv.*``, ``resConfUnit1.*`` (only with ``has_residual``), ``resConfUnit2.*``.
    """

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.has_residual = has_residual
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None, size: Optional[Sequence[int]] = None) -> Tensor:
        """x, skip: [N, F, h, w] → [N, F, *size] (default: 2h × 2w)."""
        if (skip is not None) != self.has_residual:
            raise ValueError(f"FeatureFusionBlock(has_residual={self.has_residual}) got skip={skip is not None}")
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(interpolate_bilinear(x, size))


def _make_scratch(out_channels: Sequence[int], features: int, feature_only: bool) -> nn.Module:
    """The fusion stack, attribute names as in the official checkpoint."""
    scratch = nn.Module()
    for i, channels in enumerate(out_channels, start=1):
        setattr(scratch, f"layer{i}_rn", nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False))
    for i in range(1, 5):
        setattr(scratch, f"refinenet{i}", FeatureFusionBlock(features, has_residual=i != 4))
    if feature_only:
        scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
    else:
        scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
    return scratch


class DPTHead(nn.Module):
    """DPT head on four aggregator layers; see the module docstring.  Arguments are the official ones."""

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ValueError(
                f"DPTHead needs 4 out_channels and 4 intermediate_layer_idx, got {list(out_channels)} "
                f"and {list(intermediate_layer_idx)}"
            )
        if not feature_only:
            for name in (activation, conf_activation):
                ACTIVATIONS.get(name)  # an unknown name fails here, listing the known ones
            if output_dim < 2:
                raise ValueError(f"output_dim must be >= 2 (values + confidence), got {output_dim}")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = list(intermediate_layer_idx)

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, kernel_size=1) for c in out_channels)
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),  # stride 14/4
                nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),  # stride 14/2
                nn.Identity(),  # stride 14
                nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),  # stride 28
            ]
        )
        self.scratch = _make_scratch(out_channels, features, feature_only)
        if not feature_only:
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, output_dim, kernel_size=1),
            )

    def forward(
        self,
        aggregated_tokens_list: Sequence[Tensor],
        images: Tensor,
        patch_start_idx: int,
        frames_chunk_size: Optional[int] = 8,
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Dense prediction for every frame, ``frames_chunk_size`` frames at a time.

        Args:
            aggregated_tokens_list: aggregator outputs, each [B, S, P, dim_in] with
                ``P = patch_start_idx + (H/p)·(W/p)``; entries ``intermediate_layer_idx`` are read.
            images: [B, S, 3, H, W]; only its shape is used.
            patch_start_idx: number of special tokens before the patch tokens of each frame.
            frames_chunk_size: frames per chunk (None or >= S: all at once).
        Returns:
            ``feature_only``: features [B, S, features, H', W'] with ``H' = (H//p)·p/down_ratio``.
            Otherwise (values [B, S, H', W', output_dim-1], conf [B, S, H', W']).
        """
        if images.dim() != 5:
            raise ValueError(f"images must be [B, S, 3, H, W], got shape {tuple(images.shape)}")
        B, S, _, H, W = images.shape
        self._check_tokens(aggregated_tokens_list, B, S, H, W, patch_start_idx)
        chunk = S if not frames_chunk_size or frames_chunk_size >= S else int(frames_chunk_size)
        with autocast_disabled(self.norm.weight.device.type):
            outs = [
                self._forward_frames(aggregated_tokens_list, H, W, patch_start_idx, start, min(start + chunk, S))
                for start in range(0, S, chunk)
            ]
        if self.feature_only:
            return torch.cat(outs, dim=1)
        return torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1)

    def _check_tokens(
        self, tokens_list: Sequence[Tensor], B: int, S: int, H: int, W: int, patch_start_idx: int
    ) -> None:
        if max(self.intermediate_layer_idx) >= len(tokens_list):
            raise ValueError(
                f"DPTHead reads layers {self.intermediate_layer_idx} but got {len(tokens_list)} aggregated tensors"
            )
        num_patches = (H // self.patch_size) * (W // self.patch_size)
        expected = (B, S, patch_start_idx + num_patches, self.norm.normalized_shape[0])
        for idx in self.intermediate_layer_idx:
            if tuple(tokens_list[idx].shape) != expected:
                raise ValueError(
                    f"aggregated tokens [{idx}] have shape {tuple(tokens_list[idx].shape)}, expected [B, S, P, C] = "
                    f"{expected} for {H}x{W} images, patch size {self.patch_size}, patch_start_idx {patch_start_idx}"
                )

    def _forward_frames(
        self, tokens_list: Sequence[Tensor], H: int, W: int, patch_start_idx: int, start: int, end: int
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Frames ``start:end`` of every batch element; shapes as in ``forward`` with S = end − start."""
        ph, pw = H // self.patch_size, W // self.patch_size
        dtype = self.norm.weight.dtype
        levels = []
        for k, layer_idx in enumerate(self.intermediate_layer_idx):
            x = tokens_list[layer_idx][:, start:end, patch_start_idx:]  # [B, s, h·w, C]
            b, s, n, c = x.shape
            x = self.norm(x.reshape(b * s, n, c).to(dtype))
            x = x.permute(0, 2, 1).reshape(b * s, c, ph, pw)  # [B·s, C, h, w]
            x = self.projects[k](x)
            if self.pos_embed:
                x = self._add_pos_embed(x, W / H)
            levels.append(self.resize_layers[k](x))

        out = self._fuse(levels)
        size = (int(ph * self.patch_size / self.down_ratio), int(pw * self.patch_size / self.down_ratio))
        out = interpolate_bilinear(out, size)
        if self.pos_embed:
            out = self._add_pos_embed(out, W / H)
        if self.feature_only:
            return out.view(b, s, *out.shape[1:])
        values, conf = activate_head(self.scratch.output_conv2(out), self.activation, self.conf_activation)
        return values.view(b, s, *values.shape[1:]), conf.view(b, s, *conf.shape[1:])

    def _fuse(self, levels: list[Tensor]) -> Tensor:
        """Four maps (fine → coarse) → fused map at twice the finest resolution, after ``output_conv1``."""
        sc = self.scratch
        l1, l2 = sc.layer1_rn(levels[0]), sc.layer2_rn(levels[1])
        l3, l4 = sc.layer3_rn(levels[2]), sc.layer4_rn(levels[3])
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)

    @staticmethod
    def _add_pos_embed(x: Tensor, aspect_ratio: float, ratio: float = 0.1) -> Tensor:
        """x: [N, C, h, w] + 0.1 · sin/cos embedding of the image-plane grid (aspect W/H of the input)."""
        grid = uv_grid(x.shape[-1], x.shape[-2], aspect_ratio, dtype=x.dtype, device=x.device)
        emb = uv_grid_to_embed(grid, x.shape[1]) * ratio  # [h, w, C]
        return x + emb.permute(2, 0, 1)[None].to(x.dtype)
