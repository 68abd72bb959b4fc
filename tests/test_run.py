"""The evaluation pipeline of ablations/run.py and hess.rq: records, realised density, caching, errors.

Runs on the ``micro`` sizing (one 42×42 scene of 2 frames, key blocks of 2 patches: n_k = 9) with the
default model (the embedded hess-tiny, or its architecture with seeded random weights until it ships).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from hess.config import RunConfig, apply_overrides, config_hash
from hess.results import DENSITY_KEY, LATENCY_KEY, load_results
from hess.rq import ModelUnavailableError, Pipeline, run_config, run_tracked
from hess.rq.pipeline import GLOBAL_ATTN_KEY, canonical
from hess.rq.runners import SIZING

REPO = Path(__file__).resolve().parents[1]
N_K = 9  # 2 frames x 3x3 patches / k_block 2


def micro(tmp: Path, **overrides) -> RunConfig:
    cfg = apply_overrides(RunConfig(), SIZING["micro"][1])
    return apply_overrides(cfg, {"log.out_dir": str(tmp), "log.wandb_mode": "disabled", **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest (and not slowed by a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Pipeline:
    warnings.filterwarnings("ignore", message="embedded checkpoint")
    return Pipeline(tmp_path_factory.mktemp("cache"), progress=False)


@pytest.mark.parametrize("keep", [0.27, 0.5])
def test_uniform_run_realises_the_target_block_budget(pipe, tmp_path, keep):
    result = pipe.evaluate(micro(tmp_path, **{"score.scorer": "uniform", "budget.keep_ratio": keep}))
    c = max(1, math.floor(N_K * keep))  # SparseVGGT's c_base; 18 patches split into whole key blocks
    assert result.num_key_blocks == N_K
    assert torch.equal(result.blocks, torch.full_like(result.blocks, c))
    assert result.metrics[DENSITY_KEY] == pytest.approx(c / N_K, abs=1e-6)
    assert result.metrics["budget/wasted_fraction"] == 0.0
    for key in ("synthetic/auc30", "synthetic/chamfer", LATENCY_KEY, GLOBAL_ATTN_KEY):
        assert key in result.metrics
    assert result.metrics[LATENCY_KEY] > result.metrics[GLOBAL_ATTN_KEY] > 0


def test_dense_run_has_density_one_and_no_keep_ratio(pipe, tmp_path):
    cfg = micro(tmp_path, **{"sparse.method": "dense"})
    result = pipe.evaluate(cfg)
    assert result.blocks is None and result.metrics[DENSITY_KEY] == 1.0
    assert all(r.keep_ratio is None for r in result.records("r", cfg))
    # every attention core is dense again afterwards
    from hess.models.layers import DenseCore

    model, _ = pipe.resources.model(cfg.model)
    assert all(isinstance(a.core, DenseCore) for a in model.global_attention_layers())


def test_per_scene_metrics_match_hess_evaluate(pipe, tmp_path):
    """Pose AUC (one synthetic category: per-category mean = pooled) and depth AbsRel equal ``evaluate_model``;
    Acc / Comp / Chamfer are ``hess.metrics.point_cloud_metrics`` (evaluation.md §2.5: Umeyama + ICP) per scene,
    averaged over scenes."""
    import math

    from hess.data import normalize_scene
    from hess.evaluate import evaluate_model
    from hess.metrics import point_cloud_metrics

    cfg = micro(tmp_path, **{"sparse.method": "dense", "data.num_scenes": 2})
    result = pipe.evaluate(cfg)
    model, _ = pipe.resources.model(cfg.model)
    scenes = pipe.resources.eval_scenes(cfg.data)
    reference = evaluate_model(model, scenes)
    for key in ("auc30", "rra30", "abs_rel", "point_err"):
        assert result.metrics[f"synthetic/{key}"] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
    with torch.no_grad():
        ref = [point_cloud_metrics(model.geometry(model(normalize_scene(s).images[None]))["world_points"][0],
                                   normalize_scene(s).world_points, normalize_scene(s).valid, normals=False)
               for s in scenes]
    for key in ("acc", "comp", "chamfer"):
        assert result.metrics[f"synthetic/{key}"] == pytest.approx(math.fsum(r[key] for r in ref) / len(ref), rel=1e-9), key
    assert math.isnan(result.metrics.get("synthetic/nc", math.nan))  # nc not selected by the default eval.metrics


def test_run_tracked_writes_records_with_config_and_allocation(pipe, tmp_path):
    cfg = micro(tmp_path, **{"score.scorer": "random", "budget.keep_ratio": 0.4})
    run_dir, result = run_tracked(pipe, cfg, experiment="t", extra={"rq.method": "random"})
    df = load_results(run_dir)
    assert set(df["scene_id"]) == {"all", *[s.scene_id for s in pipe.resources.eval_scenes(cfg.data)]}
    assert (df["keep_ratio"] == 0.4).all() and (df["rq.method"] == "random").all()
    assert (df["score.scorer"] == "random").all()
    density = df[(df.metric == DENSITY_KEY) & (df.scene_id == "all")]["value"].item()
    assert density == pytest.approx(result.metrics[DENSITY_KEY])
    allocation = json.loads((run_dir / "metrics.json").read_text())
    assert allocation[DENSITY_KEY] == pytest.approx(density)
    blocks = __import__("pandas").read_csv(run_dir / "tables" / "allocation.csv")
    heads = [c for c in blocks.columns if c.startswith("H")]
    # random scores redistribute, but each layer keeps H * c_base blocks (c_base = floor(9 * 0.4) = 3)
    assert (blocks[heads].sum(axis=1) == 3 * len(heads)).all()
    assert json.loads((run_dir / "meta.json").read_text())["model_weights"] in ("embedded", "random-init")


def test_timings_side_by_side_are_used_as_given(pipe, tmp_path):
    dense, uniform = micro(tmp_path, **{"sparse.method": "dense"}), micro(tmp_path, **{"score.scorer": "uniform"})
    timings = pipe.interleaved_timings([dense, uniform], warmup=0, repeats=2)
    scene = pipe.resources.eval_scenes(dense.data)[0].scene_id
    assert [set(t) for t in timings] == [{scene}, {scene}]
    assert all(t[scene]["latency_ms"] > t[scene]["global_attn_ms"] > 0 for t in timings)
    given = {scene: {"latency_ms": 123.0, "global_attn_ms": 4.0}}
    result = pipe.evaluate(uniform, given)
    assert result.metrics[LATENCY_KEY] == 123.0 and result.metrics[GLOBAL_ATTN_KEY] == 4.0


def test_calibration_is_cached_by_config_hash(tmp_path):
    cfg = micro(tmp_path, **{"score.scorer": "hess"})
    first = Pipeline(tmp_path / "cache", progress=False)
    first.evaluate(cfg)
    first.evaluate(apply_overrides(cfg, {"score.lam": 1.0, "budget.keep_ratio": 0.5, "calib.proj": "k"}))
    assert first.resources.calibrations_computed == 1  # λ / keep ratio / projection never recalibrate
    second = Pipeline(tmp_path / "cache", progress=False)  # a new process: read from disk
    second.evaluate(apply_overrides(cfg, {"score.lam": 0.0}))
    assert second.resources.calibrations_computed == 0
    third = Pipeline(tmp_path / "cache", progress=False)
    third.evaluate(apply_overrides(cfg, {"calib.inlier_eps": 0.1}))  # a calibration setting: recalibrates
    assert third.resources.calibrations_computed == 1


def test_run_config_is_the_sweep_pipeline(tmp_path):
    cache: dict = {}
    metrics = run_config(micro(tmp_path, **{"score.scorer": "uniform"}), cache)
    assert metrics[DENSITY_KEY] == pytest.approx(2 / N_K, abs=1e-6)
    assert isinstance(cache["pipeline"], Pipeline)


def test_dense_runs_share_one_config_hash():
    a = apply_overrides(RunConfig(), {"sparse.method": "dense", "budget.keep_ratio": 0.2, "score.lam": 0.0})
    b = apply_overrides(RunConfig(), {"sparse.method": "dense", "budget.keep_ratio": 0.5})
    assert config_hash(canonical(a)) == config_hash(canonical(b))
    c = apply_overrides(RunConfig(), {"budget.keep_ratio": 0.2})
    assert canonical(c) is c  # HeSS uses every section
    u = [apply_overrides(RunConfig(), {"score.scorer": "uniform", "score.lam": lam}) for lam in (0.0, 1.0)]
    assert config_hash(canonical(u[0])) == config_hash(canonical(u[1]))
    r = [apply_overrides(RunConfig(), {"score.scorer": "random", "score.seed": seed}) for seed in (0, 1)]
    assert config_hash(canonical(r[0])) != config_hash(canonical(r[1]))


def test_errors_are_clear(pipe, tmp_path):
    with pytest.raises(KeyError, match="known"):
        pipe.evaluate(micro(tmp_path, **{"score.scorer": "no-such-scorer"}))
    with pytest.raises(ValueError, match="min_blocks=10 exceeds the 9 key blocks"):
        pipe.evaluate(micro(tmp_path, **{"budget.min_blocks": 10}))
    with pytest.raises(ModelUnavailableError, match="no trained weights"):
        pipe.evaluate(micro(tmp_path, **{"model.name": "pi3"}))
    with pytest.raises(ModelUnavailableError, match="not available"):
        pipe.evaluate(micro(tmp_path, **{"model.checkpoint": str(tmp_path / "missing.safetensors")}))


def test_cli_dry_run_and_bad_override(tmp_path, capsys):
    from hess.runtime import load_object

    main = load_object(f"{REPO / 'ablations' / 'run.py'}:main")
    assert main(["--preset", "demo", "score.lam=0.25", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lam: 0.25" in out and "k_block=6" in out and "calibration on 4 calib scenes" in out
    assert not (tmp_path / "o").exists()
    assert main(["budget.keep_ratio=2", "--dry-run"]) == 2
    assert "budget.keep_ratio: must be in (0, 1]" in capsys.readouterr().err


def test_hess_calibrate_cli_writes_a_loadable_artifact(tmp_path, capsys):
    """``hess calibrate`` on the micro sizing writes an artifact whose HeSS table sums to 1 per layer."""
    from hess.cli import main
    from hess.scoring import HeadScores

    out = tmp_path / "scores.safetensors"
    code = main(["calibrate", "--preset", "micro", "--out", str(tmp_path / "runs"), "--no-wandb", "--output", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["artifact"] == str(out) and len(printed["hess"]) == printed["traces_shape"][-2]
    scores = HeadScores.load(out)
    table = scores.hess(lam=0.5)
    assert table.shape == scores.traces.shape[-2:]
    assert torch.allclose(table.sum(-1), torch.ones(table.shape[0], dtype=table.dtype))
    # a second call reuses the cached traces (same artifact content, no recomputation needed)
    out2 = tmp_path / "again.safetensors"
    assert main(["calibrate", "--preset", "micro", "--out", str(tmp_path / "runs"), "--no-wandb",
                 "--output", str(out2)]) == 0
    assert torch.equal(HeadScores.load(out2).traces, scores.traces)
