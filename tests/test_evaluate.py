"""hess.evaluate: restricted-attention core, oracle / constant known answers, core restoration."""
import math

import pytest
import torch
from torch import nn

from hess.data import make_scene, normalize_scene, scene_key
from hess.evaluate import FrameLocalCore, constant_pose_metrics, evaluate_model
from hess.models import build_vggt
from hess.models.layers import DenseCore
from hess.models.pose import extri_intri_to_pose_encoding
from hess.models.vggt import VGGT
from hess.patch import SparsePlan

OPTS = dict(height=42, width=42, num_frames=3, arc_deg=(10.0, 20.0))


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(scene_key("test", k), **OPTS).permute([2, 0, 1]) for k in range(2)]


def test_frame_local_core_matches_explicit_masked_softmax():
    torch.manual_seed(0)
    P, ns, S = 4, 1, 3
    q, k, v = (torch.randn(2, 2, S * P, 8) for _ in range(3))
    out = FrameLocalCore()(q, k, v, tokens_per_frame=P, num_special=ns)
    idx = torch.arange(S * P)
    allowed = (idx[:, None] // P == idx[None, :] // P) | (idx[None, :] % P < ns)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    ref = logits.masked_fill(~allowed, -math.inf).softmax(-1) @ v
    assert torch.allclose(out, ref, atol=1e-5)
    only = FrameLocalCore(keep_special=False)(q, k, v, tokens_per_frame=P, num_special=ns)
    ref_only = logits.masked_fill(idx[:, None] // P != idx[None, :] // P, -math.inf).softmax(-1) @ v
    assert torch.allclose(only, ref_only, atol=1e-5)
    # one frame: the restriction is no restriction
    assert torch.allclose(FrameLocalCore()(q, k, v, tokens_per_frame=S * P, num_special=ns),
                          DenseCore()(q, k, v), atol=1e-5)


class Oracle(nn.Module):
    """Returns the GT pose encoding and GT point maps of one normalised scene."""

    def __init__(self, scene):
        super().__init__()
        n = normalize_scene(scene)
        self.enc = extri_intri_to_pose_encoding(n.extrinsics[None], n.intrinsics[None], n.image_hw)
        self.points = n.world_points[None].clone()

    def global_attention_layers(self):
        return []

    def forward(self, images):
        return {"pose_enc": self.enc, "world_points": self.points * 2.0,          # scale-only: depth = z, median-scaled
                "world_points_conf": torch.ones(self.points.shape[:-1]), "images": images}

    geometry = VGGT.geometry


def test_oracle_scores_perfectly(scenes):
    m = evaluate_model(Oracle(scenes[0]), scenes[:1])
    assert m["auc30"] == pytest.approx(1.0) and m["rra15"] == 1.0 and m["num_pairs"] == 3
    assert m["chamfer"] < 1e-4 and m["chamfer_f0"] < 1e-4 and m["abs_rel"] < 1e-4 and m["point_err"] < 1e-4


def test_constant_with_the_true_relative_pose_is_perfect_for_two_frames(scenes):
    two = scenes[0].subset([0, 1])
    n = normalize_scene(two)
    enc = extri_intri_to_pose_encoding(n.extrinsics[None], n.intrinsics[None], n.image_hw)[0, 1]
    assert constant_pose_metrics([two], enc)["auc30"] == pytest.approx(1.0)
    assert constant_pose_metrics([two])["auc30"] < 0.5                           # 'no motion' is wrong


def test_attention_modes_change_outputs_and_restore_cores(scenes):
    torch.manual_seed(0)
    model = build_vggt({"aggregator": dict(img_size=42, embed_dim=32, depth=2, num_heads=2, num_register_tokens=1,
                                           patch_embed="conv", init_values=1.0),
                        "camera_head": dict(trunk_depth=1, num_heads=2), "depth_head": None, "track_head": None,
                        "point_head": dict(features=8, out_channels=[8, 8, 8, 8], intermediate_layer_idx=[0, 1, 0, 1])})
    dense = evaluate_model(model, scenes)
    local = evaluate_model(model, scenes, attention="frame-local")
    sparse = evaluate_model(model, scenes, attention=SparsePlan(keep_ratio=0.5, q_block=3, k_block=3))
    assert dense["chamfer"] != local["chamfer"] and math.isfinite(sparse["chamfer"])
    assert all(isinstance(a.core, DenseCore) for a in model.global_attention_layers())
    assert evaluate_model(model, scenes)["chamfer"] == dense["chamfer"]
    with pytest.raises(ValueError, match="attention must be"):
        evaluate_model(model, scenes, attention="sparse")


ASSET = __import__("pathlib").Path(__file__).resolve().parents[1] / "hess" / "assets" / "hess_tiny.safetensors"


@pytest.mark.skipif(not ASSET.exists(), reason="hess/assets/hess_tiny.safetensors not shipped yet")
def test_shipped_tiny_model_loads_and_uses_global_attention():
    """The embedded checkpoint loads strictly from its config and its poses depend on cross-frame attention."""
    import json

    from safetensors.torch import load_file

    from hess.evaluate import eval_scenes_default

    model = build_vggt(json.loads(ASSET.with_suffix(".json").read_text()))
    model.load_state_dict(load_file(str(ASSET)))                              # strict
    assert ASSET.stat().st_size <= 25 * 2 ** 20
    scenes = eval_scenes_default("test", 2)
    with torch.no_grad():
        model.eval()
        dense = model(scenes[0].images)["pose_enc"]
        for attn in model.global_attention_layers():
            attn.core = FrameLocalCore()
        local = model(scenes[0].images)["pose_enc"]
    assert torch.isfinite(dense).all() and dense.shape == (1, 4, 9)
    assert (dense - local)[0, 1:, :3].abs().max() > 1e-3                      # translations change
