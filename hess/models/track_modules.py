"""The VGGT point tracker (``track_head.tracker``): correlation pyramid + iterative update transformer.

Conventions (official, CoTracker/VGGSfM lineage):
- Coordinates are pixels (x, y) of the feature map; sampling is bilinear with ``align_corners=True``
  (pixel centres at integers).  Query features use border padding, correlations zero padding.
- Correlation window: a (2r+1)² grid per pyramid level, flattened with the **x offset varying slowest**
  (index ``i·(2r+1) + j`` ↔ offset ``(x + i − r, y + j − r)``), levels concatenated: ``L·(2r+1)²``.
- Flow embedding: linear frequencies ``arange(0, C, 2)·1000/C``, interleaved sin/cos per axis (float32).
- Grid embedding sampled at the queries: sin/cos base 10000, ``[embed(x), embed(y)]`` (float64 inside).
- ``AttnBlock`` / ``CrossAttnBlock`` replace x by ``norm1(x)`` before the residual (the residual is taken
  around the normalised input) and use ``nn.MultiheadAttention`` (keys ``in_proj_*``, ``out_proj.*``).

Keys (official): ``query_ref_token``, ``corr_mlp.fc{1,2}``, ``updateformer.{virual_tracks, input_norm,
input_transform, output_norm, flow_head, time_blocks, space_virtual_blocks, space_point2virtual_blocks,
space_virtual2point_blocks}``, ``fmap_norm``, ``ffeat_norm``, ``ffeat_updater.0``, ``vis_predictor.0``,
``conf_predictor.0``.  ``virual_tracks`` keeps the official misspelling.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hess.models.head_utils import HeadMlp, sincos_embed_1d


def bilinear_sample(image: Tensor, coords: Tensor, padding_mode: str = "border") -> Tensor:
    """``grid_sample`` at pixel coordinates (align_corners=True).

    Args:
        image: [N, C, H, W].
        coords: [N, h, w, 2] pixel (x, y).
    Returns:
        [N, C, h, w].
    """
    H, W = image.shape[-2:]
    scale = torch.tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)], device=image.device, dtype=image.dtype)
    grid = coords.detach().to(image.dtype) * scale - 1  # pixels → [-1, 1]
    return F.grid_sample(image, grid, align_corners=True, padding_mode=padding_mode)


def sample_features(image: Tensor, coords: Tensor) -> Tensor:
    """image: [B, C, H, W], coords: [B, R, 2] pixel (x, y) → [B, R, C] (border padding)."""
    B = image.shape[0]
    feats = bilinear_sample(image, coords.unsqueeze(2))  # [B, C, R, 1]
    return feats.permute(0, 2, 1, 3).reshape(B, -1, feats.shape[1])


def grid_sincos_embed(dim: int, height: int, width: int, device: torch.device) -> Tensor:
    """[1, dim, height, width]: ``[embed(x) (dim/2), embed(y) (dim/2)]`` of integer pixel positions, base 10000."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    emb = torch.cat([sincos_embed_1d(xs, dim // 2, 10000.0), sincos_embed_1d(ys, dim // 2, 10000.0)], dim=1)
    return emb.view(height, width, dim).permute(2, 0, 1)[None]


def flow_embedding(xy: Tensor, dim: int) -> Tensor:
    """xy: [N, T, 2] → [N, T, 2·dim]: per axis ``sin/cos(v · k·1000/dim)`` for ``k = 0, 2, …``, interleaved."""
    freqs = torch.arange(0, dim, 2, device=xy.device, dtype=torch.float32) * (1000.0 / dim)  # [dim/2]
    parts = []
    for axis in range(2):
        angles = xy[..., axis : axis + 1] * freqs  # [N, T, dim/2]
        parts.append(torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2))  # sin, cos, sin, …
    return torch.cat(parts, dim=-1)


class CorrelationPyramid:
    """Feature-map pyramid (avg-pool ×2 per level) sampled as local correlation windows.  No parameters.

    fmaps: [B, S, C, H, W].
    """

    def __init__(self, fmaps: Tensor, num_levels: int, radius: int) -> None:
        self.radius = radius
        self.levels = [fmaps]
        for _ in range(num_levels - 1):
            B, S, C, H, W = self.levels[-1].shape
            pooled = F.avg_pool2d(self.levels[-1].reshape(B * S, C, H, W), kernel_size=2, stride=2)
            self.levels.append(pooled.reshape(B, S, C, *pooled.shape[-2:]))
        offsets = torch.arange(-radius, radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        # [2r+1, 2r+1, 2]: component 0 (added to x) follows the row index, component 1 (y) the column.
        self.window = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)

    def sample(self, targets: Tensor, coords: Tensor) -> Tensor:
        """targets: [B, S, N, C] features, coords: [B, S, N, 2] level-0 pixels → [B, S, N, L·(2r+1)²]."""
        B, S, N, C = targets.shape
        side = 2 * self.radius + 1
        out = []
        for level, fmaps in enumerate(self.levels):
            H, W = fmaps.shape[-2:]
            corr = torch.matmul(targets, fmaps.reshape(B, S, C, H * W)) / math.sqrt(C)  # [B, S, N, H·W]
            centres = coords.reshape(B * S * N, 1, 1, 2) / 2**level
            grid = centres + self.window.to(coords.dtype).view(1, side, side, 2)
            sampled = bilinear_sample(corr.reshape(B * S * N, 1, H, W), grid, padding_mode="zeros")
            out.append(sampled.view(B, S, N, -1))
        return torch.cat(out, dim=-1).contiguous()


