"""hess.scoring / hess.scorers: HeSS read-out, artifacts and cache, and every registered scorer."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from hess.calibrate import (CalibConfig, calibration_error_fn, calibration_errors, error_targets, predict_geometry,
                            prepare_scene, score_heads)
from hess.scorers import EntropyCore, GatedCore, oracle_sensitivity, wrapped_cores
from hess.scoring import SCORERS, HeadScores, ScoreContext, cached_calibration, config_hash, invert_ranking
from test_calibrate import make_scene, tiny

QUIET = CalibConfig(progress=False)


def hand_scores() -> HeadScores:
    """2 scenes, 2 layers, 3 heads; cam and pc traces chosen so the read-outs are hand-computable."""
    t = torch.zeros(2, 3, 2, 2, 3, dtype=torch.float64)
    t[0, 0, 0] = torch.tensor([[1.0, 2, 1], [0, 0, 4]])  # cam, q, scene 0
    t[0, 0, 1] = torch.tensor([[3.0, 2, 3], [0, 0, 4]])  # cam, q, scene 1 → mean [[2,2,2],[0,0,4]]
    t[1, 0, :] = torch.tensor([[10.0, 30, 60], [1, 1, 2]])  # pc, q, both scenes
    t[0, 1, :] = torch.tensor([[5.0, 0, 0], [0, 5, 0]])  # cam, k
    return HeadScores(traces=t, scene_ids=["a", "b"], config={"seed": 0, "inlier_eps": 0.05},
                      model_id="m", model_hash="abc")


# --------------------------------------------------------------------------- HeadScores
def test_hess_normalises_per_layer_then_mixes():
    s = hand_scores()
    cam = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0, 0, 1]], dtype=torch.float64)
    pc = torch.tensor([[0.1, 0.3, 0.6], [0.25, 0.25, 0.5]], dtype=torch.float64)
    assert torch.allclose(s.hess(lam=1.0), cam)
    assert torch.allclose(s.hess(lam=0.0), pc)
    assert torch.allclose(s.hess(lam=0.5), 0.5 * cam + 0.5 * pc)
    assert torch.allclose(s.hess(0.3).sum(dim=1), torch.ones(2, dtype=torch.float64))
    # "Linear" ablation: raw traces mixed, no normalisation
    assert torch.allclose(s.hess(0.5, normalize=False), 0.5 * torch.tensor([[2.0, 2, 2], [0, 0, 4]])
                          + 0.5 * torch.tensor([[10.0, 30, 60], [1, 1, 2]], dtype=torch.float64))
    # projection choice and scene subsets (bootstrap)
    assert torch.allclose(s.hess(1.0, proj="k"), torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=torch.float64))
    assert torch.allclose(s.trace("cam", scenes=[0, 0]), torch.tensor([[1.0, 2, 1], [0, 0, 4]], dtype=torch.float64))
    # an all-zero layer normalises to zeros, not NaN
    assert torch.equal(s.normalized("cam", "v"), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: s.hess(lam=1.5), "lam"),
        (lambda s: s.hess(proj="o"), "proj"),
        (lambda s: s.trace("depth"), "error"),
        (lambda s: HeadScores(torch.zeros(2, 3, 2, 2), ["a", "b"]), r"\[2 \(cam, pc\)"),
        (lambda s: HeadScores(torch.zeros(2, 3, 2, 2, 3), ["a"]), "2 scenes but 1 scene ids"),
        (lambda s: HeadScores(-torch.ones(2, 3, 1, 2, 3), ["a"]), "non-negative"),
        (lambda s: HeadScores(torch.full((2, 3, 1, 2, 3), math.nan), ["a"]), "finite"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(hand_scores())


def test_artifact_round_trip(tmp_path):
    s = hand_scores()
    s.meta["note"] = [1, 2]
    path = s.save(tmp_path / "x" / "scores.safetensors")
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["scene_ids"] == ["a", "b"] and side["config_hash"] == config_hash(s.config)
    assert side["hess_version"] and side["model_hash"] == "abc"
    back = HeadScores.load(path)
    assert torch.equal(back.traces, s.traces) and back.traces.dtype == torch.float64
    assert (back.scene_ids, back.config, back.model_id, back.model_hash, back.meta, back.version) == \
           (s.scene_ids, s.config, s.model_id, s.model_hash, s.meta, s.version)
    assert torch.equal(back.hess(0.5), s.hess(0.5))


def test_artifact_errors(tmp_path):
    s = hand_scores()
    with pytest.raises(ValueError, match=".safetensors"):
        s.save(tmp_path / "scores.pt")
    with pytest.raises(FileNotFoundError, match="score artifact"):
        HeadScores.load(tmp_path / "missing.safetensors")
    path = s.save(tmp_path / "a.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="sidecar"):
        HeadScores.load(path)
    # a sidecar from another calibration does not pair with these traces
    other = HeadScores(s.traces, s.scene_ids, config={"seed": 1})
    other.save(tmp_path / "b.safetensors")
    (tmp_path / "b.json").rename(tmp_path / "a.json")
    with pytest.raises(ValueError, match="not a pair"):
        HeadScores.load(path)


def test_cached_calibration_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return hand_scores()

    key = {"calib": {"seed": 0}, "scenes": ["a", "b"], "model": "abc"}
    first = cached_calibration(tmp_path, key, compute)
    second = cached_calibration(tmp_path, key, compute)
    assert len(calls) == 1 and torch.equal(first.traces, second.traces)
    cached_calibration(tmp_path, {**key, "model": "def"}, compute)
    assert len(calls) == 2
    assert len(list(tmp_path.glob("head_scores-*.safetensors"))) == 2


# --------------------------------------------------------------------------- table scorers
def test_scorer_registry_names_and_errors():
    assert {"hess", "uniform", "random", "inverted-hess", "head-importance", "attention-entropy", "oracle"} \
        <= set(SCORERS)
    with pytest.raises(KeyError, match="known: attention-entropy"):
        SCORERS.get("michel")
    with pytest.raises(ValueError, match=r"needs ScoreContext fields \['head_scores'\]"):
        SCORERS.get("hess")(ScoreContext(shape=(2, 3)))
    with pytest.raises(ValueError, match=r"\['model', 'scenes', 'error_fn'\]"):
        SCORERS.get("oracle")(ScoreContext(shape=(2, 3)))


def test_table_scorers():
    s = hand_scores()
    ctx = ScoreContext(head_scores=s, lam=0.25, proj="q")
    assert torch.equal(SCORERS.get("hess")(ctx), s.hess(0.25))
    assert torch.equal(SCORERS.get("uniform")(ctx), torch.ones(2, 3, dtype=torch.float64))
    r0 = SCORERS.get("random")(ScoreContext(shape=(4, 5), seed=0))
    assert r0.shape == (4, 5) and torch.equal(r0, SCORERS.get("random")(ScoreContext(shape=(4, 5), seed=0)))
    assert not torch.equal(r0, SCORERS.get("random")(ScoreContext(shape=(4, 5), seed=1)))
    inv = SCORERS.get("inverted-hess")(ctx)
    assert torch.allclose(inv, invert_ranking(s.hess(0.25)))


def test_invert_ranking_known_answer():
    x = torch.tensor([[0.1, 0.5, 0.2, 0.2], [3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    # ascending order, row 0: h0 (0.1), h2, h3 (0.2, stable), h1 (0.5) take 0.5, 0.2, 0.2, 0.1
    # row 1: h3 (0), h1 (1), h2 (2), h0 (3) take 3, 2, 1, 0
    assert invert_ranking(x).tolist() == [[0.5, 0.1, 0.2, 0.2], [0.0, 2.0, 1.0, 3.0]]
    assert torch.equal(invert_ranking(invert_ranking(x)), x)


# --------------------------------------------------------------------------- model scorers
def test_wrapped_cores_restore_even_on_error():
    model, _ = tiny()
    layers = model.global_attention_layers()
    before = [a.core for a in layers]
    with pytest.raises(RuntimeError, match="boom"):
        with wrapped_cores(layers, lambda l, c: GatedCore(c, 4, torch.device("cpu"))):
            assert all(isinstance(a.core, GatedCore) for a in layers)
            raise RuntimeError("boom")
    assert [a.core for a in layers] == before
    assert set(model.state_dict()) == set(tiny()[0].state_dict())


def test_head_importance_matches_finite_differences_and_zero_for_unused_head():
    """∂e/∂ξ_h equals the derivative w.r.t. scaling head h's output-projection columns (float64)."""
    model, scene = tiny(torch.float64)
    D = model.blocks[0].attn.head_dim
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, 3 * D:] = 0  # layer 1, head 3 unused
    error_fn = calibration_error_fn(QUIET, lam=0.5)
    imp = SCORERS.get("head-importance")(ScoreContext(model=model, scenes=[scene], error_fn=error_fn))
    assert imp.shape == (2, 4) and imp[1, 3] == 0 and (imp[0] > 0).all()
    # finite differences with the alignment and NN targets held fixed, as sg(H) does for the gradient
    prepared = prepare_scene(scene, QUIET, torch.device("cpu"))
    with torch.no_grad():
        targets = error_targets(predict_geometry(model, prepared, QUIET), prepared, QUIET)

    def fixed_error():
        e = calibration_errors(predict_geometry(model, prepared, QUIET), targets)
        return 0.5 * e["cam"] + 0.5 * e["pc"]

    assert fixed_error().item() == pytest.approx(error_fn(model, scene).item(), rel=1e-12)
    proj = model.blocks[0].attn.proj.weight
    for h in range(4):
        vals = []
        for xi in (1 + 1e-6, 1 - 1e-6):
            with torch.no_grad():
                saved = proj[:, h * D:(h + 1) * D].clone()
                proj[:, h * D:(h + 1) * D] *= xi
                vals.append(fixed_error().item())
                proj[:, h * D:(h + 1) * D] = saved
        assert imp[0, h].item() == pytest.approx(abs(vals[0] - vals[1]) / 2e-6, rel=1e-4)
    assert all(p.requires_grad for p in model.parameters())


