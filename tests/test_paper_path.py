"""The researcher's path in CI: every RQ's ``paper`` preset end to end at micro size (issue 19).

A tiny VGGT of the same family (hess-tiny's architecture, random weights) saved as a bare weights file plus a
config file (``model.checkpoint`` + ``model.config``), a tiny π³ likewise, a CO3Dv2-format root (3 categories,
varied aspect ratios) and a DTU-format root written with the project's writers; calibration on CO3D,
evaluation on DTU (rq3, rq5) and CO3D (rq1, rq2, rq4, latency) — through ``hess.rehearse``, i.e. exactly
``reproduce([rq], "paper")`` with counts and frame sizes shrunk.
"""
from __future__ import annotations

import json

import pytest

from hess.results import DENSITY_KEY, load_results

MICRO = ("data.num_scenes=2", "data.num_frames=2", "calib.num_scenes=1", "calib.num_frames=2",
         "eval.latency_warmup=0", "eval.latency_repeats=1", "model.device=cpu", "model.dtype=float32",
         "data.height=42", "data.width=42", "calib.height=42", "calib.width=42")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    from hess.rehearse import RehearsalSpec, rehearse
    from hess.train import TINY_MODEL_CONFIG

    out = tmp_path_factory.mktemp("rehearsal")
    spec = RehearsalSpec(vggt_config=json.loads(json.dumps(TINY_MODEL_CONFIG)), pi3_config="pi3-parity-a",
                         overrides=MICRO)
    return out, rehearse(out, spec, progress=False)


def test_every_paper_preset_runs_end_to_end(rehearsal):
    out, summary = rehearsal
    assert set(summary["rqs"]) == {"rq1", "rq2", "rq3", "rq4", "latency", "rq5"}
    for rq, r in summary["rqs"].items():
        assert r["failed"] is None and r["skipped"] is None, (rq, r)
        assert r["seconds"] > 0 and r["peak_rss_gib"] > 0
    reports = sorted((out / "results").glob("*.md"))
    assert len(reports) == 6 and all(md.read_text().startswith("> **REHEARSAL**") for md in reports)
    assert "| rq3 |" in (out / "REHEARSAL.md").read_text()


def test_paper_runs_calibrate_on_co3d_and_evaluate_on_dtu(rehearsal):
    out, _ = rehearsal
    df = load_results(out / "runs" / "reproduce")
    rq3 = df[df["rq.name"] == "rq3_baselines"]
    scenes = set(rq3.loc[rq3.scene_id != "all", "scene_id"])
    assert scenes == {"dtu/scan1", "dtu/scan4"}                       # data.scans of the rehearsal, 2 scenes
    hess = rq3[rq3["rq.method"] == "hess"]                           # (dense / uniform / random runs drop calib.*)
    assert len(hess) and (hess["calib.dataset"] == "co3d").all() and hess["calib.checkpointing"].all()
    assert (rq3["model.config"].str.endswith("config.json")).all() and (rq3["model.checkpoint"].str.endswith(
        "weights.safetensors")).all()                               # a bare weights file + its config file
    # the cached calibration artifact was computed on CO3D train sequences (a DTU run cannot calibrate on DTU)
    sidecars = list((out / "runs" / "cache").rglob("*.json"))
    ids = {sid for p in sidecars for sid in json.loads(p.read_text()).get("scene_ids", [])}
    assert ids and all(sid.startswith("co3d/") and "_train_" in sid for sid in ids), ids
    # CO3D evaluation: two sequences from two categories (spread over categories), test subset only
    rq2 = df[(df["rq.name"] == "rq2_sparsity") & (df.scene_id != "all")]
    cats = set(rq2["scene.category"])
    assert len(cats) == 2 and all("_test_" in s for s in rq2.scene_id)
    sparse = rq2[(rq2.metric == DENSITY_KEY) & rq2.keep_ratio.notna()]
    assert len(sparse) > 0 and sparse["value"].between(0, 1).all()
