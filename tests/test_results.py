"""hess.results: tidy records, parquet/CSV appends, load_results, run directories."""
from __future__ import annotations

import datetime as dt
import json
import math

import pandas as pd
import pytest

from hess.results import RECORD_COLUMNS, Record, RunDir, append_records, load_results


def _records(run_id, n, extra=None):
    config = {"budget.keep_ratio": 0.27, "eval.metrics": ["auc30", "chamfer"], **(extra or {})}
    return [Record(run_id, f"scene{i}", "synthetic/auc30", 0.1 * i, keep_ratio=0.27, realized_density=0.3,
                   latency_ms=12.5, config=config) for i in range(n)]


def test_record_validation():
    with pytest.raises(ValueError, match="Record.metric must be a non-empty string"):
        Record("r", "s", "", 1.0)
    with pytest.raises(TypeError, match="Record.value must be a number, got str"):
        Record("r", "s", "m/x", "1.0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Record.value must be a number, got None"):
        Record("r", "s", "m/x", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Record.latency_ms must be a number or None, got bool"):
        Record("r", "s", "m/x", 1.0, latency_ms=True)
    with pytest.raises(ValueError, match="dotted config keys"):
        Record("r", "s", "m/x", 1.0, config={"value": 3})
    assert math.isnan(Record("r", "s", "m/x", float("nan")).value)  # undefined metric recorded as NaN
    row = Record("r", "s", "m/x", 2, config={"eval.metrics": ["a"]}).to_row()
    assert list(row)[: len(RECORD_COLUMNS)] == list(RECORD_COLUMNS)
    assert row["value"] == 2.0 and row["eval.metrics"] == '["a"]'  # lists become JSON text cells


def test_append_records_writes_parquet_and_matching_csv(tmp_path):
    path = append_records(tmp_path / "run" / "records", _records("r1", 2))
    assert path == tmp_path / "run" / "records.parquet"
    append_records(tmp_path / "run" / "records.csv", _records("r1", 1, extra={"score.lam": 0.5}))  # new column
    frame = pd.read_parquet(path)
    assert len(frame) == 3 and list(frame["scene_id"]) == ["scene0", "scene1", "scene0"]
    assert frame["value"].tolist() == pytest.approx([0.0, 0.1, 0.0])
    assert frame["score.lam"].isna().tolist() == [True, True, False]
    csv = pd.read_csv(tmp_path / "run" / "records.csv")
    pd.testing.assert_frame_equal(csv, frame, check_dtype=False)
    assert append_records(path, []) == path and len(pd.read_parquet(path)) == 3  # empty append: no-op


def test_load_results_from_dir_glob_and_file(tmp_path):
    for run in ("a", "b"):
        append_records(tmp_path / "exp" / run / "records", _records(run, 2))
    (tmp_path / "exp" / "c").mkdir()
    _records_frame = pd.DataFrame([r.to_row() for r in _records("c", 1)])
    _records_frame.to_csv(tmp_path / "exp" / "c" / "records.csv", index=False)  # CSV-only run
    frame = load_results(tmp_path / "exp")
    assert sorted(frame["run_id"]) == ["a", "a", "b", "b", "c"]  # parquet preferred over its CSV mirror
    assert set(frame["run_dir"]) == {str(tmp_path / "exp" / r) for r in "abc"}
    assert len(load_results(str(tmp_path / "exp" / "*" / "records.*"))) == 5
    assert len(load_results(tmp_path / "exp" / "a" / "records.parquet")) == 2
    with pytest.raises(FileNotFoundError, match="no result files"):
        load_results(tmp_path / "nothing-here")


def test_run_dir_layout_and_files(tmp_path):
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    config = {"budget": {"keep_ratio": 0.27}}
    run = RunDir.create(tmp_path, "rq2", config, config_hash="abc123", meta={"git_sha": "deadbeef"}, now=now)
    assert run.path == tmp_path / "rq2" / "20260102-030405-abc123" and run.run_id == "20260102-030405-abc123"
    again = RunDir.create(tmp_path, "rq2", config, config_hash="abc123", now=now)
    assert again.path.name == "20260102-030405-abc123-2"  # same second, same config: never overwritten
    assert run.read_config() == config
    meta = run.read_meta()
    assert meta["git_sha"] == "deadbeef" and meta["status"] == "running" and meta["started"] == "2026-01-02T03:04:05"
    run.write_metrics({"a/x": 1.0, "a/nan": float("nan")})
    run.write_metrics({"a/y": 2.0})
    assert run.read_metrics() == {"a/x": 1.0, "a/nan": None, "a/y": 2.0}  # merged; NaN as JSON null
    assert json.loads(run.metrics_path.read_text())["a/y"] == 2.0
    run.append_records(_records(run.run_id, 3))
    assert run.records()["run_id"].unique().tolist() == [run.run_id]
    run.update_meta(status="finished")
    assert RunDir.open(run.path).read_meta()["status"] == "finished"
    assert run.file("figures", "x.png") == run.path / "figures" / "x.png" and (run.path / "figures").is_dir()
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        RunDir.open(tmp_path)
    with pytest.raises(ValueError, match="relative name"):
        RunDir.create(tmp_path, "../escape", config, config_hash="x")
