"""Four ``hess sweep`` workers of one study on a real PostgreSQL server; one is SIGKILLed mid-trial.

The server comes from ``$HESS_TEST_POSTGRES_URL`` (``.ci/run`` starts a throwaway PostgreSQL 15 cluster with
``.ci/postgres.sh`` and exports it).  Without it the test skips with the reason; in CI (``CI=true`` or
``HESS_REQUIRE_POSTGRES=1``) it fails instead.  All four workers get the same ``--seed``: per-trial seeds
must still give distinct parameter sets.  The objective is a cheap stand-in (a known function that
sleeps a little and logs every evaluation), so the test checks the sweep machinery, not the model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

URL_ENV = "HESS_TEST_POSTGRES_URL"
N_TRIALS, N_WORKERS = 12, 4
STAND_IN = '''
import json, os, time
from hess.sweep import Float

SPACE = {"budget.keep_ratio": Float(0.05, 0.6), "score.lam": Float(0.0, 1.0), "sparse.cdf_threshold": Float(0.5, 1.0)}

def _log(event, cfg):
    line = {"event": event, "run": cfg.log.run_name, "pid": os.getpid(),
            "params": [cfg.budget.keep_ratio, cfg.score.lam, cfg.sparse.cdf_threshold]}
    with open(os.environ["HESS_TEST_EVAL_LOG"], "a") as f:
        f.write(json.dumps(line) + "\\n")

def evaluate(cfg):
    _log("start", cfg)
    time.sleep(float(os.environ.get("HESS_TEST_SLEEP", "0")))
    _log("end", cfg)
    k = cfg.budget.keep_ratio
    return {"synthetic/auc30": 1.0 - (k - 0.3) ** 2 - 0.1 * cfg.score.lam}
'''


def _require_server() -> str:
    """The server URL, after checking that it answers; skip (fail in CI) otherwise."""
    required = os.environ.get("CI", "").lower() == "true" or os.environ.get("HESS_REQUIRE_POSTGRES") == "1"
    stop = pytest.fail if required else pytest.skip
    url = os.environ.get(URL_ENV)
    if not url:
        stop(f"no PostgreSQL server: set {URL_ENV}=postgresql://USER@HOST:PORT/DB (.ci/run starts a throwaway one "
             "with .ci/postgres.sh)")
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(url).connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as err:  # noqa: BLE001 - driver missing, server down, bad URL: all mean "no server"
        stop(f"PostgreSQL at {url} is not usable: {type(err).__name__}: {err}")
    return url


def _evals(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_four_workers_one_killed_on_postgres(tmp_path):
    import optuna
    from optuna.trial import TrialState

    url = _require_server()
    name = f"pg-{uuid.uuid4().hex[:8]}"
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    log = tmp_path / "evals.jsonl"
    env = {**os.environ, "HESS_TEST_EVAL_LOG": str(log), "HESS_TEST_SLEEP": "0.4", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "hess.cli", "sweep", "--name", name, "--storage", url, "--space", "stand_in.py:SPACE",
           "--objective", "stand_in.py:evaluate", "--n-trials", str(N_TRIALS), "--no-wandb", "--out", str(tmp_path / "out"),
           "--no-progress", "--no-plots", "--heartbeat", "1", "--grace", "3", "--seed", "0"]
    start = time.time()
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(N_WORKERS)]
    victim = procs[1]
    deadline = time.time() + 120
    while time.time() < deadline:  # kill the victim in the middle of a trial, after a few trials finished
        evals = _evals(log)
        mine = [e for e in evals if e["pid"] == victim.pid]
        if sum(e["event"] == "end" for e in evals) >= 3 and mine and mine[-1]["event"] == "start":
            break
        if victim.poll() is not None:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the victim worker ended before it could be killed mid-trial"
    killed_run = [e for e in _evals(log) if e["pid"] == victim.pid][-1]["run"]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    outputs = [p.communicate(timeout=180)[0] for p in procs if p is not victim]
    wall = time.time() - start
    assert [p.returncode for p in procs if p is not victim] == [0] * (N_WORKERS - 1), outputs

    trials = optuna.load_study(study_name=name, storage=url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS  # exactly the requested number, across workers and the kill
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params)  # no duplicate parameter set, though every worker had --seed 0
    killed = [t for t in trials if f"{name}-{t.number:04d}" == killed_run]
    assert len(killed) == 1 and killed[0].state == TrialState.FAIL  # the killed trial: failed ...
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE  # ... and retried once, to completion
    assert retries[0].params == killed[0].params
    meta = json.loads((Path(killed[0].user_attrs["run_dir"]) / "meta.json").read_text())
    assert meta["status"] == "failed"  # its run directory is not left "running"
    others = [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.FAIL)]
    assert not others, [(t.number, t.state) for t in others]  # nothing left RUNNING or WAITING
    surplus = [t for t in trials if t.state == TrialState.FAIL and t is not killed[0]]
    assert all(t.user_attrs.get("hess.surplus") and not t.params for t in surplus)  # race losers, never run
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    starts = [e for e in _evals(log) if e["event"] == "start"]
    assert len(starts) == N_TRIALS + 1 == len({e["run"] for e in starts})  # each trial evaluated once (+ the killed one)
    assert len({e["pid"] for e in starts}) == N_WORKERS  # every worker did work
    print(f"\npostgres sweep: {N_WORKERS} workers, {len(complete)} complete, {len(surplus)} surplus, 1 killed + 1 retry, "
          f"{len(params) - len(set(params))} duplicate parameter sets, wall {wall:.1f} s")
