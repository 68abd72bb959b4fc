"""hess.config: typed dataclass tree, dotted overrides (parsing and errors), hashing, experiment files."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from hess.cli import add_config_arguments, config_from_args
from hess.config import (
    BudgetSection, ConfigError, RunConfig, apply_overrides, config_hash, field_types, flatten, from_dict, to_dict,
)
from hess.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_flatten_cover_every_field():
    cfg = RunConfig()
    flat = flatten(cfg)
    assert list(flat) == list(field_types())
    assert flat["budget.keep_ratio"] == 0.27 and flat["score.lam"] == 0.5 and flat["calib.inlier_eps"] == 0.05
    assert flat["model.name"] == "hess-tiny" and flat["data.dataset"] == "synthetic"
    assert flat["sparse.cdf_threshold"] is None and flat["budget.capping"] == "iterative"
    assert {k.split(".")[0] for k in flat} == {"data", "model", "calib", "score", "budget", "sparse", "eval", "log"}
    assert flat["eval.metrics"] == ["pose", "points", "depth", "point_err"]  # tuples flatten to lists


def test_round_trip_through_dict_and_flat_mapping():
    cfg = apply_overrides(RunConfig(), ["budget.keep_ratio=0.1", "log.tags=['a', 'b']", "sparse.cdf_threshold=0.9"])
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(flatten(cfg)) == cfg  # dotted keys are accepted too
    assert cfg.log.tags == ("a", "b")  # lists are stored as tuples (hashable, frozen)


def test_override_parsing_by_field_type():
    cfg = apply_overrides(RunConfig(), [
        "budget.keep_ratio=0.5", "score.lam=1",  # int -> float
        "budget.min_blocks=3", "sparse.cdf_threshold=None", "budget.capping=clip",
        "model.name=vggt", "log.run_name=2024", "model.checkpoint='facebook/VGGT-1B'",
        "calib.use_icp=false", "score.normalize=True", "eval.metrics=['auc30']",
    ])
    assert cfg.budget.keep_ratio == 0.5 and cfg.score.lam == 1.0 and isinstance(cfg.score.lam, float)
    assert cfg.budget.min_blocks == 3 and cfg.sparse.cdf_threshold is None and cfg.budget.capping == "clip"
    assert cfg.model.name == "vggt" and cfg.log.run_name == "2024" and cfg.model.checkpoint == "facebook/VGGT-1B"
    assert cfg.calib.use_icp is False and cfg.score.normalize is True and cfg.eval.metrics == ("auc30",)


def test_overrides_do_not_mutate_and_mapping_form_is_typed():
    base = RunConfig()
    new = apply_overrides(base, {"budget.keep_ratio": 0.1, "sparse.cdf_threshold": 0.95})
    assert base.budget.keep_ratio == 0.27 and new.budget.keep_ratio == 0.1 and new.sparse.cdf_threshold == 0.95
    with pytest.raises(ConfigError, match=r"budget.keep_ratio: expected float, got str '0.1'"):
        apply_overrides(base, {"budget.keep_ratio": "0.1"})  # mapping values are not parsed
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.budget.keep_ratio = 0.3  # type: ignore[misc]


def test_unknown_keys_are_named_with_close_matches():
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), ["budget.keep_ration=0.2", "keep_ratio=0.2", "bugdet.min_blocks=2", "zzz.qqq=1"])
    msg = str(err.value)
    assert "unknown config key 'budget.keep_ration'; did you mean budget.keep_ratio" in msg
    assert "unknown config key 'keep_ratio'; did you mean budget.keep_ratio" in msg
    assert "'bugdet.min_blocks'; did you mean budget.min_blocks" in msg
    assert "unknown config key 'zzz.qqq'" in msg


@pytest.mark.parametrize("override, expected", [
    ("score.lam='x'", "score.lam: expected float, got str 'x'"),
    ("score.lam=True", "score.lam: expected float, got bool True"),
    ("budget.min_blocks=1.5", "budget.min_blocks: expected int, got float 1.5"),
    ("budget.capping=water", "budget.capping: expected one of 'iterative', 'clip', got str 'water'"),
    ("sparse.cdf_threshold=high", "sparse.cdf_threshold: expected float or None, got str 'high'"),
    ("log.tags=a", "log.tags: expected list of str, got str 'a'"),
    ("eval.metrics=[1]", "eval.metrics[0]: expected str, got int 1"),
    ("budget.keep_ratio=0", "budget.keep_ratio: must be in (0, 1], got 0.0"),
    ("score.lam=1.5", "score.lam: must be in [0, 1], got 1.5"),
    ("budget.min_blocks=0", "budget.min_blocks: must be >= 1, got 0"),
    ("sparse.cdf_threshold=0", "sparse.cdf_threshold: must be None or in (0, 1], got 0.0"),
])
def test_type_and_range_errors_name_expected_and_got(override, expected):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [override])
    assert expected in str(err.value)


def test_all_errors_are_reported_together_and_malformed_override():
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), ["score.lam=x", "budget.min_blocks=0.5", "nope.key=1"])
    assert str(err.value).count("\n  - ") == 3
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(RunConfig(), ["budget.keep_ratio"])
    with pytest.raises(ConfigError, match="list of KEY=VALUE"):
        apply_overrides(RunConfig(), "budget.keep_ratio=0.2")  # type: ignore[arg-type]


def test_sections_validate_on_direct_construction():
    with pytest.raises(ConfigError, match="budget.keep_ratio: expected float, got str"):
        BudgetSection(keep_ratio="0.3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="RunConfig.budget must be a BudgetSection"):
        RunConfig(budget={"keep_ratio": 0.3})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown config key 'budget.nope'"):
        from_dict({"budget": {"nope": 1}})


def test_config_hash_is_stable_and_ignores_logging():
    a = apply_overrides(RunConfig(), ["budget.keep_ratio=0.3"])
    b = apply_overrides(RunConfig(), {"budget.keep_ratio": 0.3})
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 12
    assert config_hash(a) != config_hash(RunConfig())
    assert config_hash(apply_overrides(a, ["log.run_name=x", "log.out_dir=/tmp/elsewhere"])) == config_hash(a)
    assert config_hash(apply_overrides(a, ["log.run_name=x"]), exclude=()) != config_hash(a, exclude=())


EXPERIMENT = """
question: Does it work?
command: hess reproduce rq9 --preset demo
output: ablations/results/{preset}/rq9.md
description: a test experiment
overrides:
  score.lam: 0.25
  budget: {min_blocks: 2}