class AttnBlock(nn.Module):
    """``x = norm1(x); x = x + MHA(x); x + mlp(norm2(x))``.  Keys ``norm1``, ``norm2``, ``attn``, ``mlp``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = HeadMlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, T, C] → [N, T, C]."""
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """``x = norm1(x); x = x + MHA(x, norm_context(ctx)); x + mlp(norm2(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = HeadMlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: [N, Q, C], context: [N, K, C] → [N, Q, C]."""
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Alternating attention over time (per track) and space (tracks ↔ virtual tracks).

    Space attention runs after time block i when ``i % (time_depth // space_depth) == 0``: virtual
    tracks read the points, attend among themselves, then the points read the virtual tracks.
    """

    def __init__(
        self,
        space_depth: int = 6,
        time_depth: int = 6,
        input_dim: int = 320,
        hidden_size: int = 384,
        num_heads: int = 8,
        output_dim: int = 130,
        mlp_ratio: float = 4.0,
        add_space_attn: bool = True,
        num_virtual_tracks: int = 64,
    ) -> None:
        super().__init__()
        self.add_space_attn = add_space_attn
        self.num_virtual_tracks = num_virtual_tracks
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.virual_tracks = (
            nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size)) if add_space_attn else None
        )
        self.time_blocks = nn.ModuleList(AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth))
        if add_space_attn:
            if not 0 < space_depth <= time_depth:
                raise ValueError(f"need 0 < space_depth <= time_depth, got {space_depth}, {time_depth}")
            self.space_virtual_blocks = nn.ModuleList(
                AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)
            )
            self.space_point2virtual_blocks = nn.ModuleList(
                CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)
            )
            self.space_virtual2point_blocks = nn.ModuleList(
                CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)
            )
        self._init_weights()

    def _init_weights(self) -> None:
        """Training init (official): xavier-uniform Linear weights, zero biases, tiny flow head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, T, input_dim] → [B, N, T, output_dim]."""
        tokens = self.input_transform(self.input_norm(x))
        init_tokens = tokens
        B, _, T, _ = tokens.shape
        if self.add_space_attn:
            tokens = torch.cat([tokens, self.virual_tracks.repeat(B, 1, T, 1)], dim=1)
        N = tokens.shape[1]  # tracks + virtual tracks
        space_every = len(self.time_blocks) // len(self.space_virtual_blocks) if self.add_space_attn else 0
        j = 0
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(B * N, T, -1)).view(B, N, T, -1)  # attention over T
            if self.add_space_attn and i % space_every == 0:
                space = tokens.permute(0, 2, 1, 3).reshape(B * T, N, -1)  # [B·T, N, C]
                points, virtual = space[:, : N - self.num_virtual_tracks], space[:, N - self.num_virtual_tracks :]
                virtual = self.space_virtual2point_blocks[j](virtual, points)
                virtual = self.space_virtual_blocks[j](virtual)
                points = self.space_point2virtual_blocks[j](points, virtual)
                tokens = torch.cat([points, virtual], dim=1).view(B, T, N, -1).permute(0, 2, 1, 3)
                j += 1
        if self.add_space_attn:
            tokens = tokens[:, : N - self.num_virtual_tracks]
        return self.flow_head(self.output_norm(tokens + init_tokens))


class BaseTrackerPredictor(nn.Module):
    """Iterative tracker: per iteration, correlations + flow + track features → coordinate/feature deltas."""

    def __init__(
        self,
        stride: int = 1,
        corr_levels: int = 5,
        corr_radius: int = 4,
        latent_dim: int = 128,
        hidden_size: int = 384,
        use_spaceatt: bool = True,
        depth: int = 6,
        max_scale: int = 518,
        predict_conf: bool = True,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.flows_emb_dim = latent_dim // 2
        self.transformer_dim = 3 * latent_dim + 4  # flow emb (C) + 2·(flow/max_scale) + corr (C) + feats (C)

        self.corr_mlp = HeadMlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            space_depth=depth if use_spaceatt else 0,
            time_depth=depth,
            input_dim=self.transformer_dim,
            hidden_size=hidden_size,
            output_dim=latent_dim + 2,
            mlp_ratio=4.0,
            add_space_attn=use_spaceatt,
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(
        self, query_points: Tensor, fmaps: Tensor, iters: int = 6, down_ratio: int = 1, apply_sigmoid: bool = True
    ) -> tuple[list[Tensor], Tensor, Optional[Tensor]]:
        """Track ``query_points`` (pixels of frame 0) through all frames.

        Args:
            query_points: [B, N, 2] pixel (x, y) in frame 0 of the input images.
            fmaps: [B, S, C, H', W'] feature maps at ``1/(stride·down_ratio)`` of the input resolution.
            iters: refinement iterations.
        Returns:
            coord_preds: ``iters`` tensors [B, S, N, 2] in input pixels; vis [B, S, N];
            conf [B, S, N] or None (sigmoids unless ``apply_sigmoid=False``).
        """
        B, N, _ = query_points.shape
        _, S, C, HH, WW = fmaps.shape
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        scale = float(self.stride * down_ratio) if down_ratio > 1 else float(self.stride)
        queries = query_points / float(down_ratio) if down_ratio > 1 else query_points
        queries = queries / float(self.stride)
        coords = queries.reshape(B, 1, N, 2).repeat(1, S, 1, 1)  # [B, S, N, 2]
        track_feats = sample_features(fmaps[:, 0], coords[:, 0]).unsqueeze(1).repeat(1, S, 1, 1)  # [B, S, N, C]
        pyramid = CorrelationPyramid(fmaps, self.corr_levels, self.corr_radius)
        pos_embed = grid_sincos_embed(self.transformer_dim, HH, WW, fmaps.device).to(fmaps.dtype)
        query_pos = sample_features(pos_embed.expand(B, -1, -1, -1), coords[:, 0]).reshape(B * N, 1, -1)
        ref_token = torch.cat([self.query_ref_token[:, :1], self.query_ref_token[:, 1:2].expand(-1, S - 1, -1)], 1)
        ref_token = ref_token.to(fmaps.dtype)  # [1, S, D]: slot 0 for frame 0, slot 1 for the others

        coord_preds = []
        for _ in range(iters):
            coords, track_feats = self._step(coords.detach(), track_feats, pyramid, query_pos, ref_token)
            coords[:, 0] = queries  # frame 0 stays at the query
            coord_preds.append(coords * scale)

        flat = track_feats.reshape(B * S * N, self.latent_dim)
        vis = self.vis_predictor(flat).reshape(B, S, N)
        conf = self.conf_predictor(flat).reshape(B, S, N) if self.predict_conf else None
        if apply_sigmoid:
            vis = torch.sigmoid(vis)
            conf = torch.sigmoid(conf) if conf is not None else None
        return coord_preds, vis, conf

    def _step(
        self, coords: Tensor, track_feats: Tensor, pyramid: CorrelationPyramid, query_pos: Tensor, ref_token: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One refinement.

        coords [B, S, N, 2], track_feats [B, S, N, C], query_pos [B·N, 1, D], ref_token [1, S, D]
        → updated (coords, track_feats).
        """
        B, S, N, _ = coords.shape
        corr = pyramid.sample(track_feats, coords)  # [B, S, N, L·(2r+1)²]
        corr = self.corr_mlp(corr.permute(0, 2, 1, 3).reshape(B * N, S, -1))  # [B·N, S, C]
        flows = (coords - coords[:, :1]).permute(0, 2, 1, 3).reshape(B * N, S, 2)
        flow_emb = torch.cat(
            [flow_embedding(flows, self.flows_emb_dim), flows / self.max_scale, flows / self.max_scale], dim=-1
        )
        feats = track_feats.permute(0, 2, 1, 3).reshape(B * N, S, self.latent_dim)
        x = torch.cat([flow_emb, corr, feats], dim=2) + query_pos + ref_token  # [B·N, S, D]
        delta = self.updateformer(x.reshape(B, N, S, -1)).reshape(B * N, S, -1)
        delta_coords, delta_feats = delta[..., :2], delta[..., 2:]
        feats = feats.reshape(B * N * S, self.latent_dim)
        feats = self.ffeat_updater(self.ffeat_norm(delta_feats.reshape(B * N * S, self.latent_dim))) + feats
        track_feats = feats.reshape(B, N, S, self.latent_dim).permute(0, 2, 1, 3)
        coords = coords + delta_coords.reshape(B, N, S, 2).permute(0, 2, 1, 3)
        return coords, track_feats
