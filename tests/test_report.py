"""hess report: tables from stored rows only, identical when regenerated, known answers on hand-made rows."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hess.config import RunConfig, apply_overrides
from hess.report import RANDOM_INIT_NOTICE, write_reports
from hess.results import DENSITY_KEY, Record, RunDir, load_results
from hess.rq import Pipeline, run_tracked
from hess.rq.heterogeneity import rq1 as rq1_report
from hess.rq.paired import PAIRED_COLUMNS
from hess.rq.runners import SIZING
from hess.rq.tables import fmt, markdown_table, summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three tracked runs of an 'rq3_baselines' experiment on the micro sizing (dense, uniform, random)."""
    warnings.filterwarnings("ignore", message="embedded checkpoint")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    cfg = apply_overrides(apply_overrides(RunConfig(), SIZING["micro"][1]),
                          {"log.out_dir": str(root), "log.wandb_mode": "disabled"})
    pipe = Pipeline(root / "cache", progress=False)
    extra = {"rq.name": "rq3_baselines", "rq.command": "hess reproduce rq3 --preset micro"}
    for method, overrides in (("dense", {"sparse.method": "dense"}), ("uniform", {"score.scorer": "uniform"}),
                              ("random", {"score.scorer": "random"})):
        run_tracked(pipe, apply_overrides(cfg, overrides), experiment="rq3_baselines", root=root / "session",
                    extra={**extra, "rq.method": method})
    torch.set_num_threads(previous)
    return root / "session"


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory) -> tuple[list[Path], Path]:
    out = tmp_path_factory.mktemp("report")
    return write_reports([runs], out), out


def test_report_regenerates_identically(runs, written, tmp_path):
    first, _ = written
    second = write_reports([runs], tmp_path)
    assert [p.name for p in first] == [p.name for p in second]
    assert {p.suffix for p in first} == {".md", ".csv", ".png"}
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_table_cells_are_the_recorded_values(runs, written):
    tmp_path = written[1]
    table = pd.read_csv(tmp_path / "rq3_baselines.csv")
    df = load_results(runs)
    for method in ("dense", "uniform", "random"):
        recorded = df[(df["rq.method"] == method) & (df.scene_id == "all") & (df.metric == DENSITY_KEY)]["value"].item()
        assert table.loc[table.method == method, "realised density"].item() == pytest.approx(recorded, rel=1e-5)
    md = (tmp_path / "rq3_baselines.md").read_text()
    uniform = table[table.method == "uniform"].iloc[0]
    assert f"| uniform | {fmt(uniform['keep_ratio'])} | {fmt(uniform['sparsity'])} |" in md
    # the paired difference to uniform at the same keep ratio is computed from the per-scene rows
    random = table[table.method == "random"].iloc[0]
    paired = pd.read_csv(tmp_path / "paired_differences.csv")
    assert list(paired.columns) == PAIRED_COLUMNS and set(paired["rq"]) == {"rq3_baselines"}
    row = paired[(paired.method == "random") & (paired.baseline == "uniform") & (paired.metric == "synthetic/chamfer")]
    assert row["mean_diff"].item() == pytest.approx(random["Chamfer ↓"] - uniform["Chamfer ↓"], abs=1e-6)
    assert row["n_scenes"].item() == 1 and math.isnan(row["ci_low"].item())  # one scene: no interval
    assert "ΔAUC@30 vs uniform [95% CI]" in md
    assert "hess reproduce rq3 --preset micro" in md and "runs: 3" in md


def test_random_weights_are_announced(runs, written):
    weights = {json.loads((d / "meta.json").read_text())["model_weights"] for d in runs.glob("*/*")}
    md = (written[1] / "rq3_baselines.md").read_text()
    assert (RANDOM_INIT_NOTICE in md) == ("random-init" in weights)


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result files"):
        write_reports([tmp_path / "empty"], tmp_path / "out")
    run = RunDir.create(tmp_path / "r", "x", {}, config_hash="0")
    run.append_records([Record("x", "s", "m", 1.0, config={"a.b": 1})])
    with pytest.raises(ValueError, match="no experiment rows"):
        write_reports([tmp_path / "r"], tmp_path / "out")


