"""VGGT prediction heads: parity with the official code, official key set, in-place-ReLU trap, precision.

Parity runs every head of every ``vggt_parity_*`` fixture on the fixture's OFFICIAL aggregator outputs
(``aggregated_tokens.*``), so it does not need our aggregator.  Run: ``python -m pytest tests/test_vggt_heads.py -q``.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_path
from safetensors.torch import load_file

from hess.models.camera_head import CameraHead
from hess.models.dpt_head import DPTHead, ResidualConvUnit
from hess.models.head_utils import ACTIVATIONS, activate_head, activate_pose
from hess.models.track_head import TrackHead
from hess.models.track_modules import CorrelationPyramid, flow_embedding, sample_features

TOL = dict(rtol=1e-4, atol=1e-4)  # README tolerances of vggt_parity_*
TRACK_TOL = dict(rtol=0.0, atol=1e-2)
VIS_TOL = dict(rtol=0.0, atol=2e-3)


# ----------------------------------------------------------------------------- fixture helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def parity_dirs() -> list[Path]:
    dirs = sorted(fixture_path().glob("vggt_parity_*"))
    return dirs or [fixture_path("vggt_parity_a")]  # skips / fails with the reason when nothing is there


@lru_cache(maxsize=None)
def load_case(folder: Path) -> dict:
    """Config, state_dict, inputs and outputs of one parity fixture (cached per folder)."""
    cfg = json.loads((folder / "config.json").read_text())
    outputs = load_file(folder / "outputs.safetensors")
    n_layers = sum(k.startswith("aggregated_tokens.") for k in outputs)
    return {
        "cfg": cfg,
        "state": load_file(folder / "state_dict.safetensors"),
        "inputs": load_file(folder / "inputs.safetensors"),
        "outputs": outputs,
        "tokens": [outputs[f"aggregated_tokens.{i}"] for i in range(n_layers)],
        "patch_start_idx": cfg.get("patch_start_idx", 1 + cfg["aggregator"]["num_register_tokens"]),
    }


def sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def loaded(module: torch.nn.Module, state: dict, prefix: str) -> torch.nn.Module:
    result = module.load_state_dict(sub_state(state, prefix), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return module.eval()


def build_track_head(cfg: dict) -> TrackHead:
    head = TrackHead(**cfg["track_head"])
    if cfg.get("track_head_feature_extractor"):
        head.feature_extractor = DPTHead(**cfg["track_head_feature_extractor"])
    return head


# ----------------------------------------------------------------------------- parity


def _check_camera(case: dict) -> None:
    head = loaded(CameraHead(**case["cfg"]["camera_head"]), case["state"], "camera_head")
    with torch.no_grad():
        pose_list = head(case["tokens"])
    torch.testing.assert_close(pose_list[-1], case["outputs"]["pose_enc"], **TOL)
    torch.testing.assert_close(torch.stack(pose_list), case["outputs"]["pose_enc_list"], **TOL)


def _check_dpt(case: dict, name: str, key: str, channels: int) -> None:
    head = loaded(DPTHead(**case["cfg"][name]), case["state"], name)
    with torch.no_grad():
        values, conf = head(case["tokens"], case["inputs"]["images"], case["patch_start_idx"])
    assert values.shape[-1] == channels
    torch.testing.assert_close(values, case["outputs"][key], **TOL)
    torch.testing.assert_close(conf, case["outputs"][f"{key}_conf"], **TOL)


def _check_track(case: dict) -> None:
    head = loaded(build_track_head(case["cfg"]), case["state"], "track_head")
    with torch.no_grad():
        coords, vis, conf = head(
            case["tokens"], case["inputs"]["images"], case["patch_start_idx"], case["inputs"]["query_points"]
        )
    out = case["outputs"]
    torch.testing.assert_close(coords[-1], out["track"], **TRACK_TOL)
    torch.testing.assert_close(torch.stack(coords), out["track_list"], **TRACK_TOL)
    torch.testing.assert_close(vis, out["vis"], **VIS_TOL)
    torch.testing.assert_close(conf, out["track_conf"], **VIS_TOL)


CHECKS = {
    "camera_head": (_check_camera, "pose_enc"),
    "depth_head": (lambda c: _check_dpt(c, "depth_head", "depth", 1), "depth"),
    "point_head": (lambda c: _check_dpt(c, "point_head", "world_points", 3), "world_points"),
    "track_head": (_check_track, "track"),
}


@pytest.mark.parametrize("head", sorted(CHECKS))
def test_head_matches_official_outputs(head: str) -> None:
    """Every head of every vggt_parity_* fixture, strict load, README tolerances."""
    check, output_key = CHECKS[head]
    ran = []
    for folder in parity_dirs():
        case = load_case(folder)
        if not case["cfg"].get(head) or output_key not in case["outputs"]:
            continue  # this fixture has the head disabled
        try:
            check(case)
        except AssertionError as err:
            raise AssertionError(f"{folder.name}/{head}: {err}") from None
        ran.append(folder.name)
    assert ran, f"no parity fixture exercises {head}"


def test_parity_detects_a_non_inplace_relu_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture comparison is sensitive to the trap: a skip that adds x (not relu(x)) fails it."""
    case = load_case(parity_dirs()[0])

    def skip_adds_x(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x

    monkeypatch.setattr(ResidualConvUnit, "forward", skip_adds_x)
    with pytest.raises(AssertionError):
        _check_dpt(case, "depth_head", "depth", 1)


# ----------------------------------------------------------------------------- official key set


def test_full_size_heads_have_the_vggt_1b_keys_and_shapes() -> None:
    manifest = json.loads(fixture_path("vggt_1b_state_dict_manifest.json").read_text())
    with torch.device("meta"):
        heads = {
            "camera_head": CameraHead(),
            "point_head": DPTHead(2048, output_dim=4, activation="inv_log", conf_activation="expp1"),
            "depth_head": DPTHead(2048, output_dim=2, activation="exp", conf_activation="expp1"),
            "track_head": TrackHead(),
        }
    for prefix, head in heads.items():
        expected = [(k, list(s)) for k, s in manifest["keys"].items() if k.startswith(prefix + ".")]
        got = [(f"{prefix}.{k}", list(v.shape)) for k, v in head.state_dict().items()]
        assert got == expected, f"{prefix}: key/shape/order mismatch"
        assert sum(p.numel() for p in head.parameters()) == manifest["params_per_top_level_module"][prefix]


# ----------------------------------------------------------------------------- in-place ReLU trap


def test_residual_conv_unit_skip_adds_relu_of_input() -> None:
    """Zero convs reduce the unit to its skip: the official in-place ReLU makes that relu(x), not x."""
    unit = ResidualConvUnit(2)
    for p in unit.parameters():
        torch.nn.init.zeros_(p)
    x = torch.tensor([[[[-1.0, 2.0], [3.0, -4.0]], [[0.5, -0.5], [-2.0, 1.0]]]])
    x_before = x.clone()
    out = unit(x)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 2.0], [3.0, 0.0]], [[0.5, 0.0], [0.0, 1.0]]]]))
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # the caller's tensor is not overwritten


