"""Parity of hess.models.VGGT with the official VGGT on every ``vggt_parity_*`` fixture.

Each fixture folder (``config.json``, ``state_dict.safetensors``, ``inputs.safetensors``,
``outputs.safetensors``, optional ``block_io.safetensors`` and DINOv2 sub-fixture) was produced by the
official code; the model is built from the folder's own config, so any config in that format is tested.
Tolerances are those of the fixture README (vggt-architecture.md §14).
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path, fixtures_dir
from hess.models import (
    DinoVisionTransformer,
    build_vggt,
    load_vggt,
    pose_encoding_to_extri_intri,
    unproject_depth_map_to_point_map,
)
from hess.models.vggt import HEAD_CLASSES

FIXTURES = sorted(p.name for p in fixtures_dir().glob("vggt_parity_*") if p.is_dir()) or ["vggt_parity_a"]
HEADS_AVAILABLE = all(importlib.util.find_spec(mod) is not None for mod, _ in HEAD_CLASSES.values())
HEAD_OUTPUTS = {
    "pose_enc", "pose_enc_list", "extrinsic", "intrinsic", "depth", "depth_conf", "world_points",
    "world_points_conf", "world_points_from_depth", "track", "track_list", "vis", "track_conf",
}
# name -> (rtol, atol); everything else rtol = atol = 1e-4.
TOLERANCES = {
    "world_points_from_depth": (1e-4, 1e-3),
    "track": (0.0, 1e-2),
    "track_list": (0.0, 1e-2),
    "vis": (0.0, 2e-3),
    "track_conf": (0.0, 2e-3),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def assert_matches(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES.get(name, (1e-4, 1e-4))
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@functools.lru_cache(maxsize=None)
def _fixture(name: str) -> dict:
    folder = fixture_path(name)
    config = json.loads((folder / "config.json").read_text())
    if HEADS_AVAILABLE:
        model = load_vggt(folder / "state_dict.safetensors", config=config, strict=True)
    else:  # aggregator only, until the heads exist
        sections = {"aggregator": config["aggregator"], **{s: None for s in HEAD_CLASSES}}
        model = build_vggt(sections).eval()
        sd = {k: v for k, v in load_file(folder / "state_dict.safetensors").items() if k.startswith("aggregator.")}
        model.load_state_dict(sd, strict=True)
    return dict(
        folder=folder, config=config, model=model,
        inputs=load_file(folder / "inputs.safetensors"), outputs=load_file(folder / "outputs.safetensors"),
    )


@functools.lru_cache(maxsize=None)
def _produced(name: str) -> dict[str, torch.Tensor]:
    """Every fixture output recomputed with hess, under the official protocol (README 'Exact protocol')."""
    fx = _fixture(name)
    model, images, qp = fx["model"], fx["inputs"]["images"], fx["inputs"].get("query_points")
    H, W = images.shape[-2:]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        tokens, _ = model.aggregator(images)
        out["patch_embed_tokens"] = model.aggregator.embed_patches(images)
        out.update({f"aggregated_tokens.{i}": t for i, t in enumerate(tokens)})
        if not HEADS_AVAILABLE:
            return out
        preds = model(images)
        if "pose_enc" in preds:
            out["pose_enc"], out["pose_enc_list"] = preds["pose_enc"], torch.stack(preds["pose_enc_list"])
            out["extrinsic"], out["intrinsic"] = pose_encoding_to_extri_intri(preds["pose_enc"], image_size_hw=(H, W))
        for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
            if key in preds:
                out[key] = preds[key]
        if "depth" in preds and "extrinsic" in out:
            out["world_points_from_depth"] = torch.stack([
                unproject_depth_map_to_point_map(preds["depth"][b], out["extrinsic"][b], out["intrinsic"][b])
                for b in range(images.shape[0])
            ])
        if qp is not None and model.track_head is not None:
            captured = []  # the track head's full output (all iterations), seen during the forward
            handle = model.track_head.register_forward_hook(lambda mod, args, output: captured.append(output))
            try:
                preds_q = model(images, query_points=qp)
            finally:
                handle.remove()
            for key in ("pose_enc", "depth", "world_points"):  # the query points change nothing else
                if key in preds:
                    assert torch.equal(preds_q[key], preds[key]), key
            out["track"], out["vis"], out["track_conf"] = preds_q["track"], preds_q["vis"], preds_q["conf"]
            out["track_list"] = torch.stack(list(captured[0][0]))
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_output_has_a_producer(name):
    expected = set(_fixture(name)["outputs"])
    producible = set(_produced(name)) | (HEAD_OUTPUTS if not HEADS_AVAILABLE else set())
    assert not expected - producible, f"fixture outputs nobody checks: {sorted(expected - producible)}"


@pytest.mark.parametrize("name", FIXTURES)
def test_aggregator_matches_official(name):
    expected, produced = _fixture(name)["outputs"], _produced(name)
    names = [k for k in expected if k == "patch_embed_tokens" or k.startswith("aggregated_tokens.")]
    assert len([k for k in names if k.startswith("aggregated_tokens.")]) == _fixture(name)["config"]["aggregator"]["depth"]
    for key in names:
        assert_matches(key, produced[key], expected[key])


@pytest.mark.parametrize("name", FIXTURES)
def test_heads_match_official(name):
    if not HEADS_AVAILABLE:
        pytest.skip("head modules (camera_head / dpt_head / track_head) are not in hess.models yet")
    expected, produced = _fixture(name)["outputs"], _produced(name)
    names = sorted(set(expected) & HEAD_OUTPUTS)
    assert names, "fixture has no head outputs"
    for key in names:
        assert_matches(key, produced[key], expected[key])


@pytest.mark.parametrize("name", FIXTURES)
def test_block_io_matches_official(name):
    fx = _fixture(name)
    path = fx["folder"] / "block_io.safetensors"
    if not path.is_file():
        pytest.skip(f"{name} has no block_io.safetensors")
    io = load_file(path)
    idx = fx["config"].get("block_io_index", 4)
    agg = fx["model"].aggregator
    captured = {}

    def capture(kind):
        def hook(module, args, kwargs):
            captured.setdefault(kind, (args[0].clone(), kwargs))  # the call made by the aggregator
        return hook

    handles = [agg.frame_blocks[idx].register_forward_pre_hook(capture("frame"), with_kwargs=True),
               agg.global_blocks[idx].register_forward_pre_hook(capture("global"), with_kwargs=True)]
    try:
        with torch.no_grad():
            agg(fx["inputs"]["images"])
            for kind, block in (("frame", agg.frame_blocks[idx]), ("global", agg.global_blocks[idx])):
                out = block(io[f"{kind}_block.input"], pos=io[f"{kind}_block.pos"])
                assert_matches(f"{kind}_block.output", out, io[f"{kind}_block.output"])
    finally:
        for h in handles:
            h.remove()
    # Inside our forward the blocks receive the official input and positions.
    for kind in ("frame", "global"):
        x, kwargs = captured[kind]
        assert_matches(f"{kind}_block.input", x, io[f"{kind}_block.input"])
        assert torch.equal(kwargs["pos"], io[f"{kind}_block.pos"]), f"{kind} block positions differ"
    P = io["frame_block.input"].shape[1]
    assert captured["global"][1]["tokens_per_frame"] == P
    assert captured["global"][1]["num_special"] == fx["config"]["aggregator"].get("num_register_tokens", 4) + 1
    assert "tokens_per_frame" not in captured["frame"][1]


@pytest.mark.parametrize("name", FIXTURES)
def test_dinov2_matches_official(name):
    fx = _fixture(name)
    folder: Path = fx["folder"]
    if "dinov2" not in fx["config"] or not (folder / "dinov2_state_dict.safetensors").is_file():
        pytest.skip(f"{name} has no DINOv2 sub-fixture")
    cfg = {k: v for k, v in fx["config"]["dinov2"].items() if k != "block_fn"}  # block_fn: the official class
    dino = DinoVisionTransformer(**cfg).eval()
    dino.load_state_dict(load_file(folder / "dinov2_state_dict.safetensors"), strict=True)
    io = load_file(folder / "dinov2_io.safetensors")
    x = io["input"]
    with torch.no_grad():
        out = dino(x)
        p = cfg["patch_size"]
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        out["interpolated_pos_embed"] = dino.interpolate_pos_encoding(torch.zeros(1, 1 + n, cfg["embed_dim"]), *x.shape[-2:])
    names = [k for k in io if k != "input"]
    assert "x_norm_patchtokens" in names and "interpolated_pos_embed" in names
    for key in names:
        assert_matches(f"dinov2.{key}", out[key], io[key])
