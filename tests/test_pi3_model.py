"""hess's π³: checkpoint key set, configs, the attention seam, input checks, geometry mapping, loading.

Parity with the official code is in ``test_pi3_parity.py``; here the known answers are the official
manifest, hand-built cameras, and properties the official model has by construction (permutation
equivariance, no parameters in attention cores).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_path
from hess.models.layers import Attention, DenseCore
from hess.models.load import CheckpointUnavailableError, StateDictMismatchError
from hess.models.pi3 import PI3_PRESETS, Pi3, build_pi3, load_pi3, resolve_config
from hess.models.pi3_heads import LinearPts3d, estimate_intrinsics, svd_orthogonalize
from hess.models.pose import depth_to_camera_points

TINY = "pi3-parity-a"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_config(**changes) -> dict:
    """The parity preset with dotted overrides, e.g. ``tiny_config(**{"decoder.dec_depth": 2})``."""
    cfg = copy.deepcopy(PI3_PRESETS[TINY])
    for key, value in changes.items():
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


def images(B: int = 1, N: int = 3, H: int = 28, W: int = 42, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, N, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> Pi3:
    torch.manual_seed(0)
    return build_pi3(TINY).eval()


# ---- checkpoint structure ------------------------------------------------------------------------------
def test_default_preset_has_exactly_the_official_keys_and_shapes() -> None:
    manifest = json.loads(fixture_path("pi3_state_dict_manifest.json").read_text())
    model = build_pi3("pi3", device="meta")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(manifest["keys"]) - set(shapes)) == []  # missing
    assert sorted(set(shapes) - set(manifest["keys"])) == []  # unexpected
    assert {k: v for k, v in shapes.items() if v != manifest["keys"][k]} == {}
    assert len(shapes) == manifest["num_state_dict_keys"] == 1210
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest["num_params"] == 958_696_732
    for prefix, count in manifest["params_per_top_level_module"].items():
        if prefix.startswith("<root"):
            continue
        assert sum(p.numel() for p in getattr(model, prefix).parameters()) == count, prefix
    assert [k for k, _ in model.named_buffers()] == manifest["persistent_buffers_in_state_dict"]


def test_parity_preset_is_the_fixture_config() -> None:
    fixture = json.loads(fixture_path("pi3_parity_a", "config.json").read_text())
    assert resolve_config(TINY)[0] == resolve_config(fixture)[0]


def test_official_keyword_config_resolves_to_the_default() -> None:
    assert resolve_config({"pos_type": "rope100", "decoder_size": "large"})[0] == resolve_config("pi3")[0]


@pytest.mark.parametrize(
    "config, error, words",
    [
        ("pi3-huge", KeyError, ["pi3-huge", "pi3-parity-a"]),
        (tiny_config(extra_section={}), ValueError, ["extra_section"]),
        (tiny_config(**{"decoder.dec_width": 3}), ValueError, ["dec_width", "decoder"]),
        (tiny_config(**{"point_decoder.in_dim": 64}), ValueError, ["point_decoder in_dim 64"]),
        (tiny_config(**{"encoder.embed_dim": 32}), ValueError, ["encoder embed_dim 32"]),
        (tiny_config(**{"camera_head.dim": 16}), ValueError, ["camera_decoder out_dim"]),
        (tiny_config(pos_type="sincos"), ValueError, ["pos_type"]),
        (tiny_config(**{"decoder.dec_depth": 1}), ValueError, ["dec_depth"]),
        ({"decoder_size": "base"}, ValueError, ["decoder_size"]),
    ],
)
def test_bad_configs_raise_naming_the_problem(config, error, words) -> None:
    with pytest.raises(error) as info:
        build_pi3(config, device="meta")
    for word in words:
        assert word in str(info.value)


# ---- other configurations ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"decoder.dec_depth": 2},
        {"decoder.dec_depth": 4, "num_register_tokens": 3},
        {"num_register_tokens": 0},
        {"encoder.embed_dim": 32, "encoder.num_heads": 2, "decoder.dec_embed_dim": 32, "decoder.dec_num_heads": 2,
         "point_decoder.in_dim": 64, "camera_decoder.in_dim": 64, "camera_decoder.depth": 1, "pos_type": "rope10000"},
    ],
)
def test_other_configs_build_run_and_are_permutation_equivariant(changes) -> None:
    torch.manual_seed(1)
    model = build_pi3(tiny_config(**changes)).eval()
    x = images(B=2, N=3)
    with torch.no_grad():
        out = model(x)
        perm = [2, 0, 1]
        permuted = model(x[:, perm])
    assert out["points"].shape == out["local_points"].shape == (2, 3, 28, 42, 3)
    assert out["conf"].shape == (2, 3, 28, 42, 1) and out["camera_poses"].shape == (2, 3, 4, 4)
    assert all(torch.isfinite(v).all() for v in out.values())
    for name, value in out.items():
        torch.testing.assert_close(permuted[name], value[:, perm], rtol=1e-4, atol=1e-4 * value.abs().max().item())
    depth = model.config["decoder"]["dec_depth"]
    assert len(model.global_attention_layers()) == depth // 2
    assert model.num_special_tokens == model.config["num_register_tokens"]


def test_poses_are_rigid_and_points_are_poses_times_local_points(tiny: Pi3) -> None:
    with torch.no_grad():
        out = tiny(images())
    T = out["camera_poses"].double()
    R = T[..., :3, :3]
    eye = torch.eye(3, dtype=torch.float64).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.det(R), torch.ones_like(torch.det(R)), atol=1e-5, rtol=0)
    assert torch.equal(T[..., 3, :], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand_as(T[..., 3, :]))
    local = out["local_points"].double()
    expected = torch.einsum("bnij,bnhwj->bnhwi", R, local) + T[..., None, None, :3, 3]
    torch.testing.assert_close(out["points"].double(), expected, rtol=1e-5, atol=1e-5)
    assert (local[..., 2] > 0).all()


# ---- the attention seam --------------------------------------------------------------------------------
class RecordingCore(DenseCore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, q, k, v, **core_kwargs):
        self.calls.append((tuple(q.shape), dict(core_kwargs)))
        return super().forward(q, k, v, **core_kwargs)


def test_global_layers_are_the_odd_decoder_blocks(tiny: Pi3) -> None:
    layers = tiny.global_attention_layers()
    assert [id(a) for a in layers] == [id(tiny.decoder[i].attn) for i in (1, 3, 5)]
    assert all(isinstance(a, Attention) for a in layers)
    assert tiny.num_special_tokens == 5 and isinstance(tiny.model_id, str) and tiny.model_id == TINY


def test_swapping_global_cores_keeps_keys_and_passes_layout_hints() -> None:
    torch.manual_seed(0)
    model = build_pi3(TINY).eval()
    x = images(B=2, N=3)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(x)
    global_cores = [RecordingCore() for _ in model.global_attention_layers()]
    for attn, core in zip(model.global_attention_layers(), global_cores):
        attn.core = core
    frame_cores = [RecordingCore() for i in range(0, len(model.decoder), 2)]
    for i, core in zip(range(0, len(model.decoder), 2), frame_cores):
        model.decoder[i].attn.core = core
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    with torch.no_grad():
        recorded = model(x)
    P = 5 + (28 // 14) * (42 // 14)
    for core in global_cores:
        assert core.calls == [((2, 4, 3 * P, 16), {"tokens_per_frame": P, "num_special": 5})]
    for core in frame_cores:
        assert core.calls == [((2 * 3, 4, P, 16), {})]
    for name in dense:
        assert torch.equal(recorded[name], dense[name]), name


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = build_pi3(tiny_config(**{"decoder.dec_depth": 2})).eval()
    x = images(N=2)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.use_checkpoint = flag
        out = model(x)
        (out["points"].square().mean() + out["conf"].mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert model.encoder.use_checkpoint
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# ---- input checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x, words",
    [
        (torch.rand(3, 28, 42), ["shape (3, 28, 42)"]),
        (torch.rand(1, 2, 4, 28, 42), ["[B, N, 3, H, W]"]),
        (torch.rand(1, 2, 3, 28, 40), ["multiples of the patch size 14", "28x40"]),
        (torch.ones(1, 2, 3, 28, 42, dtype=torch.uint8), ["float", "uint8"]),
        (torch.full((1, 2, 3, 28, 42), float("nan")), ["NaN"]),
    ],
)
def test_bad_images_raise(tiny: Pi3, x, words) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        tiny(x)
    for word in words:
        assert word in str(info.value)


def test_images_outside_unit_range_warn_and_4d_input_gets_a_batch(tiny: Pi3) -> None:
    x = images(B=1, N=2)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"\[0, 1\]"):
            tiny(x * 255)
        four_d, five_d = tiny(x[0]), tiny(x)
    for name in five_d:
        assert torch.equal(four_d[name], five_d[name])


# ---- geometry ------------------------------------------------------------------------------------------
def test_geometry_maps_to_the_shared_fields(tiny: Pi3) -> None:
    x = images(B=2, N=2)
    poses_grad = {}
    out = tiny(x)
    out["camera_poses"].register_hook(lambda g: poses_grad.setdefault("g", g))
    geo = tiny.geometry(out)
    B, S, H, W = 2, 2, 28, 42
    assert geo["extrinsics"].shape == (B, S, 3, 4) and geo["intrinsics"].shape == (B, S, 3, 3)
    with pytest.raises(ValueError, match="image_size_hw"):
        tiny.geometry(out, image_size_hw=(H, W + 14))
    assert geo["world_points"] is out["points"] and geo["depth"].shape == (B, S, H, W)
    assert torch.equal(geo["depth"], out["local_points"][..., 2])
    assert torch.equal(geo["world_points_conf"], torch.sigmoid(out["conf"][..., 0]))
    assert ((geo["world_points_conf"] > 0) & (geo["world_points_conf"] < 1)).all()
    # world-to-camera: maps the world points back to the camera-frame points
    E = geo["extrinsics"].double()
    cam = torch.einsum("bsij,bshwj->bshwi", E[..., :3], out["points"].double()) + E[..., None, None, :, 3]
    torch.testing.assert_close(cam, out["local_points"].double(), rtol=1e-5, atol=1e-5)
    # differentiable back to the camera poses
    geo["extrinsics"].sum().backward()
    assert poses_grad["g"].abs().sum() > 0


def test_estimate_intrinsics_recovers_a_known_pinhole_camera() -> None:
    H, W = 20, 30
    K = torch.tensor([[[35.0, 0, W / 2], [0, 28.0, H / 2], [0, 0, 1]], [[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]]],
                     dtype=torch.float64)
    depth = 0.5 + torch.rand(2, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    points = depth_to_camera_points(depth, K)  # [2, H, W, 3], hess's unprojection convention
    torch.testing.assert_close(estimate_intrinsics(points), K)
    weights = torch.rand(2, H, W, dtype=torch.float64)
    torch.testing.assert_close(estimate_intrinsics(points, weights), K)
    # noise on low-weight pixels is ignored
    noisy = points.clone()
    noisy[:, :5, :, 0] *= 3.0
    weights = torch.ones(2, H, W, dtype=torch.float64)
    weights[:, :5] = 0
    torch.testing.assert_close(estimate_intrinsics(noisy, weights), K)


# ---- head pieces ---------------------------------------------------------------------------------------
def test_linear_pts3d_uses_pixel_shuffle_channel_layout() -> None:
    p, D, out_dim, h, w = 2, 4, 3, 2, 3
    head = LinearPts3d(p, D, out_dim)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.arange(out_dim * p * p, dtype=torch.float32))
        head.proj.weight[:, 0] = 1000.0  # token index → value offset
    tokens = torch.zeros(1, h * w, D)
    tokens[0, :, 0] = torch.arange(h * w, dtype=torch.float32)
    maps = head(tokens, (h * p, w * p))  # [1, H, W, out]
    for r in range(h):
        for c in range(w):
            for dy in range(p):
                for dx in range(p):
                    for ch in range(out_dim):
                        expected = 1000.0 * (r * w + c) + ch * p * p + dy * p + dx
                        assert maps[0, r * p + dy, c * p + dx, ch].item() == expected


def test_svd_orthogonalize_returns_the_nearest_proper_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(64, 9, generator=g, dtype=torch.float64)
    R = svd_orthogonalize(m)
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.det(R), torch.ones(64, dtype=torch.float64))
    assert (torch.det(m.reshape(-1, 3, 3)) < 0).any(), "test needs reflections in the input"
    # a rotation is its own projection, whatever the row scales
    angle = torch.tensor(0.7, dtype=torch.float64)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    scaled = rot * torch.tensor([[2.0], [0.5], [3.0]], dtype=torch.float64)
    torch.testing.assert_close(svd_orthogonalize(scaled.reshape(1, 9))[0], rot)
    # nearest: no random proper rotation is closer to the row-normalised matrix
    target = torch.nn.functional.normalize(m[0].reshape(3, 3), dim=-1)
    best = (R[0] - target).norm()
    q = svd_orthogonalize(torch.randn(2000, 9, generator=g, dtype=torch.float64))
    assert ((q - target).flatten(1).norm(dim=1) >= best - 1e-9).all()


# ---- loading -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny: Pi3):
    folder = tmp_path_factory.mktemp("pi3ckpt")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(PI3_PRESETS[TINY]))
    return folder


def test_load_from_file_directory_and_pt(checkpoint, tiny: Pi3, tmp_path) -> None:
    x = images(N=2)
    with torch.no_grad():
        ref = tiny(x)
    torch.save({"model": tiny.state_dict()}, tmp_path / "ckpt.pt")
    for model in (load_pi3(checkpoint), load_pi3(checkpoint / "model.safetensors", config=TINY),
                  load_pi3(tmp_path / "ckpt.pt", config=TINY)):
        assert not model.training and model.model_id.endswith(("pi3ckpt0", "model.safetensors", "ckpt.pt"))
        with torch.no_grad():
            out = model(x)
        for name in ref:
            assert torch.equal(out[name], ref[name]), name
    half = load_pi3(checkpoint, dtype="bf16")
    assert half.decoder[0].attn.qkv.weight.dtype == torch.bfloat16 and half.image_mean.dtype == torch.bfloat16


def test_load_lists_mismatched_keys_by_name(checkpoint) -> None:
    with pytest.raises(StateDictMismatchError) as info:
        load_pi3(checkpoint, config=tiny_config(**{"decoder.dec_depth": 4}))
    assert "unexpected keys" in str(info.value) and "decoder.5.attn.qkv.weight" in str(info.value)
    with pytest.raises(StateDictMismatchError, match=r"missing keys.*decoder\.7\.norm1\.weight"):
        load_pi3(checkpoint, config=tiny_config(**{"decoder.dec_depth": 8}))
    with pytest.warns(UserWarning, match="unexpected keys"):
        model = load_pi3(checkpoint, config=tiny_config(**{"decoder.dec_depth": 4}), strict=False)
    assert len(model.decoder) == 4


def test_load_from_an_unreachable_hub_says_how_to_get_the_weights(monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError(f"{repo_id}/{filename} not cached and the Hub is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointUnavailableError, match=r"yyfz233/Pi3.*hf download"):
        load_pi3("yyfz233/Pi3")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pi3("/nonexistent/pi3.safetensors")


# ---- precision and the rest of the pipeline ------------------------------------------------------------
def test_heads_run_in_full_precision_under_autocast(tiny: Pi3) -> None:
    x = images(N=2)
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x)
    for name, value in low.items():
        assert value.dtype == torch.float32, name  # heads cast their inputs up, as the official forward
        torch.testing.assert_close(value, ref[name], rtol=0.05, atol=0.05 * ref[name].abs().max().item())


def test_calibration_gives_a_layer_by_head_table() -> None:
    from hess.calibrate import CalibConfig, calibrate
    from hess.data import make_scene

    torch.manual_seed(0)
    model = build_pi3(TINY)
    scenes = [make_scene(i, num_frames=3, height=28, width=42) for i in range(2)]
    scores = calibrate(model, scenes, CalibConfig(progress=False))
    L, H = len(model.global_attention_layers()), model.decoder[1].attn.num_heads
    table = scores.hess(lam=0.0)  # π³ in the paper: λ = 0, point-cloud error only
    assert (scores.num_layers, scores.num_heads) == (L, H) == (3, 4) and table.shape == (L, H)
    assert torch.isfinite(table).all() and (table >= 0).all() and table.sum() > 0


def test_full_budget_sparsification_reproduces_the_dense_outputs() -> None:
    from hess.patch import SparsePlan, densify, realized_density, sparsify

    torch.manual_seed(0)
    model = build_pi3(TINY).eval()
    x = images(N=4, H=56, W=84)  # 29 tokens per frame: several key blocks of 8
    keys = list(model.state_dict())
    with torch.no_grad():
        dense = model(x)
        sparsify(model, SparsePlan(keep_ratio=1.0, q_block=16, k_block=8))
        full = model(x)
        assert realized_density(model).overall == 1.0
        sparsify(model, SparsePlan(keep_ratio=0.3, q_block=16, k_block=8))
        sparse = model(x)
        assert realized_density(model).overall < 0.5
        densify(model)
        restored = model(x)
    assert list(model.state_dict()) == keys
    for name, value in dense.items():
        torch.testing.assert_close(full[name], value, rtol=1e-4, atol=1e-4)
        assert torch.equal(restored[name], value)
    assert not torch.allclose(sparse["points"], dense["points"], rtol=1e-4, atol=1e-4)
