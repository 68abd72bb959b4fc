"""hess.tracking: W&B mode resolution, run directories + W&B runs closed on success, failure and pruning.

W&B never touches the network here: runs are ``disabled``, ``offline`` (forced through WANDB_MODE with
no API key), or a recording stand-in for the W&B run object.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hess.tracking as tracking
from hess.config import RunConfig, apply_overrides, from_dict, to_dict
from hess.results import Record
from hess.runtime import git_sha
from hess.tracking import resolve_wandb_mode, track_run


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B forced offline, with its cache/config/data folders inside tmp_path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def _cfg(tmp_path, mode="disabled", **extra):
    return apply_overrides(RunConfig(), {"log.out_dir": str(tmp_path / "out"), "log.wandb_mode": mode, **extra})


def test_resolve_wandb_mode(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    no_netrc = str(tmp_path / "missing")
    assert resolve_wandb_mode("auto", {"NETRC": no_netrc}) == "offline"  # no key: offline
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "x" * 40, "NETRC": no_netrc}) == "online"
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc)}) == "online"  # `wandb login` credentials
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "x", "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "dryrun", "NETRC": no_netrc}) == "offline"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "x"}) == "offline"  # explicit mode wins
    with pytest.raises(ValueError, match="unknown W&B mode 'loud'"):
        resolve_wandb_mode("loud", {})


def test_run_directory_holds_config_meta_metrics_records_and_log(tmp_path):
    cfg = _cfg(tmp_path, **{"budget.keep_ratio": 0.1})
    tracking._git_state.cache_clear()
    shas = {git_sha()}  # the lead may commit while tests run: accept the SHA before or after
    with track_run(cfg, experiment="rq2") as run:
        logging.getLogger("hess.evaluate").info("scene %s done", "s0")
        run.log_metrics({"synthetic/auc30": np.float32(0.5), "perf/latency_ms": 12})
        run.log_records([Record(run.run_id, "s0", "synthetic/auc30", 0.5, keep_ratio=0.1)])
        run.log_table("per_scene", pd.DataFrame({"scene": ["s0"], "auc": [0.5]}))
    path = run.dir.path
    assert path.parent == tmp_path / "out" / "rq2" and run.wandb_run is None
    assert from_dict(json.loads((path / "config.json").read_text())) == cfg
    assert json.loads((path / "config.json").read_text()) == to_dict(cfg)
    meta = json.loads((path / "meta.json").read_text())
    shas.add(git_sha())
    assert meta["status"] == "finished" and meta["error"] is None and meta["git_sha"] in shas
    assert len(meta["git_sha"]) == 40 and isinstance(meta["git_dirty"], bool)
    assert json.loads((path / "metrics.json").read_text()) == {"synthetic/auc30": 0.5, "perf/latency_ms": 12.0}
    assert pd.read_parquet(path / "records.parquet")["value"].tolist() == [0.5]
    assert pd.read_csv(path / "tables" / "per_scene.csv")["scene"].tolist() == ["s0"]
    log = (path / "log.txt").read_text()
    assert "hess.evaluate: scene s0 done" in log and "finished" in log
    with pytest.raises(TypeError, match="not numeric: \\['bad'\\]"):
        with track_run(cfg) as run:
            run.log_metrics({"bad": "0.5"})


class FakeWandbRun:
    """Records what tracking does with a W&B run object."""

    def __init__(self):
        self.id, self.logged, self.summary, self.finished = "fake123", [], {}, []
        self.config = self

    def log(self, data, step=None):
        self.logged.append(data)

    def update(self, data, allow_val_change=False):
        self.config_update = data

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


@pytest.mark.parametrize("exc, ok, status, exit_code", [
    (None, (), "finished", 0),
    (ValueError("boom"), (), "failed", 1),
    (KeyboardInterrupt(), (), "failed", 1),
    (LookupError("pruned at step 3"), (LookupError,), "pruned", 0),
])
def test_wandb_run_is_closed_whatever_happens(tmp_path, monkeypatch, exc, ok, status, exit_code):
    fake = FakeWandbRun()
    monkeypatch.setattr(tracking, "_init_wandb", lambda *a, **k: fake)
    cfg = _cfg(tmp_path, mode="offline")
    with pytest.raises(type(exc)) if exc else _nothing():
        with track_run(cfg, ok_exceptions=ok) as run:
            run.log_metrics({"a/b": 1.0})
            if exc:
                raise exc
    assert fake.finished == [exit_code] and fake.summary["status"] == status
    assert fake.logged[0] == {"a/b": 1.0} and fake.summary["a/b"] == 1.0
    meta = json.loads(run.dir.meta_path.read_text())
    assert meta["status"] == status and meta["wandb_id"] == "fake123"
    if status == "failed":
        assert type(exc).__name__ in meta["error"]
        assert "Traceback" in run.dir.log_path.read_text()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_given_wandb_run_gets_the_flat_config_and_is_finished(tmp_path):
    fake = FakeWandbRun()
    cfg = _cfg(tmp_path, mode="disabled")
    with track_run(cfg, wandb_run=fake, extra_config={"trial.number": 3}) as run:
        pass
    assert fake.config_update["budget.keep_ratio"] == 0.27 and fake.config_update["trial.number"] == 3
    assert fake.finished == [0] and run.wandb_id == "fake123"


def test_offline_wandb_run_lives_in_the_run_directory(tmp_path, offline_wandb):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb

    cfg = _cfg(tmp_path, mode="auto", **{"log.tags": ["test"]})
    with track_run(cfg, experiment="offline") as run:
        run.log_metrics({"synthetic/auc30": 0.25})
        run.log_table("per_scene", pd.DataFrame({"scene": ["s0"], "auc": [0.25]}))
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        run.log_figure("curve", fig)
        plt.close(fig)
    assert wandb.run is None  # finished
    offline = list((run.dir.path / "wandb").glob(f"offline-run-*-{run.wandb_id}"))
    assert len(offline) == 1 and (offline[0] / f"run-{run.wandb_id}.wandb").is_file()
    assert list((offline[0] / "files" / "media" / "images").glob("curve_*.png"))
    assert (run.dir.path / "figures" / "curve.png").is_file()
    assert json.loads(run.dir.meta_path.read_text())["wandb_mode"] == "offline"
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        with track_run(cfg, experiment="offline") as failed:
            raise RuntimeError("evaluation exploded")
    assert wandb.run is None and failed.wandb_id != run.wandb_id
    assert json.loads(failed.dir.meta_path.read_text())["status"] == "failed"
    assert list((failed.dir.path / "wandb").glob(f"offline-run-*-{failed.wandb_id}"))


# ------------------------------------------------------------------ hess.runtime (used for provenance)
def test_git_sha_inside_and_outside_a_checkout(tmp_path):
    import subprocess

    from hess.runtime import git_dirty

    head = lambda: subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                  capture_output=True, text=True).stdout.strip()
    before = head()
    assert git_sha() in {before, head()}
    assert git_sha(tmp_path) == "unknown" and git_dirty(tmp_path) is None


def test_seeding_device_dtype_threads():
    import random

    import torch

    from hess.runtime import resolve_device, resolve_dtype, seed_everything, set_threads

    draws = []
    for _ in range(2):
        seed_everything(123)
        draws.append((random.random(), float(np.random.rand()), torch.rand(3).tolist()))
    assert draws[0] == draws[1]
    with pytest.raises(ValueError, match="non-negative int"):
        seed_everything(-1)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device 'tpu7'"):
        resolve_device("tpu7")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'; known: bf16, bfloat16"):
        resolve_dtype("int8")
    previous = set_threads(1)
    try:
        assert torch.get_num_threads() == 1 and set_threads(None) == 1
    finally:
        set_threads(previous)


def test_time_fn_counts_calls_and_measures_wall_time():
    import time

    from hess.runtime import Stopwatch, time_fn

    calls = []
    timing = time_fn(lambda: (calls.append(1), time.sleep(0.02)), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.times_ms) == 3  # warm-up calls are not timed
    assert all(19.0 <= t < 500 for t in timing.times_ms)
    assert timing.min_ms <= timing.median_ms <= max(timing.times_ms) and timing.std_ms >= 0
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_fn(lambda: None, repeats=0)
    with Stopwatch() as sw:
        time.sleep(0.01)
    assert sw.elapsed_ms >= 9.0
