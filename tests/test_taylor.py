"""hess.taylor: the sparsity-taylor scorer, its linearisation against measured changes, artifact and cache."""
from __future__ import annotations

import pytest
import torch

from hess.calibrate import CalibConfig, calibration_errors, error_targets, predict_geometry, prepare_scene
from hess.scorers import OneHeadSparseCore, wrapped_cores
from hess.scoring import SCORERS, HeadScores, ScoreContext
from hess.taylor import (KIND, TAYLOR_SLOTS, TaylorProbeCore, cached_taylor, calibrate_taylor, encode,
                         measured_change, signed_estimate, taylor_readout)
from test_calibrate import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = CalibConfig(progress=False)
BLOCKS = dict(q_block=4, k_block=2)  # tiny model: 3 frames x 4 patches = 12 patch tokens → n_k = 6


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# ------------------------------------------------------------------------- the estimate itself
def test_probe_core_leaves_the_forward_dense_and_restores_cores():
    model, scene = tiny(torch.float64)
    scene = prepare_scene(scene, QUIET, torch.device("cpu"))
    layers = model.global_attention_layers()
    before = [a.core for a in layers]
    with torch.no_grad():
        dense = predict_geometry(model, scene, QUIET)["world_points"]
    art = calibrate_taylor(model, [scene], QUIET, keep_ratio=0.5, **BLOCKS)
    assert [a.core for a in layers] == before
    assert all(p.requires_grad for p in model.parameters()) and model.training is True
    make = lambda _, core: TaylorProbeCore(core, 0.5, **BLOCKS)  # noqa: E731
    with wrapped_cores(layers, make) as cores, torch.no_grad():
        probed = predict_geometry(model, scene, QUIET)["world_points"]
        assert all(c.delta is not None and c.blocks == 3 and c.num_key_blocks == 6 for c in cores)
        assert all(float(c.delta.abs().max()) > 0 for c in cores)  # keep ratio 0.5 changes every layer
    assert torch.equal(probed, dense)  # the probe is zero: same numbers as the dense model
    assert art.meta["kind"] == KIND and art.config["taylor"]["keep_ratio"] == 0.5
    assert art.traces.shape == (2, 3, 1, 2, 4)


def test_full_budget_gives_exactly_zero():
    """keep ratio 1 keeps every block: sparse == dense, so both the estimate and the measured change are 0."""
    model, scene = tiny(torch.float64)
    art = calibrate_taylor(model, [scene], QUIET, keep_ratio=1.0, **BLOCKS)
    assert float(signed_estimate(art, "cam").abs().max()) < 1e-12
    assert float(measured_change(model, [scene], QUIET, 1.0, **BLOCKS).abs().max()) < 1e-12


@pytest.mark.parametrize("keep_ratio", [0.9, 0.5, 0.25])
def test_first_order_estimate_matches_small_measured_changes(keep_ratio):
    """Moving one head a fraction t of the way to its sparse output changes e by t·estimate + O(t²)."""
    model, scene = tiny(torch.float64)
    art = calibrate_taylor(model, [scene], QUIET, keep_ratio=keep_ratio, **BLOCKS)
    t = 1e-4
    meas = measured_change(model, [scene], QUIET, keep_ratio, scale=t, **BLOCKS)
    for j, error in enumerate(("cam", "pc")):
        est = t * signed_estimate(art, error)[0]
        scale = float(meas[j].abs().max())
        assert scale > 0
        assert float((est - meas[j, 0]).abs().max()) < 1e-3 * scale  # second order in t: ~1e-5 measured


def test_full_sparsification_correlates_on_a_tiny_random_model():
    """Heads sparsified all the way (scale 1): the signed estimate still tracks the measured change."""
    model, scene = tiny(torch.float64, seed=3)
    for keep_ratio in (0.9, 0.5):
        art = calibrate_taylor(model, [scene], QUIET, keep_ratio=keep_ratio, **BLOCKS)
        meas = measured_change(model, [scene], QUIET, keep_ratio, **BLOCKS)
        for j, error in enumerate(("cam", "pc")):
            assert _pearson(signed_estimate(art, error)[0], meas[j, 0]) > 0.99


def test_measured_change_is_the_one_head_oracle_with_fixed_alignment():
    """Cross-check against hess.scorers.OneHeadSparseCore and the dense model's alignment targets."""
    model, scene = tiny(torch.float64)
    got = measured_change(model, [scene], QUIET, 0.5, **BLOCKS)
    prep = prepare_scene(scene, QUIET, torch.device("cpu"))
    layers = model.global_attention_layers()
    with torch.no_grad():
        pred = predict_geometry(model, prep, QUIET)
        targets = error_targets(pred, prep, QUIET)
        base = calibration_errors(pred, targets)
        for l, h in [(0, 1), (1, 3)]:
            with wrapped_cores([layers[l]], lambda _, c: OneHeadSparseCore(c, h, 0.5, **BLOCKS)):
                errs = calibration_errors(predict_geometry(model, prep, QUIET), targets)
            assert got[0, 0, l, h] == pytest.approx(float(errs["cam"] - base["cam"]), rel=1e-9, abs=1e-15)
            assert got[1, 0, l, h] == pytest.approx(float(errs["pc"] - base["pc"]), rel=1e-9, abs=1e-15)


