"""VGGT track head: a feature-only DPT (``feature_extractor``) feeding the iterative point tracker.

``feature_extractor`` is ``DPTHead(dim_in, patch_size, features, feature_only=True, down_ratio=2,
pos_embed=False)`` with the default DPT channels, as the official class hard-codes it (VGGT-1B was
trained with ``pos_embed=False``).  A model may replace the attribute with another ``DPTHead`` (the
parity fixtures use a reduced one; ``facebook/VGGT_tracker_fixed`` needs ``pos_embed=True``).
Keys: ``feature_extractor.*``, ``tracker.*`` (see ``hess.models.track_modules``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from hess.models.dpt_head import DPTHead
from hess.models.head_utils import autocast_disabled
from hess.models.track_modules import BaseTrackerPredictor


class TrackHead(nn.Module):
    """Track head; arguments are the official ones."""

    def __init__(
        self,
        dim_in: int = 2048,
        patch_size: int = 14,
        features: int = 128,
        iters: int = 4,
        predict_conf: bool = True,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.feature_extractor = DPTHead(
            dim_in=dim_in, patch_size=patch_size, features=features, feature_only=True, down_ratio=2, pos_embed=False
        )
        self.tracker = BaseTrackerPredictor(
            stride=stride,
            corr_levels=corr_levels,
            corr_radius=corr_radius,
            latent_dim=features,
            hidden_size=hidden_size,
            predict_conf=predict_conf,
        )
        self.iters = iters

    def forward(
        self,
        aggregated_tokens_list: Sequence[Tensor],
        images: Tensor,
        patch_start_idx: int,
        query_points: Tensor,
        iters: Optional[int] = None,
    ) -> tuple[list[Tensor], Tensor, Optional[Tensor]]:
        """Track query points of frame 0 through every frame.

        Args:
            aggregated_tokens_list: aggregator outputs, each [B, S, P, dim_in].
            images: [B, S, 3, H, W] (only the shape is used).
            patch_start_idx: special tokens before the patch tokens of each frame.
            query_points: [B, N, 2] or [N, 2] pixel (x, y) in frame 0.
            iters: refinement iterations (default ``self.iters``).
        Returns:
            coord_preds: list of ``iters`` tensors [B, S, N, 2] (pixels; the last is the estimate),
            vis [B, S, N] and conf [B, S, N] (sigmoids; conf is None without ``predict_conf``).
        """
        if images.dim() != 5:
            raise ValueError(f"images must be [B, S, 3, H, W], got shape {tuple(images.shape)}")
        if query_points.dim() == 2:
            query_points = query_points[None]
        if query_points.dim() != 3 or query_points.shape[-1] != 2 or query_points.shape[0] != images.shape[0]:
            raise ValueError(
                f"query_points must be [B, N, 2] (or [N, 2]) with B = {images.shape[0]}, "
                f"got {tuple(query_points.shape)}"
            )
        if not query_points.dtype.is_floating_point:
            raise TypeError(f"query_points must be floating point pixels, got {query_points.dtype}")
        fmaps = self.feature_extractor(aggregated_tokens_list, images, patch_start_idx)  # [B, S, C, H/2, W/2]
        with autocast_disabled(fmaps.device.type):
            return self.tracker(query_points.to(fmaps.dtype), fmaps, iters=self.iters if iters is None else iters)