def test_residual_conv_unit_formula_with_random_weights() -> None:
    unit = ResidualConvUnit(3)
    x = torch.randn(2, 3, 5, 4)
    r = x.clamp(min=0)
    hidden = F.conv2d(r, unit.conv1.weight, unit.conv1.bias, padding=1).clamp(min=0)
    expected = F.conv2d(hidden, unit.conv2.weight, unit.conv2.bias, padding=1) + r
    torch.testing.assert_close(unit(x), expected)


# ----------------------------------------------------------------------------- small random heads

H, W, PATCH_START = 28, 42, 5  # 2×3 patches


def small_heads() -> dict:
    torch.manual_seed(0)
    dpt = dict(features=16, out_channels=[8, 8, 16, 16], intermediate_layer_idx=[0, 1, 2, 3])
    track = TrackHead(dim_in=32, features=16, hidden_size=16, corr_levels=2, corr_radius=1)
    track.feature_extractor = DPTHead(32, feature_only=True, down_ratio=2, pos_embed=False, **dpt)
    return {
        "camera": CameraHead(dim_in=32, trunk_depth=1, num_heads=4).eval(),
        "depth": DPTHead(32, output_dim=2, activation="exp", **dpt).eval(),
        "track": track.eval(),
    }


def small_inputs(S: int = 3) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    tokens = [torch.randn(1, S, PATCH_START + 6, 32) for _ in range(4)]
    return tokens, torch.rand(1, S, 3, H, W), torch.tensor([[[3.0, 5.0], [20.5, 11.0]]])


def run_heads(heads: dict, tokens, images, queries) -> list[torch.Tensor]:
    with torch.no_grad():
        pose = heads["camera"](tokens)[-1]
        depth, depth_conf = heads["depth"](tokens, images, PATCH_START)
        coords, vis, conf = heads["track"](tokens, images, PATCH_START, queries)
    return [pose, depth, depth_conf, coords[-1], vis, conf]


def test_heads_stay_float32_under_cpu_autocast() -> None:
    """Under bf16 autocast (and with bf16 tokens from an autocast aggregator) results equal plain fp32."""
    heads = small_heads()
    tokens, images, queries = small_inputs()
    reference = run_heads(heads, tokens, images, queries)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = run_heads(heads, tokens, images, queries)
        from_bf16_tokens = run_heads(heads, [t.bfloat16() for t in tokens], images, queries)
    for ref, got in zip(reference, under_autocast):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for ref, got in zip(reference, from_bf16_tokens):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)  # only the token rounding differs


