"""Parity of hess's π³ with the official ``yyfz/Pi3`` code, on every ``fixtures/pi3_parity_*`` folder.

Each folder holds a random-weight model's ``state_dict``, its ``config.json``, the inputs and every
tensor the README lists (outputs, decoder / head intermediates, encoder and block I/O, small-variance
probes).  Tolerances are the README's: rtol = atol = 1e-4, probes 1e-5, positions exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path, fixtures_dir
from hess.models.pi3 import Pi3, build_pi3

TOL = dict(rtol=1e-4, atol=1e-4)
PROBE_TOL = dict(rtol=1e-5, atol=1e-5)
FOLDERS = sorted(p.name for p in fixtures_dir().glob("pi3_parity_*") if p.is_dir()) or ["pi3_parity_a"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


class Case:
    """A fixture folder loaded once: model (strict load), tensors, and one captured forward."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.model: Pi3 = build_pi3(self.config).eval()
        self.model.load_state_dict(load_file(str(folder / "state_dict.safetensors")), strict=True)
        self.images = load_file(str(folder / "inputs.safetensors"))["images"]
        self.expected = load_file(str(folder / "outputs.safetensors"))
        self.encoder_io = load_file(str(folder / "encoder_io.safetensors"))
        self.block_io = load_file(str(folder / "block_io.safetensors"))
        self.captured: dict[str, torch.Tensor] = {}
        handles = self._hooks()
        try:
            with torch.no_grad():
                self.outputs = self.model(self.images)
        finally:
            for h in handles:
                h.remove()

    def _hooks(self) -> list:
        m, cap = self.model, self.captured
        B, N = self.images.shape[:2]
        handles = []

        def keep(name, fn=lambda out: out):
            return lambda mod, args, out: cap.__setitem__(name, fn(out))

        for i, block in enumerate(m.decoder):
            handles.append(block.register_forward_hook(keep(f"decoder_tokens.{i}", lambda o: o.reshape(B * N, -1, o.shape[-1]))))
            handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: cap.update({f"in.{i}": args[0], f"pos.{i}": kwargs["pos"]}), with_kwargs=True))
        handles.append(m.point_decoder.register_forward_pre_hook(
            lambda mod, args, kwargs: cap.update(decoder_hidden=args[0], decoder_pos=kwargs["pos"]), with_kwargs=True))
        for name in ("point_decoder", "conf_decoder", "camera_decoder"):
            handles.append(getattr(m, name).register_forward_hook(keep(f"{name}_out")))
        handles.append(m.point_head.register_forward_hook(keep("point_head_raw")))
        handles.append(m.camera_head.fc_rot.register_forward_hook(keep("camera_head_fc_rot")))
        handles.append(m.camera_head.fc_t.register_forward_hook(keep("camera_head_fc_t")))
        handles.append(m.encoder.register_forward_pre_hook(lambda mod, args: cap.__setitem__("encoder_input", args[0])))
        return handles


_CASES: dict[str, Case] = {}


@pytest.fixture(params=FOLDERS)
def case(request) -> Case:
    folder = fixture_path(request.param)
    if request.param not in _CASES:
        _CASES[request.param] = Case(folder)
    return _CASES[request.param]


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: dict) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.dtype.is_floating_point:
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: integer tensor differs"
        return
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name}: {m}")


def test_official_outputs_match(case: Case) -> None:
    for name in ("points", "local_points", "conf", "camera_poses"):
        _close(case.outputs[name], case.expected[name], name, TOL)


def test_decoder_and_head_intermediates_match(case: Case) -> None:
    intermediates = [k for k in case.expected if k not in ("points", "local_points", "conf", "camera_poses")]
    assert intermediates, "fixture lists no intermediates"
    for name in intermediates:
        assert name in case.captured, f"intermediate {name} listed by the fixture is not produced by hess's π³"
        _close(case.captured[name], case.expected[name], name, TOL)


