"""VGGT camera head: iterative adaLN-modulated trunk predicting the ``absT_quaR_FoV`` pose encoding.

From the camera token of the last aggregator layer, ``t = token_norm(tokens[-1][:, :, 0])`` [B, S, C]:

    for it in range(num_iterations):
        e = embed_pose(empty_pose_tokens if it == 0 else pred.detach())
        shift, scale, gate = poseLN_modulation(e).chunk(3)
        h = trunk(gate · (adaln_norm(t) · (1 + scale) + shift) + t)      # t: always the original token
        pred = pose_branch(trunk_norm(h)) (+ pred after the first iteration)   # raw, pre-activation
        out.append(activate_pose(pred))

The trunk attends across frames (``[B, S, C]``), without RoPE or q/k-norm.  Keys (official):
``empty_pose_tokens``, ``trunk.{i}.*`` (``hess.models.layers.Block``), ``token_norm``, ``trunk_norm``,
``embed_pose``, ``poseLN_modulation.1``, ``pose_branch.fc{1,2}``; ``adaln_norm`` has no parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from hess.models.head_utils import ACTIVATIONS, HeadMlp, activate_pose, autocast_disabled
from hess.models.layers import Block
from hess.registry import Registry

POSE_ENCODINGS: Registry[int] = Registry("pose encoding")
POSE_ENCODINGS.register("absT_quaR_FoV")(9)  # [t(3), quat xyzw(4), fov_h, fov_w]


class CameraHead(nn.Module):
    """Camera head; see the module docstring.  Arguments are the official ones."""

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        pose_encoding_type: str = "absT_quaR_FoV",
        num_heads: int = 16,
        mlp_ratio: float = 4,
        init_values: float = 0.01,
        trans_act: str = "linear",
        quat_act: str = "linear",
        fl_act: str = "relu",
    ) -> None:
        super().__init__()
        self.target_dim = POSE_ENCODINGS.get(pose_encoding_type)
        for act in (trans_act, quat_act, fl_act):
            ACTIVATIONS.get(act)  # unknown names fail here, listing the known ones
        self.trans_act, self.quat_act, self.fl_act = trans_act, quat_act, fl_act
        self.trunk_depth = trunk_depth

        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, mlp_ratio=mlp_ratio, init_values=init_values) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = HeadMlp(dim_in, dim_in // 2, self.target_dim)

    def forward(self, aggregated_tokens_list: Sequence[Tensor], num_iterations: int = 4) -> list[Tensor]:
        """Pose encodings after each refinement iteration.

        Args:
            aggregated_tokens_list: aggregator outputs; only the last, [B, S, P, dim_in], is read
                (token 0 of every frame is the camera token).
            num_iterations: refinement iterations (>= 1).
        Returns:
            ``num_iterations`` tensors [B, S, target_dim] (activated); the last is the final estimate.
        """
        if len(aggregated_tokens_list) == 0:
            raise ValueError("CameraHead got an empty aggregated_tokens_list")
        tokens = aggregated_tokens_list[-1]
        dim_in = self.token_norm.normalized_shape[0]
        if tokens.dim() != 4 or tokens.shape[-1] != dim_in:
            raise ValueError(f"CameraHead expects tokens [B, S, P, {dim_in}], got shape {tuple(tokens.shape)}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        with autocast_disabled(self.token_norm.weight.device.type):
            pose_tokens = self.token_norm(tokens[:, :, 0].to(self.token_norm.weight.dtype))  # [B, S, C]
            return self._refine(pose_tokens, num_iterations)

    def _refine(self, pose_tokens: Tensor, num_iterations: int) -> list[Tensor]:
        """pose_tokens: [B, S, C] → list of [B, S, target_dim]."""
        B, S, _ = pose_tokens.shape
        pred = None  # raw accumulated encoding [B, S, target_dim]
        preds = []
        for _ in range(num_iterations):
            source = self.empty_pose_tokens.expand(B, S, -1) if pred is None else pred.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(source)).chunk(3, dim=-1)
            modulated = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(modulated)))
            pred = delta if pred is None else pred + delta
            preds.append(activate_pose(pred, self.trans_act, self.quat_act, self.fl_act))
        return preds