variants:
  dense: {sparse.method: dense}
  hess: {score.scorer: hess}
grid:
  budget.keep_ratio: [0.5, 0.25]
  sparse.cdf_threshold: [null, 0.9]
runner: {anything: [1, 2]}
presets:
  demo:
    overrides: [data.num_scenes=2]
  paper:
    overrides: {model.name: vggt}
    grid: {budget.keep_ratio: [0.75]}
"""


def test_load_experiment_resolves_presets_variants_and_grid(tmp_path):
    path = tmp_path / "rq9.yaml"
    path.write_text(EXPERIMENT)
    exp = load_experiment(path, preset="demo")
    assert (exp.name, exp.question, exp.preset, exp.presets) == ("rq9", "Does it work?", "demo", ("demo", "paper"))
    assert exp.config.score.lam == 0.25 and exp.config.budget.min_blocks == 2 and exp.config.data.num_scenes == 2
    runs = list(exp.configs())
    assert len(runs) == 2 * 2 * 2
    variant, point, cfg = runs[1]
    assert variant == "dense" and point == {"budget.keep_ratio": 0.5, "sparse.cdf_threshold": 0.9}
    assert cfg.sparse.method == "dense" and cfg.sparse.cdf_threshold == 0.9 and cfg.data.num_scenes == 2
    assert exp.runner == {"anything": [1, 2]} and exp.output == "ablations/results/demo/rq9.md"
    paper = load_experiment(path, preset="paper")
    assert paper.config.model.name == "vggt" and paper.config.data.num_scenes == 4
    assert paper.grid["budget.keep_ratio"] == [0.75] and paper.grid["sparse.cdf_threshold"] == [None, 0.9]
    assert load_experiment(path).config.model.name == "hess-tiny"  # no preset: the file alone


@pytest.mark.parametrize("edit, message", [
    (("question: Does it work?", ""), "missing header field(s) question"),
    (("runner:", "runnr:"), "unknown key 'runnr'; did you mean runner?"),
    (("model.name: vggt", "model.nam: vggt"), "presets.paper.overrides: invalid config overrides"),
    (("budget.keep_ratio: [0.75]", "budget.keep_ratio: [1.75]"), "presets.paper.grid.budget.keep_ratio: invalid config overrides"),
    (("hess: {score.scorer: hess}", "hess: {score.scorr: hess}"), "variants.hess"),
    (("    grid:", "    gird:"), "presets.paper: unknown key 'gird'; did you mean grid?"),
])
def test_experiment_errors_are_caught_in_every_preset(tmp_path, edit, message):
    path = tmp_path / "bad.yaml"
    path.write_text(EXPERIMENT.replace(*edit))
    with pytest.raises(ConfigError) as err:
        load_experiment(path, preset="demo")  # a typo in the paper preset fails the demo too
    assert message in str(err.value)


def test_experiment_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_experiment(tmp_path / "nope.yaml")
    path = tmp_path / "rq9.yaml"
    path.write_text(EXPERIMENT)
    with pytest.raises(ConfigError, match="unknown preset 'big'; known: demo, paper"):
        load_experiment(path, preset="big")


def test_repository_experiment_files_load_with_every_preset():
    files = sorted((REPO / "ablations" / "configs").glob("*.yaml"))
    assert {f.stem.split("_")[0] for f in files} >= {"rq1", "rq2", "rq3", "rq4", "rq5", "latency"}
    for path in files:
        header = path.read_text().splitlines()[:3]
        assert [line.split(":")[0] for line in header] == ["# Question", "# Command", "# Output"], path
        for preset in (None, *load_experiment(path).presets):
            exp = load_experiment(path, preset)
            assert exp.question and exp.command.startswith("hess ") and exp.output
            assert len(list(exp.configs())) >= 1
        assert set(load_experiment(path).presets) == {"demo", "paper"}, path



def test_defaults_fit_the_embedded_model_and_paper_presets_pin_the_vggt_protocol():
    """RunConfig() evaluates hess-tiny at the views it was trained on (84×84, 4 frames; at 168×224 × 8 frames it
    measured dense AUC@30 0.11 against 0.72), with key blocks of one patch row; every ``paper`` preset states
    the VGGT-1B sizes itself (392×518, 128 / 64 blocks) instead of inheriting them."""
    from hess.data.synthetic import EMBEDDED_SCENE_OPTIONS

    cfg = RunConfig()
    assert (cfg.data.height, cfg.data.width) == (EMBEDDED_SCENE_OPTIONS["height"], EMBEDDED_SCENE_OPTIONS["width"])
    assert cfg.data.num_frames == cfg.calib.num_frames == EMBEDDED_SCENE_OPTIONS["num_frames"]
    assert (cfg.sparse.q_block, cfg.sparse.k_block) == (12, 6)
    for path in sorted((REPO / "ablations" / "configs").glob("*.yaml")):
        for _, _, paper in load_experiment(path, "paper").configs():
            # VGGT's crop: width 518, height by aspect ratio, centre-cropped to 518 (CO3D); DTU frames are 518x392
            height = {"co3d": 518, "dtu": 392}[paper.data.dataset]
            assert (paper.data.height, paper.data.width, paper.sparse.q_block, paper.sparse.k_block) == (height, 518, 128, 64)
            assert paper.data.num_frames >= 8 and paper.calib.num_frames >= 8, path
            assert paper.calib.dataset == "co3d" and paper.calib.checkpointing, path  # the paper calibrates on CO3Dv2

def test_config_from_args(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    path = tmp_path / "rq9.yaml"
    path.write_text(EXPERIMENT)
    args = parser.parse_args(["--config", str(path), "--preset", "paper", "score.lam=1", "--no-wandb", "--out", "o"])
    cfg = config_from_args(args)
    assert cfg.model.name == "vggt" and cfg.score.lam == 1.0 and cfg.budget.min_blocks == 2
    assert cfg.log.wandb_mode == "disabled" and cfg.log.out_dir == "o"
    assert config_from_args(parser.parse_args([])) == RunConfig()
    with pytest.raises(ConfigError, match="--preset needs --config"):
        config_from_args(parser.parse_args(["--preset", "demo"]))