def test_encoder_io_matches(case: Case) -> None:
    enc, io = case.model.encoder, case.encoder_io
    x = io["input"]
    _close(case.captured["encoder_input"], x, "encoder input (ImageNet-normalised images)", TOL)
    with torch.no_grad():
        _close(enc.patch_embed(x), io["patch_embed"], "patch_embed", TOL)
        C = io["patch_embed"].shape[-1]
        zeros = torch.zeros(1, 1 + io["patch_embed"].shape[1], C)
        _close(enc.interpolate_pos_encoding(zeros, *x.shape[-2:]), io["interpolated_pos_embed"], "interpolated_pos_embed", TOL)
        _close(enc.prepare_tokens(x), io["block0.input"], "block0.input", TOL)
        _close(enc.blocks[0](io["block0.input"]), io["block0.output"], "block0.output", TOL)
        _close(enc.blocks[0](io["block0.small_input"]), io["block0.small_output"], "block0.small_output (LN eps probe)", PROBE_TOL)
        feats = enc(x)
    for name in ("x_prenorm", "x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        _close(feats[name], io[name], name, TOL)


def test_block_io_matches(case: Case) -> None:
    io, dec, P = case.block_io, case.model.decoder, case.config["tokens_per_frame"]
    f, g = case.config["frame_block_index"], case.config["global_block_index"]
    assert f % 2 == 0 and g % 2 == 1, "fixture frame/global indices disagree with π³'s alternation"
    # what the forward fed the blocks (global blocks see the frame-major [B, N·P, C] layout)
    _close(case.captured[f"in.{f}"], io["frame_block.input"], "frame_block.input", TOL)
    _close(case.captured[f"pos.{f}"], io["frame_block.pos"], "frame_block.pos", TOL)
    _close(case.captured[f"in.{g}"], io["global_block.input"], "global_block.input", TOL)
    _close(case.captured[f"pos.{g}"], io["global_block.pos"], "global_block.pos", TOL)
    with torch.no_grad():
        _close(dec[f](io["frame_block.input"], pos=io["frame_block.pos"]), io["frame_block.output"], "frame_block.output", TOL)
        out = dec[g](io["global_block.input"], pos=io["global_block.pos"], tokens_per_frame=P, num_special=5)
        _close(out, io["global_block.output"], "global_block.output", TOL)
        small = dec[f](io["frame_block.small_input"], pos=io["frame_block.pos"])
        _close(small, io["frame_block.small_output"], "frame_block.small_output (block LN eps probe)", PROBE_TOL)
        probe_in = dec[f].norm1(io["frame_block.input"]) * 0.1
        _close(probe_in, io["frame_block.attn_probe_input"], "frame_block.attn_probe_input", PROBE_TOL)
        probe = dec[f].attn(io["frame_block.attn_probe_input"], pos=io["frame_block.pos"])
        _close(probe, io["frame_block.attn_probe_output"], "frame_block.attn_probe_output (q/k-norm eps probe)", PROBE_TOL)


def test_permuting_frames_permutes_outputs(case: Case) -> None:
    perm = case.config.get("permutation") or list(range(case.images.shape[1]))[::-1]
    with torch.no_grad():
        permuted = case.model(case.images[:, perm])
    for name in ("points", "local_points", "conf", "camera_poses"):
        _close(permuted[name], case.outputs[name][:, perm], f"{name} under frame permutation {perm}", TOL)
    # and the permuted outputs really differ from the unpermuted ones (the check is not vacuous)
    assert not torch.allclose(permuted["points"], case.outputs["points"], **TOL)


def test_config_layout_matches_fixture(case: Case) -> None:
    m, cfg = case.model, case.config
    assert m.num_special_tokens == cfg["patch_start_idx"] == cfg["num_register_tokens"]
    assert case.captured["decoder_pos"].shape[1] == cfg["tokens_per_frame"]
    assert len(m.global_attention_layers()) == cfg["decoder"]["dec_depth"] // 2