def test_dpt_frame_chunks_equal_one_pass_and_feature_shape() -> None:
    heads = small_heads()
    tokens, images, _ = small_inputs(S=3)
    with torch.no_grad():
        whole = heads["depth"](tokens, images, PATCH_START, frames_chunk_size=None)
        chunked = heads["depth"](tokens, images, PATCH_START, frames_chunk_size=2)
        features = heads["track"].feature_extractor(tokens, images, PATCH_START, frames_chunk_size=1)
    assert whole[0].shape == (1, 3, H, W, 1) and whole[1].shape == (1, 3, H, W)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert features.shape == (1, 3, 16, H // 2, W // 2)


def test_track_head_keeps_frame0_at_the_queries() -> None:
    heads = small_heads()
    tokens, images, queries = small_inputs()
    with torch.no_grad():
        coords, vis, conf = heads["track"](tokens, images, PATCH_START, queries[0], iters=2)  # [N, 2] accepted
    assert len(coords) == 2 and coords[-1].shape == (1, 3, 2, 2)
    for c in coords:
        torch.testing.assert_close(c[:, 0], queries)
    assert vis.shape == conf.shape == (1, 3, 2) and bool(((vis > 0) & (vis < 1)).all())


def test_gradients_reach_the_aggregated_tokens() -> None:
    """Calibration differentiates camera and depth losses w.r.t. the aggregator: nothing may detach them."""
    heads = small_heads()
    tokens, images, _ = small_inputs()
    tokens = [t.requires_grad_() for t in tokens]
    pose = heads["camera"](tokens)[-1]
    depth, conf = heads["depth"](tokens, images, PATCH_START)
    (pose.square().sum() + depth.mean() + conf.mean()).backward()
    for i, t in enumerate(tokens):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, f"layer {i}"
    assert tokens[-1].grad[:, :, 0].abs().sum() > 0  # camera token of the last layer feeds the camera head


# ----------------------------------------------------------------------------- known answers


def test_activations_known_values() -> None:
    x = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(ACTIVATIONS.get("inv_log")(x), torch.tensor([1 - math.e, 0.0, math.e**2 - 1]))
    torch.testing.assert_close(ACTIVATIONS.get("expp1")(x), 1 + x.exp())
    out = torch.arange(2 * 4 * 1 * 1, dtype=torch.float32).view(2, 4, 1, 1) - 3  # [N, C, H, W]
    values, conf = activate_head(out, "linear", "expp1")
    torch.testing.assert_close(values, out.permute(0, 2, 3, 1)[..., :3])
    torch.testing.assert_close(conf, 1 + out[:, 3].exp())
    pose = torch.tensor([-1.0, -2.0, -3.0, -0.5, 0.5, -0.1, 0.9, -0.2, 1.3])
    expected = pose.clone()
    expected[7] = 0.0  # FoV ReLU; translation and (unnormalised) quaternion are linear
    torch.testing.assert_close(activate_pose(pose, "linear", "linear", "relu"), expected)


def test_flow_embedding_interleaves_sin_cos() -> None:
    xy = torch.tensor([[[0.5, -2.0]]])  # [1, 1, 2]
    emb = flow_embedding(xy, 4)  # frequencies 0 and 500
    x, y = 0.5, -2.0
    expected = [0.0, 1.0, math.sin(500 * x), math.cos(500 * x), 0.0, 1.0, math.sin(500 * y), math.cos(500 * y)]
    torch.testing.assert_close(emb[0, 0], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_sampling_and_correlation_window_layout() -> None:
    """Integer pixels sample exactly; window index i·(2r+1)+j ↔ offset (x + i − r, y + j − r)."""
    fmaps = torch.randn(1, 1, 4, 6, 7)  # [B, S, C, H, W]
    x0, y0 = 3.0, 2.0
    feats = sample_features(fmaps[:, 0], torch.tensor([[[x0, y0]]]))  # [1, 1, C]
    torch.testing.assert_close(feats[0, 0], fmaps[0, 0, :, 2, 3])
    target = torch.randn(1, 1, 1, 4)
    window = CorrelationPyramid(fmaps, num_levels=1, radius=1).sample(target, torch.tensor([[[[x0, y0]]]]))
    corr = torch.einsum("c,chw->hw", target[0, 0, 0], fmaps[0, 0]) / 2.0  # / sqrt(C)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(window[0, 0, 0, 3 * i + j], corr[int(y0) + j - 1, int(x0) + i - 1])


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors() -> None:
    heads = small_heads()
    tokens, images, queries = small_inputs()
    with pytest.raises(ValueError, match="expected"):
        heads["depth"](tokens, torch.rand(1, 3, 3, 42, 42), PATCH_START)  # token count ≠ patch grid
    with pytest.raises(ValueError, match="images must be"):
        heads["depth"](tokens, images[0], PATCH_START)
    with pytest.raises(ValueError, match="reads layers"):
        heads["depth"](tokens[:2], images, PATCH_START)
    with pytest.raises(ValueError, match="query_points"):
        heads["track"](tokens, images, PATCH_START, torch.rand(1, 2, 3))
    with pytest.raises(ValueError, match="CameraHead expects"):
        heads["camera"]([tokens[0][..., :16]])
    with pytest.raises(KeyError, match="known: .*inv_log"):
        DPTHead(32, activation="softplus_typo")
    with pytest.raises(KeyError, match="absT_quaR_FoV"):
        CameraHead(dim_in=32, num_heads=4, pose_encoding_type="relT_quaR_FoV")