def test_summary_keeps_dense_apart_and_formats():
    rows = pd.DataFrame([
        {"rq.method": "dense", "scene_id": "all", "metric": "m", "value": 1.0, "keep_ratio": np.nan},
        {"rq.method": "hess", "scene_id": "all", "metric": "m", "value": 0.5, "keep_ratio": 0.25},
        {"rq.method": "hess", "scene_id": "s0", "metric": "m", "value": 9.0, "keep_ratio": 0.25},  # per-scene: not a cell
    ]).assign(method=lambda d: d["rq.method"])
    table = summary(rows, ["method", "keep_ratio"], {"m": "M"})
    assert table["method"].tolist() == ["dense", "hess"]
    assert math.isnan(table["keep_ratio"][0]) and table["sparsity"][1] == 0.75
    assert table["M"].tolist() == [1.0, 0.5]
    assert markdown_table(table) == ("| method | keep_ratio | sparsity | M |\n|---|---|---|---|\n"
                                     "| dense | n/a | n/a | 1.000 |\n| hess | 0.250 | 0.750 | 0.500 |")


def _score_rows(tables: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for name, t in tables.items():
        for l in range(t.shape[0]):
            for h in range(t.shape[1]):
                rows.append({"metric": f"score/{name}", "scene_id": f"GA{l}-H{h}", "value": float(t[l, h]),
                             "keep_ratio": 0.1 if name.startswith("oracle") else np.nan, "head.layer": l, "head.index": h,
                             "score.lam": 0.5})
    return pd.DataFrame(rows)


def test_rq1_report_known_answers():
    """Layer 0 equal heads (CV 0, Gini 0); layer 1 = (1, 3, 2, 4): CV 0.447, Gini 0.25; oracle_cam = 2·HeSS_cam
    gives per-layer ρ = 1 with the smallest permutation p (layer 0 constant: left out); a ranking reversed within
    layers ρ = −1, p = 1; pooled ρ only for raw traces vs raw Δ."""
    hess = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 3.0, 2.0, 4.0], [4.0, 1.0, 2.0, 3.0]])
    tables = {"hess_cam": hess, "hess_pc": hess[:, ::-1].copy(), "hess": hess, "trace_cam": hess * 10,
              "oracle_cam": hess * 2, "oracle_pc": hess[:, ::-1] * 3, "oracle": hess + 1, "random": 5.0 - hess}
    report = rq1_report(_score_rows(tables))
    dispersion = report.csv[report.csv.kind == "dispersion"]
    row = dispersion[(dispersion.table == "hess") & (dispersion.global_layer == 1)].iloc[0]
    assert row.cv == pytest.approx(math.sqrt(1.25) / 2.5) and row.gini == pytest.approx(0.25)
    assert dispersion[(dispersion.table == "hess") & (dispersion.global_layer == 0)].iloc[0].cv == pytest.approx(0.0)
    agreement = report.csv[report.csv.kind == "agreement"].set_index(["scorer", "oracle"])
    cam = agreement.loc[("hess_cam", "oracle_cam")]
    assert cam["ρ per layer (mean)"] == pytest.approx(1.0) and cam["layers"] == 2 and cam["p (permutation)"] < 0.01
    assert math.isnan(cam["ρ pooled"])  # per-layer-normalised HeSS is not comparable across layers
    assert agreement.loc[("trace_cam", "oracle_cam"), "ρ pooled"] == pytest.approx(1.0)
    assert agreement.loc[("hess_pc", "oracle_pc"), "ρ per layer (mean)"] == pytest.approx(1.0)
    assert "| random | -1.00 (p=1.000) |" in report.markdown  # ranks reversed within every layer
    assert "| most | 1 | GA0-H0 | 1.0000 |" not in report.markdown and "| most | 1 | GA1-H3 | 4.0000 |" in report.markdown
    assert set(report.figures) == {"hess_heatmaps", "dispersion", "oracle_cam", "oracle_pc", "oracle", "rank_correlation"}