def test_attention_entropy_known_answers():
    model, scene = tiny()
    attn = model.blocks[0].attn
    with torch.no_grad():  # zero queries → uniform attention over all N keys → entropy log N
        attn.qkv.weight[: attn.qkv.weight.shape[1]] = 0
        attn.qkv.bias[: attn.qkv.weight.shape[1]] = 0
    ent = SCORERS.get("attention-entropy")(ScoreContext(model=model, scenes=[scene]))
    N = scene.num_frames * (1 + (8 // 4) ** 2)  # 1 special + 4 patches per frame
    assert torch.allclose(ent[0], torch.full((4,), math.log(N), dtype=torch.float64), atol=1e-5)
    assert (ent[1] > 0).all() and (ent[1] <= math.log(N) + 1e-6).all()
    # the wrapper does not change the output
    core = EntropyCore(model.blocks[1].attn.core, 4)
    q, k, v = torch.randn(3, 1, 4, 10, 4).unbind(0)
    assert torch.equal(core(q, k, v), model.blocks[1].attn.core(q, k, v))


def _oracle_setup():
    pytest.importorskip("hess.attention")
    # 32×32 images, 4×4 patches: 64 patches per frame × 4 frames = 256 patch keys → n_k = 4 blocks of 64
    scene = make_scene(0, frames=4, size=32)
    torch.manual_seed(0)
    from test_calibrate import TinyGeoModel

    return TinyGeoModel(scene, dim=16, heads=2, depth=2), scene


def test_oracle_known_answers():
    """keep_ratio 1 keeps every block (Δ = 0); an unused head has Δ = 0; a low keep ratio changes the error."""
    model, scene = _oracle_setup()
    error_fn = calibration_error_fn(CalibConfig(use_icp=False, progress=False), lam=0.5)
    D = model.blocks[0].attn.head_dim
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, D:] = 0  # layer 1, head 1 unused
    full = oracle_sensitivity(model, [scene], error_fn, keep_ratio=1.0)
    assert full.abs().max() < 1e-6
    low = oracle_sensitivity(model, [scene], error_fn, keep_ratio=0.25)
    assert low[1, 1].abs() < 1e-9
    assert (low[0].abs() > 1e-7).all()
    ctx = ScoreContext(model=model, scenes=[scene], error_fn=error_fn, keep_ratio=0.25)
    if (low < 0).any():
        with pytest.warns(UserWarning, match="lower the error"):
            clamped = SCORERS.get("oracle")(ctx)
    else:
        clamped = SCORERS.get("oracle")(ctx)
    assert torch.allclose(clamped, low.clamp_min(0))



def test_oracle_uses_the_given_block_sizes_like_a_sparsified_model():
    """With q_block 32 / k_block 16 (16 key blocks per sequence, 4 kept), Δ of one head equals the error of
    the model sparsified by ``hess.sparsify`` with that head alone at the keep ratio, minus the dense error;
    and it differs from Δ at the default 128 / 64 blocks (1 of 4 blocks kept)."""
    from hess.patch import SparsePlan, densify, sparsify

    model, scene = _oracle_setup()
    error_fn = calibration_error_fn(CalibConfig(use_icp=False, progress=False), lam=0.5)
    small = oracle_sensitivity(model, [scene], error_fn, keep_ratio=0.25, q_block=32, k_block=16)
    default = oracle_sensitivity(model, [scene], error_fn, keep_ratio=0.25)
    with torch.no_grad():
        dense = float(error_fn(model, scene))
        for l, h in [(0, 1), (1, 0)]:
            ratio = torch.ones(2, 2, dtype=torch.float64)
            ratio[l, h] = 0.25
            sparsify(model, SparsePlan(keep_ratio=ratio, q_block=32, k_block=16))
            try:
                expected = float(error_fn(model, scene)) - dense
            finally:
                densify(model)
            assert small[l, h].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert (small - default).abs().max() > 1e-6
    ctx = ScoreContext(model=model, scenes=[scene], error_fn=error_fn, keep_ratio=0.25, q_block=32, k_block=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # heads that lower the error are clamped (and warned)
        assert torch.allclose(SCORERS.get("oracle")(ctx), small.clamp_min(0))

def test_score_heads_runs_every_scorer_on_the_tiny_model():
    model, scene = tiny()
    from hess.calibrate import calibrate

    head_scores = calibrate(model, [scene], QUIET)
    for name in ("hess", "uniform", "random", "inverted-hess", "head-importance", "attention-entropy"):
        out = score_heads(name, model, [scene], QUIET, head_scores=head_scores)
        assert out.shape == (2, 4) and torch.isfinite(out).all() and (out >= 0).all(), name
