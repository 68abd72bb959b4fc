"""hess.models.VGGT: the 1B key set, input validation, other configurations, the attention seam."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import fixture_path
from hess.models import (
    MODELS,
    VGGT_PRESETS,
    Aggregator,
    build_model,
    build_vggt,
    pose_encoding_to_extri_intri,
    unproject_depth_map_to_point_map,
)
from hess.models.vggt import HEAD_CLASSES

HEADS_AVAILABLE = all(importlib.util.find_spec(mod) is not None for mod, _ in HEAD_CLASSES.values())
needs_heads = pytest.mark.skipif(not HEADS_AVAILABLE, reason="head modules are not in hess.models yet")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_config(embed_dim=32, depth=4, num_heads=2, num_register_tokens=2, aa_block_size=1,
                aa_order=("frame", "global"), heads=HEADS_AVAILABLE) -> dict:
    """A small VGGT; DPT layers spread over the depth, like [4, 11, 17, 23] over 24."""
    idx = [round((i + 1) * depth / 4) - 1 for i in range(4)]
    dpt = dict(features=16, out_channels=[8, 16, 32, 32], intermediate_layer_idx=idx)
    cfg = {
        "aggregator": dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_embed="conv",
                           num_register_tokens=num_register_tokens, aa_block_size=aa_block_size,
                           aa_order=list(aa_order)),
        "camera_head": dict(num_heads=4, trunk_depth=1),
        "point_head": dpt,
        "depth_head": dpt,
        "track_head": dict(features=16, iters=2, corr_levels=2, corr_radius=2, hidden_size=32),
        "track_head_feature_extractor": dict(dpt, feature_only=True, down_ratio=2, pos_embed=False),
    }
    if not heads:
        cfg.update({s: None for s in HEAD_CLASSES})
    return cfg


def frames(B=1, S=2, H=28, W=42, seed=0) -> torch.Tensor:
    return torch.rand(B, S, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(fixture_path("vggt_1b_state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def vggt_1b():
    if not HEADS_AVAILABLE:
        pytest.skip("head modules are not in hess.models yet")
    return build_vggt("vggt-1b", device="meta")


# ---- the VGGT-1B architecture ----------------------------------------------------------------------------
def test_vggt_1b_preset_has_the_official_keys_and_shapes(manifest, vggt_1b):
    model = vggt_1b
    sd = model.state_dict()
    assert list(sd) == list(manifest["keys"])  # same keys, same order
    assert len(sd) == manifest["num_keys"] == 1797
    wrong = [k for k, v in sd.items() if list(v.shape) != manifest["keys"][k]]
    assert not wrong, wrong[:10]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"] == 1_256_537_516
    for top, count in manifest["params_per_top_level_module"].items():
        assert sum(p.numel() for p in getattr(model, top).parameters()) == count, top
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == manifest["params_with_requires_grad_false"] == ["aggregator.patch_embed.mask_token"]
    assert model.aggregator._resnet_mean.shape == (1, 1, 3, 1, 1)  # non-persistent, not in the state_dict
    assert model.num_special_tokens == 5 and len(model.global_attention_layers()) == 24
    assert model.model_id == "vggt-1b"


def test_vggt_1b_counts_without_the_manifest(vggt_1b):
    """The numbers of the issue (no fixture needed): 1,797 tensors, 1,256,537,516 parameters."""
    model = vggt_1b
    assert len(model.state_dict()) == 1797
    assert sum(p.numel() for p in model.parameters()) == 1_256_537_516
    assert all(p.is_meta for p in model.parameters())


def test_vggt_1b_aggregator_matches_manifest(manifest):
    with torch.device("meta"):
        agg = Aggregator(**VGGT_PRESETS["vggt-1b"]["aggregator"])
    expected = {k[len("aggregator."):]: s for k, s in manifest["keys"].items() if k.startswith("aggregator.")}
    got = {k: list(v.shape) for k, v in agg.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)


def test_official_keyword_config_disables_heads():
    model = build_vggt({"img_size": 518, "patch_size": 14, "embed_dim": 1024, "enable_camera": False,
                        "enable_point": False, "enable_depth": False, "enable_track": False}, device="meta")
    assert model.camera_head is model.point_head is model.depth_head is model.track_head is None
    assert not any(k.endswith("_head") or "_head." in k for k in model.state_dict())


# ---- configuration errors ----------------------------------------------------------------------------------
def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="bogus_section"):
        build_vggt({"aggregator": {}, "bogus_section": {}}, device="meta")
    with pytest.raises(ValueError, match="emb_dim"):
        build_vggt({"aggregator": {"emb_dim": 64}}, device="meta")
    with pytest.raises(KeyError, match="vggt-1b"):  # lists the known presets
        build_vggt("vggt-2b")
    with pytest.raises(ValueError, match="aa_block_size"):
        build_vggt(tiny_config(depth=4, aa_block_size=3))
    with pytest.raises(KeyError, match="dinov2_vitl14_reg"):
        build_vggt({"aggregator": {"patch_embed": "resnet"}}, device="meta")
    with pytest.raises(ValueError, match="embed_dim"):
        build_vggt({"aggregator": {"patch_embed": "dinov2_vitb14_reg", "embed_dim": 1024}}, device="meta")
    with pytest.raises(ValueError, match="pi3"):
        build_vggt({"model": "pi3", "aggregator": {}}, device="meta")
    if HEADS_AVAILABLE:
        cfg = tiny_config()
        cfg["point_head"]["colour"] = 1
        with pytest.raises(ValueError, match="colour"):
            build_vggt(cfg)


def test_fixture_config_file_builds_the_parity_preset():
    cfg = json.loads(fixture_path("vggt_parity_a", "config.json").read_text())
    heads = {} if HEADS_AVAILABLE else {s: None for s in HEAD_CLASSES}
    a = build_vggt({**cfg, **heads}, device="meta").state_dict()
    b = build_vggt({**VGGT_PRESETS["vggt-parity-a"], **heads}, device="meta").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    if HEADS_AVAILABLE:  # the file path itself is accepted too
        model = build_vggt(str(fixture_path("vggt_parity_a", "config.json")), device="meta")
        assert model.model_id == cfg["name"] and model.track_head.feature_extractor.projects[0].weight.shape == (16, 128, 1, 1)


def test_registry_dispatch():
    assert "vggt" in MODELS
    model = build_model("vggt-parity-a", device="meta") if HEADS_AVAILABLE else build_model(tiny_config())
    assert model.aggregator.embed_dim in (64, 32)


# ---- inputs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_vggt(tiny_config()).eval()


def test_bad_inputs_raise_clear_errors(tiny_model):
    x = frames()
    with pytest.raises(ValueError, match=r"\[S, 3, H, W\] or \[B, S, 3, H, W\]"):
        tiny_model(x[0, 0])
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        tiny_model(x[..., :27, :])
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        tiny_model(x[..., :40])
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        tiny_model((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"3, H, W"):
        tiny_model(torch.rand(1, 2, 4, 28, 28))
    bad = x.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny_model(bad)
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        tiny_model(x * 255)
    if HEADS_AVAILABLE:
        with pytest.raises(ValueError, match="query_points"):
            tiny_model(x, query_points=torch.rand(4, 3))


def test_rank4_input_gets_a_batch_dimension(tiny_model):
    x = frames()
    with torch.no_grad():
        a, b = tiny_model(x[0]), tiny_model(x)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


# ---- other configurations ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, S",
    [
        (dict(), 1),
        (dict(), 4),
        (dict(embed_dim=48, num_heads=3), 2),
        (dict(num_register_tokens=0), 2),
        (dict(num_register_tokens=5), 3),
        (dict(aa_block_size=2), 3),
        (dict(aa_order=("global", "frame")), 2),
    ],
)
def test_other_configs_build_and_run(kwargs, S):
    torch.manual_seed(0)
    cfg = tiny_config(**kwargs)
    model = build_vggt(cfg).eval()
    C = cfg["aggregator"]["embed_dim"]
    R = cfg["aggregator"]["num_register_tokens"]
    H, W = 28, 42
    x = frames(S=S, H=H, W=W)
    with torch.no_grad():
        tokens, start = model.aggregator(x)
        preds = model(x, query_points=torch.tensor([[3.0, 5.0], [20.0, 10.0]])) if HEADS_AVAILABLE else {}
    assert start == model.num_special_tokens == 1 + R
    assert len(tokens) == 4 and all(t.shape == (1, S, 1 + R + (H // 14) * (W // 14), 2 * C) for t in tokens)
    if HEADS_AVAILABLE:
        assert preds["pose_enc"].shape == (1, S, 9) and len(preds["pose_enc_list"]) == 4
        assert preds["depth"].shape == (1, S, H, W, 1) and preds["depth_conf"].shape == (1, S, H, W)
        assert preds["world_points"].shape == (1, S, H, W, 3) and preds["world_points_conf"].shape == (1, S, H, W)
        assert preds["track"].shape == (1, S, 2, 2) and preds["vis"].shape == preds["conf"].shape == (1, S, 2)
        assert torch.equal(preds["images"], x)
        assert all(torch.isfinite(v).all() for v in preds.values() if isinstance(v, torch.Tensor))


def test_batch_of_two_equals_each_sample():
    torch.manual_seed(0)
    model = build_vggt(tiny_config()).eval()
    x = frames(B=2, S=3)
    qp = torch.tensor([[[3.0, 5.0], [20.0, 10.0]], [[7.0, 7.0], [30.0, 2.0]]])
    def kw(rows: slice) -> dict:
        return {"query_points": qp[rows]} if HEADS_AVAILABLE else {}

    with torch.no_grad():
        both = model(x, **kw(slice(0, 2)))
        tokens_both, _ = model.aggregator(x)
        for b in range(2):
            one = model(x[b : b + 1], **kw(slice(b, b + 1)))
            tokens_one, _ = model.aggregator(x[b : b + 1])
            for t2, t1 in zip(tokens_both, tokens_one):
                torch.testing.assert_close(t2[b : b + 1], t1, rtol=1e-5, atol=1e-5)
            for key, value in one.items():
                if key == "pose_enc_list":
                    value, other = torch.stack(value), torch.stack(both[key])[:, b : b + 1]
                else:
                    other = both[key][b : b + 1]
                torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_first_frame_uses_its_own_special_tokens():
    """Identical frames: frame 0 differs from the others (slot 0), frames 1..S-1 agree (shared slot 1)."""
    torch.manual_seed(0)
    agg = Aggregator(embed_dim=32, depth=2, num_heads=2, num_register_tokens=2, patch_embed="conv").eval()
    with torch.no_grad():
        agg.camera_token.normal_()
        agg.register_token.normal_()
        x = frames(S=1).expand(1, 4, 3, 28, 42)
        tokens, _ = agg(x)
    last = tokens[-1][0]  # [S, P, 2C]
    torch.testing.assert_close(last[1], last[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last[1], last[3], rtol=1e-5, atol=1e-5)
    assert (last[0] - last[1]).abs().max() > 1e-2


# ---- the attention seam and checkpointing ---------------------------------------------------------------
class RecordingCore(torch.nn.Module):
    """Dense SDPA that records the core_kwargs it is given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, q, k, v, **core_kwargs):
        self.calls.append(core_kwargs)
        return F.scaled_dot_product_attention(q, k, v)


