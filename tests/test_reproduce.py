"""hess reproduce: each RQ runner end to end on the micro preset, RQ5's behaviour without π³, clear errors.

The default tests use a two-variant experiment file (dense, uniform: no calibration) and RQ5's skip;
every real experiment file runs end to end under ``-m slow``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from hess.config import ConfigError
from hess.reproduce import reproduce
from hess.results import load_results
from hess.rq.runners import experiment

REPO = Path(__file__).resolve().parents[1]
SMALL_RQ2 = """\
question: Can HeSS guide sparsification at high sparsity and keep performance?
command: hess reproduce rq2 --preset demo
output: ablations/results/{preset}/rq2_sparsity.md
variants:
  dense: {sparse.method: dense}
  uniform: {score.scorer: uniform}
grid:
  budget.keep_ratio: [0.5, 0.27]
presets:
  demo: {overrides: {data.num_scenes: 2}}
"""
FAILING_RQ3 = """\
question: q
command: c
output: o
variants:
  uniform: {score.scorer: uniform, budget.min_blocks: 50}
presets:
  demo: {}
"""


@pytest.fixture(autouse=True)
def one_thread():
    warnings.filterwarnings("ignore", message="embedded checkpoint")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_grid_runner_end_to_end(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "rq2_sparsity.yaml").write_text(SMALL_RQ2)
    (configs / "rq3_baselines.yaml").write_text(FAILING_RQ3)
    result = reproduce(["rq3", "rq2"], "micro", out=tmp_path / "out", report_dir=tmp_path / "rep", wandb=False,
                       progress=False, configs=configs)
    assert "min_blocks=50 exceeds the 9 key blocks" in result["failed"]["rq3"]  # reported, and rq2 still ran
    df = load_results(result["session"])
    assert sorted(df.groupby("run_id")["rq.method"].first()) == ["dense", "uniform", "uniform"]  # dense ran once
    assert df["scene_id"].nunique() == 2 and "all" in set(df["scene_id"])  # the micro sizing's one scene + all
    table = pd.read_csv(tmp_path / "rep" / "rq2_sparsity.csv")
    assert table["method"].tolist() == ["dense", "uniform", "uniform"]
    assert table["realised density"].tolist() == pytest.approx([1.0, 4 / 9, 2 / 9], abs=1e-6)  # n_k = 9
    md = (tmp_path / "rep" / "rq2_sparsity.md").read_text()
    assert "**Question.** Can HeSS guide" in md and "![auc30](rq2_sparsity_auc30.png)" in md
    assert (tmp_path / "rep" / "rq2_sparsity_chamfer.png").stat().st_size > 0
    assert not (tmp_path / "out" / "cache" / "head_scores").exists()  # uniform and dense never calibrate


def test_rq5_says_plainly_when_no_trained_pi3(tmp_path):
    result = reproduce(["rq5"], "micro", out=tmp_path / "out", report_dir=tmp_path / "rep", wandb=False, progress=False)
    assert "no trained π³" in result["skipped"]["rq5"]
    md = (tmp_path / "rep" / "rq5_pi3.md").read_text()
    assert "**Not measured.**" in md and "model.checkpoint" in md
    assert "|" not in md  # no table, no numbers
    assert not (tmp_path / "rep" / "rq5_pi3.csv").exists()
    assert not list((tmp_path / "out").rglob("records.parquet"))


def test_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown research question"):
        reproduce(["rq9"], "micro", out=tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'budget.keep'"):
        reproduce(["rq2"], "micro", out=tmp_path / "o", overrides=["budget.keep=0.1"])
    assert not (tmp_path / "o").exists()  # validated before any work
    with pytest.raises(ValueError, match="unknown preset"):
        experiment("rq2", "huge")


def test_cli_reproduce_rq5(tmp_path, capsys):
    from hess.cli import main

    code = main(["reproduce", "rq5", "--preset", "micro", "--out", str(tmp_path / "o"), "--report-dir",
                 str(tmp_path / "r"), "--no-wandb", "--quiet"])
    assert code == 0
    assert "rq5: not measured: no trained π³" in capsys.readouterr().out
    assert main(["reproduce", "rq2", "budget.nope=1", "--preset", "micro", "--out", str(tmp_path / "o")]) == 2
    assert "unknown config key 'budget.nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("rq", ["rq1", "rq2", "rq3", "rq4", "latency"])
def test_every_runner_end_to_end_micro(tmp_path, rq):
    result = reproduce([rq], "micro", out=tmp_path / "out", report_dir=tmp_path / "rep", wandb=False, progress=False)
    name = experiment(rq, "micro").name
    md = (tmp_path / "rep" / f"{name}.md").read_text()
    assert md.count("|---") >= 1 and not result["skipped"]
    assert list((tmp_path / "rep").glob(f"{name}_*.png"))
    df = load_results(result["session"])
    if rq == "rq1":
        assert {"score/hess", "score/hess_cam", "score/hess_pc", "score/oracle"} <= set(df["metric"])
    else:
        runs = df.groupby("run_id")["rq.method"].first()
        variants = experiment(rq, "micro").variants or {"default": {}}
        assert set(runs) == set(variants)


@pytest.mark.slow
def test_rq5_runs_with_a_pi3_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from hess.models import PI3_PRESETS, build_pi3

    path = tmp_path / "pi3"  # a checkpoint directory: model.safetensors + config.json
    path.mkdir()
    save_file({k: v.contiguous() for k, v in build_pi3("pi3-parity-a").state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(PI3_PRESETS["pi3-parity-a"]))
    result = reproduce(["rq5"], "micro", out=tmp_path / "out", report_dir=tmp_path / "rep", wandb=False,
                       progress=False, overrides=[f"model.checkpoint={path}", "model.name=pi3-parity-a"])
    assert not result["skipped"]
    table = pd.read_csv(tmp_path / "rep" / "rq5_pi3.csv")
    assert set(table["method"]) == {"dense", "uniform", "hess"}
    assert sorted(table.loc[table.method == "hess", "lam"].unique()) == [0.0, 0.5, 1.0]


def test_demo_cameras_known_answer_and_run(tmp_path):
    from hess.demo import camera_rows, format_result, run_demo

    ext = torch.zeros(2, 3, 4)
    ext[:, :, :3] = torch.eye(3)
    ext[1, :, :3] = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 90° about y
    ext[1, :, 3] = torch.tensor([0.0, 0.0, 2.0])
    intr = torch.eye(3).expand(2, 3, 3).clone()
    rows = camera_rows(ext, intr, width=2)  # fx = 1, W = 2: FoV = 2·atan(1) = 90°
    assert rows[0]["centre"] == [0.0, 0.0, 0.0] and rows[0]["angle_to_frame0_deg"] == pytest.approx(0.0)
    assert rows[1]["angle_to_frame0_deg"] == pytest.approx(90.0) and rows[1]["fov_deg"] == pytest.approx(90.0)
    assert rows[1]["centre"] == pytest.approx([-2.0, 0.0, 0.0])  # -Rᵀt
    result = run_demo(frames=2, size=42, out=str(tmp_path))
    assert len(result["predicted"]) == len(result["ground_truth"]) == 2 and len(result["pose"]["rot_err_deg"]) == 1
    assert (tmp_path / "cameras.json").is_file() and (tmp_path / "images.png").is_file()
    assert "AUC@30" in format_result(result)
