"""The faithful oracle (hess.scorers.oracle_deltas + hess.calibrate.fixed_target_errors): targets held fixed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hess.calibrate import CalibConfig, calibration_error_fn, fixed_target_errors
from hess.data import normalize_scene
from hess.models.layers import Attention
from hess.scorers import oracle_deltas, oracle_sensitivity

pytest.importorskip("hess.attention")


class DisplacingModel(nn.Module):
    """Predicts the GT exactly, except that any change of head 0's attention output (vs. dense) lifts the
    points of every other pixel by ``lift`` along the viewing axis; head 1 feeds nothing.

    So sparsifying head 0 degrades half the point cloud by a known amount and leaves the cameras alone.
    """

    def __init__(self, scene, lift: float = 0.5, patches: int = 16) -> None:
        super().__init__()
        S = scene.num_frames
        self.P, self.lift = 1 + patches, lift
        torch.manual_seed(0)
        self.attn = Attention(8, num_heads=2)
        self.register_buffer("tokens", torch.randn(1, S * self.P, 8))
        self.register_buffer("points", scene.world_points.clone())
        self.register_buffer("extrinsics", scene.extrinsics.clone())
        mask = torch.zeros(scene.valid.shape, dtype=torch.bool)
        mask.view(-1)[::2] = True
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.register_buffer("reference", self._head0())

    def _head0(self) -> torch.Tensor:
        out = self.attn(self.tokens, tokens_per_frame=self.P, num_special=1)
        return out  # proj mixes heads; head 1 is cut out of proj below

    def global_attention_layers(self):
        return [self.attn]

    def forward(self, images):
        change = (self._head0() - self.reference).abs().max()
        moved = torch.tanh(1e4 * change) * self.lift  # 0 when dense, ≈ lift as soon as head 0's output changes
        offset = torch.zeros_like(self.points)
        offset[..., 2] = torch.where(self.mask, moved, torch.zeros_like(moved))
        return {"points": (self.points + offset)[None], "extrinsics": self.extrinsics[None]}

    def geometry(self, raw):
        return {"extrinsics": raw["extrinsics"], "world_points": raw["points"]}


def _setup():
    from test_calibrate import make_scene

    scene = normalize_scene(make_scene(0, frames=4, size=16))  # GT already normalised: dense alignment = identity
    model = DisplacingModel(scene)
    D = model.attn.head_dim
    with torch.no_grad():
        model.attn.proj.weight[:, D:] = 0  # head 1 does not reach the output
        model.reference.copy_(model._head0())
    return model, scene


def test_a_head_that_degrades_points_raises_fixed_target_delta_pc():
    """Head 0 sparsified lifts half of the points by 0.5 off the surface: with the dense inlier set and NN
    targets held fixed, Δe_pc = ½ · ½ · 0.5² = 0.0625 (every dense point is an inlier at distance 0);
    head 1 feeds nothing (Δ = 0); cameras never move (Δe_cam = 0).  The refitted e_pc drops the lifted
    points from its inlier set and reports (almost) nothing."""
    model, scene = _setup()
    cfg = CalibConfig(use_icp=False, progress=False)
    prepare, measure = fixed_target_errors(cfg, chamfer_points=512)
    delta = oracle_deltas(model, [scene], prepare, measure, keep_ratio=0.25, q_block=4, k_block=4)
    assert set(delta) == {"cam", "pc", "chamfer"}
    assert delta["pc"][0, 0].item() == pytest.approx(0.0625, rel=0.02)
    assert delta["pc"][0, 1].item() == pytest.approx(0.0, abs=1e-9)
    assert delta["cam"].abs().max().item() < 1e-9
    assert delta["chamfer"][0, 0].item() > 0.05 and abs(delta["chamfer"][0, 1].item()) < 1e-9  # untruncated
    refit = oracle_sensitivity(model, [scene], calibration_error_fn(cfg, lam=0.0), 0.25, q_block=4, k_block=4)
    assert refit[0, 0].item() < 0.1 * delta["pc"][0, 0].item()