def test_swapping_the_core_keeps_keys_and_sees_the_layout():
    torch.manual_seed(0)
    model = build_vggt(tiny_config(heads=False)).eval()
    x = frames(S=3)
    keys_before = list(model.state_dict())
    with torch.no_grad():
        ref, _ = model.aggregator(x)
    layers = model.global_attention_layers()
    assert layers == [b.attn for b in model.aggregator.global_blocks]
    cores = [RecordingCore() for _ in layers]
    for attn, core in zip(layers, cores):
        attn.core = core
    frame_core = model.aggregator.frame_blocks[0].attn.core = RecordingCore()
    assert list(model.state_dict()) == keys_before
    with torch.no_grad():
        out, _ = model.aggregator(x)
    P = 1 + 2 + 2 * 3  # camera + 2 registers + 2x3 patches
    assert all(c.calls == [{"tokens_per_frame": P, "num_special": 3}] for c in cores)
    assert frame_core.calls == [{}]  # frame blocks get no layout hints
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_is_an_explicit_flag():
    torch.manual_seed(0)
    agg = Aggregator(embed_dim=32, depth=2, num_heads=2, num_register_tokens=2, patch_embed="conv")
    assert agg.use_checkpoint is False
    agg.train()
    assert agg.use_checkpoint is False  # train mode does not switch it on
    x = frames(S=2)
    grads = []
    for flag in (False, True):
        agg.zero_grad()
        agg.use_checkpoint = flag
        tokens, _ = agg(x)
        tokens[-1].square().mean().backward()
        grads.append(agg.camera_token.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert grads[0].abs().max() > 0


# ---- geometry ----------------------------------------------------------------------------------------------
@needs_heads
def test_geometry_maps_outputs_to_common_fields(tiny_model):
    x = frames(S=2)
    preds = tiny_model(x)
    geo = tiny_model.geometry(preds)
    extr, intr = pose_encoding_to_extri_intri(preds["pose_enc"], (28, 42))
    assert torch.equal(geo["extrinsics"], extr) and torch.equal(geo["intrinsics"], intr)
    assert geo["extrinsics"].shape == (1, 2, 3, 4) and geo["intrinsics"].shape == (1, 2, 3, 3)
    assert geo["world_points"].shape == (1, 2, 28, 42, 3) and geo["world_points_conf"].shape == (1, 2, 28, 42)
    assert torch.equal(geo["depth"], preds["depth"][..., 0])
    # differentiable: the camera token gets a gradient through the cameras
    geo["extrinsics"].sum().backward()
    assert tiny_model.aggregator.camera_token.grad is not None
    tiny_model.zero_grad()
    # without a point head the points come from depth + cameras
    no_points = {k: v for k, v in preds.items() if not k.startswith("world_points")}
    geo2 = tiny_model.geometry(no_points)
    expected = unproject_depth_map_to_point_map(preds["depth"][0], extr[0], intr[0])
    torch.testing.assert_close(geo2["world_points"][0], expected)


@needs_heads
def test_images_key_only_in_eval_mode(tiny_model):
    x = frames(S=2)
    tiny_model.train()
    try:
        with torch.no_grad():
            assert "images" not in tiny_model(x)
    finally:
        tiny_model.eval()