# ------------------------------------------------------------------------- artifact and read-out
def _hand_artifact() -> HeadScores:
    signed = torch.zeros(2, 2, 2, 3, dtype=torch.float64)  # [error, scene, L, H]
    signed[0, 0] = torch.tensor([[1.0, -2, 1], [0, 0, 4]])
    signed[0, 1] = torch.tensor([[-3.0, 2, 3], [0, 0, -4]])  # cam: E|.| = [[2,2,2],[0,0,4]]
    signed[1, :] = torch.tensor([[1.0, -3, 6], [-1, 1, 2]])  # pc: E|.| = [[1,3,6],[1,1,2]]
    return HeadScores(traces=encode(signed), scene_ids=["a", "b"], config={"taylor": {"keep_ratio": 0.5}},
                      meta={"kind": KIND})


def test_readout_is_hess_normalisation_of_mean_abs_and_squares():
    art = _hand_artifact()
    cam = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0, 0, 1]], dtype=torch.float64)
    pc = torch.tensor([[0.1, 0.3, 0.6], [0.25, 0.25, 0.5]], dtype=torch.float64)
    assert torch.allclose(taylor_readout(art, lam=1.0), cam)
    assert torch.allclose(taylor_readout(art, lam=0.0), pc)
    assert torch.allclose(taylor_readout(art, lam=0.25), 0.25 * cam + 0.75 * pc)
    sq_cam = torch.tensor([[5.0, 4, 5], [0, 0, 16]], dtype=torch.float64)  # E (.)² per head
    assert torch.allclose(taylor_readout(art, "squared", lam=1.0), sq_cam / sq_cam.sum(1, keepdim=True))
    assert torch.allclose(taylor_readout(art, lam=1.0, normalize=False), torch.tensor([[2.0, 2, 2], [0, 0, 4]],
                                                                                       dtype=torch.float64))
    assert torch.equal(signed_estimate(art, "cam")[1], torch.tensor([[-3.0, 2, 3], [0, 0, -4]], dtype=torch.float64))
    assert TAYLOR_SLOTS["abs"] == "q"


def test_artifact_kinds_are_not_mixed_up(tmp_path):
    art = _hand_artifact()
    back = HeadScores.load(art.save(tmp_path / "t.safetensors"))
    assert torch.equal(signed_estimate(back, "pc"), signed_estimate(art, "pc"))
    with pytest.raises(ValueError, match="sparsity-taylor"):
        SCORERS.get("hess")(ScoreContext(head_scores=art))
    hess_traces = HeadScores(traces=torch.ones(2, 3, 1, 2, 3), scene_ids=["a"])
    with pytest.raises(ValueError, match="not a sparsity-taylor artifact"):
        taylor_readout(hess_traces)
    with pytest.raises(ValueError, match="variant"):
        taylor_readout(art, "positive")


def test_cache_key_holds_the_budget(tmp_path, monkeypatch):
    import hess.taylor as taylor

    model, scene = tiny(torch.float64)
    calls = []
    real = taylor.calibrate_taylor
    monkeypatch.setattr(taylor, "calibrate_taylor", lambda *a, **k: calls.append(k["keep_ratio"]) or real(*a, **k))
    a = cached_taylor(tmp_path, model, [scene], QUIET, keep_ratio=0.5, **BLOCKS)
    b = cached_taylor(tmp_path, model, [scene], QUIET, keep_ratio=0.5, **BLOCKS)
    c = cached_taylor(tmp_path, model, [scene], QUIET, keep_ratio=0.25, **BLOCKS)
    assert calls == [0.5, 0.25] and len(list(tmp_path.glob("head_scores-*.safetensors"))) == 2
    assert torch.equal(a.traces, b.traces) and not torch.equal(a.traces, c.traces)
    assert b.meta["cache_key"]["budget"] == {"keep_ratio": 0.5, "min_blocks": 1, "q_block": 4, "k_block": 2}


def test_registered_scorers_feed_the_allocator(tmp_path):
    from hess.budget import allocate

    model, scene = tiny(torch.float64)
    ctx = ScoreContext(model=model, scenes=[scene], calib=QUIET, keep_ratio=0.5, lam=0.5, cache_dir=tmp_path, **BLOCKS)
    abs_scores = SCORERS.get("sparsity-taylor")(ctx)
    sq_scores = SCORERS.get("sparsity-taylor-sq")(ctx)
    direct = calibrate_taylor(model, [scene], QUIET, keep_ratio=0.5, **BLOCKS)
    assert torch.allclose(abs_scores, taylor_readout(direct, "abs", lam=0.5))
    assert torch.allclose(sq_scores, taylor_readout(direct, "squared", lam=0.5))
    assert torch.allclose(abs_scores.sum(1), torch.ones(2, dtype=torch.float64))
    blocks = allocate(abs_scores, 0.5, 6)
    assert blocks.sum(1).tolist() == [12, 12]
    with pytest.raises(ValueError, match="needs ScoreContext fields"):
        SCORERS.get("sparsity-taylor")(ScoreContext(shape=(2, 4)))
