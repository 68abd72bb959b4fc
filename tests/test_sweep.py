"""hess.sweep + sweeps/: search spaces, baseline, objective, Pareto export, W&B program path, and the
issue's guarantees: a SIGKILLed sweep resumes without losing or redoing finished trials, and two worker
processes on one SQLite storage run trials without duplicates.

The objective is a cheap stand-in (a known function of the config that sleeps a little and logs every
evaluation to a JSON-lines file), so the tests check the sweep machinery, not the model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import hess.tracking as tracking
from hess.runtime import load_object
from hess.config import ConfigError, RunConfig, apply_overrides
from hess.search_space import Categorical, Float, Int, baseline_params, check_space, to_wandb_parameters
from hess.sweep import Objective, Target, TargetMissingError, export_study, make_storage, open_study, run_sweep, sampler_seed

REPO = Path(__file__).resolve().parents[1]
STAND_IN = '''
import json, os, time
from hess.sweep import Categorical, Float

SPACE = {"budget.keep_ratio": Float(0.05, 0.6), "score.lam": Float(0.0, 1.0),
         "score.scorer": Categorical(("hess", "uniform"))}

def _log(event, cfg):
    line = {"event": event, "run": cfg.log.run_name, "pid": os.getpid(),
            "params": [cfg.budget.keep_ratio, cfg.score.lam, cfg.score.scorer]}
    with open(os.environ["HESS_TEST_EVAL_LOG"], "a") as f:
        f.write(json.dumps(line) + "\\n")

def evaluate(cfg):
    _log("start", cfg)
    time.sleep(float(os.environ.get("HESS_TEST_SLEEP", "0")))
    _log("end", cfg)
    k = cfg.budget.keep_ratio
    return {"synthetic/auc30": 1.0 - (k - 0.3) ** 2 - 0.1 * cfg.score.lam, "perf/realized_density": k}
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The stand-in objective module in tmp_path; evaluations are logged to tmp_path/evals.jsonl."""
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    monkeypatch.setenv("HESS_TEST_EVAL_LOG", str(tmp_path / "evals.jsonl"))
    monkeypatch.setenv("HESS_TEST_SLEEP", "0")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return load_object(f"{tmp_path / 'stand_in.py'}:evaluate"), load_object(f"{tmp_path / 'stand_in.py'}:SPACE")


def _evals(tmp_path):
    path = tmp_path / "evals.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _base(tmp_path, mode="disabled"):
    return apply_overrides(RunConfig(), {"log.out_dir": str(tmp_path / "out"), "log.wandb_mode": mode})


AUC = Target("synthetic/auc30", "maximize")
DENSITY = Target("perf/realized_density", "minimize")


def test_targets_spaces_and_baseline():
    assert Target.parse("synthetic/auc30:max") == AUC and Target.parse("perf/x:minimize").direction == "minimize"
    with pytest.raises(ValueError, match="METRIC:max or METRIC:min"):
        Target.parse("synthetic/auc30")
    base = RunConfig()
    with pytest.raises(ConfigError, match="unknown config key 'budget.keep'"):
        check_space({"budget.keep": Float(0.1, 0.5)}, base)
    with pytest.raises(ConfigError, match="budget.min_blocks: expected int, got str"):
        check_space({"budget.min_blocks": Categorical(("one",))}, base)
    with pytest.raises(ConfigError, match="budget.keep_ratio: must be in \\(0, 1\\]"):
        check_space({"budget.keep_ratio": Float(0.0, 0.5)}, base)
    space = {"budget.keep_ratio": Float(0.1, 0.5), "score.scorer": Categorical(("hess", "uniform")),
             "budget.min_blocks": Int(1, 4)}
    assert baseline_params(space, base) == {"budget.keep_ratio": 0.27, "score.scorer": "uniform", "budget.min_blocks": 1}
    with pytest.raises(ValueError, match="baseline value 0.9 of 'budget.keep_ratio' is outside"):
        baseline_params(space, apply_overrides(base, ["budget.keep_ratio=0.9"]))
    assert sampler_seed(7, 0) == 7 and sampler_seed(None, 5) is None
    assert sampler_seed(7, 5) == sampler_seed(7, 5) != sampler_seed(7, 6) != sampler_seed(7, 5, worker=1)


def test_wandb_sweep_files_match_the_optuna_spaces():
    spaces = load_object(f"{REPO / 'sweeps' / 'spaces.py'}:SPACES")
    files = sorted((REPO / "sweeps" / "wandb").glob("*.yaml"))
    assert {f.stem for f in files} == set(spaces)
    for path in files:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["parameters"] == to_wandb_parameters(spaces[path.stem]), path
        assert (REPO / sweep["program"]).is_file() and "${args_json_file}" in sweep["command"]
        check_space(spaces[path.stem], RunConfig())
        baseline_params(spaces[path.stem], RunConfig())  # the uniform baseline is inside every space


def test_wandb_program_path_offline(tmp_path, stand_in, capsys):
    """Run sweeps/objective.py the way a W&B agent would, with W&B's own macro expansion, offline."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    objective = load_object(f"{REPO / 'sweeps' / 'objective.py'}:main")
    sweep = yaml.safe_load((REPO / "sweeps" / "wandb" / "lambda.yaml").read_text())
    params = {"budget.keep_ratio": 0.4, "score.lam": 0.75}
    args_json = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_json"][0]
    (tmp_path / "params.json").write_text(args_json)
    command = [c for c in create_sweep_command(sweep["command"]) if not c.startswith("${")]
    argv = command + [str(tmp_path / "params.json")]
    assert argv == ["--config-file", str(tmp_path / "params.json")]
    assert objective(argv + ["--objective", f"{tmp_path / 'stand_in.py'}:evaluate", "--out", str(tmp_path / "o")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((Path(printed["run_dir"]) / "config.json").read_text())
    assert config["budget"]["keep_ratio"] == 0.4 and config["score"]["lam"] == 0.75
    assert printed["metrics"]["synthetic/auc30"] == pytest.approx(1 - 0.1 ** 2 - 0.075)
    assert objective(["--config-json", '{"budget": {"keep_ratio": 0.2}}', "--no-wandb", "--out", str(tmp_path / "o"),
                      "--objective", f"{tmp_path / 'stand_in.py'}:evaluate"]) == 0  # nested form, JSON string
    assert json.loads(capsys.readouterr().out)["metrics"]["perf/realized_density"] == 0.2
    with pytest.raises(ConfigError, match="unknown config key 'budget.keep'"):
        objective(["--config-json", '{"budget.keep": 0.2}', "--no-wandb"])


def test_objective_records_runs_and_fails_on_missing_target(tmp_path, stand_in):
    evaluate, space = stand_in
    study, created = open_study("s", optuna.storages.InMemoryStorage(), [AUC], baseline=baseline_params(space, _base(tmp_path)))
    assert created and study.trials[0].state == TrialState.WAITING
    run_sweep(study, Objective(evaluate, _base(tmp_path), space, [AUC], study_name="s"), 3, progress=False)
    first = study.trials[0]
    assert first.params == {"budget.keep_ratio": 0.27, "score.lam": 0.5, "score.scorer": "uniform"}
    assert first.user_attrs["baseline"] and first.value == pytest.approx(1 - 0.03 ** 2 - 0.05)
    run_dir = Path(first.user_attrs["run_dir"])
    assert run_dir.parent == tmp_path / "out" / "sweeps" / "s" / "trials"
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"
    assert json.loads((run_dir / "config.json").read_text())["log"]["run_name"] == "s-0000"
    from hess.results import load_results

    rows = load_results(tmp_path / "out" / "sweeps" / "s")
    assert len(rows) == 3 * 2 and set(rows["scene_id"]) == {"all"}
    assert rows.loc[rows.metric == "perf/realized_density", "realized_density"].tolist() == rows.loc[
        rows.metric == "perf/realized_density", "value"].tolist()
    bad = Objective(evaluate, _base(tmp_path), space, [Target("synthetic/chamfer", "minimize")], study_name="s")
    study2 = optuna.create_study()
    with pytest.raises(TargetMissingError, match="no \\['synthetic/chamfer'\\]; it returned \\['perf/realized_density', 'synthetic/auc30'\\]"):
        study2.optimize(bad, n_trials=1)
    failed = Path(study2.trials[0].user_attrs["run_dir"])
    assert study2.trials[0].state == TrialState.FAIL and json.loads((failed / "meta.json").read_text())["status"] == "failed"


def test_each_trial_wandb_run_is_finished_before_optuna_records_it(tmp_path, stand_in, monkeypatch):
    """Ordering check: W&B finish() of trial n happens before the storage gets trial n's state."""
    events = []

    class Run:
        def __init__(self, name):
            self.id, self.summary, self.name = name, {}, name

        def log(self, data, step=None):
            pass

        def finish(self, exit_code=0):
            events.append(("finish", self.name, exit_code))

    class Storage(optuna.storages.InMemoryStorage):
        def set_trial_state_values(self, trial_id, state, values=None):
            if state.is_finished():
                events.append(("tell", self.get_trial(trial_id).user_attrs["wandb_run_id"], state.name))
            return super().set_trial_state_values(trial_id, state, values)

    monkeypatch.setattr(tracking, "_init_wandb", lambda cfg, *a, **k: Run(cfg.log.run_name))
    evaluate, space = stand_in
    calls = iter(["ok", "prune", "fail"])

    def evaluate_or_not(cfg):
        kind = next(calls)
        if kind == "prune":
            raise optuna.TrialPruned("too slow")
        if kind == "fail":
            raise RuntimeError("bad scene")
        return evaluate(cfg)

    study, _ = open_study("order", Storage(), [AUC])
    run_sweep(study, Objective(evaluate_or_not, _base(tmp_path, "offline"), space, [AUC], study_name="order"), 3,
              catch=(RuntimeError,), progress=False)
    assert events == [("finish", "order-0000", 0), ("tell", "order-0000", "COMPLETE"),
                      ("finish", "order-0001", 0), ("tell", "order-0001", "PRUNED"),
                      ("finish", "order-0002", 1), ("tell", "order-0002", "FAIL")]


def test_each_trial_is_its_own_offline_wandb_run(tmp_path, stand_in, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    evaluate, space = stand_in
    study, _ = open_study("wb", optuna.storages.InMemoryStorage(), [AUC])
    run_sweep(study, Objective(evaluate, _base(tmp_path, "auto"), space, [AUC], study_name="wb"), 2, progress=False)
    ids = [t.user_attrs["wandb_run_id"] for t in study.trials]
    assert len(set(ids)) == 2 and wandb.run is None
    for trial, run_id in zip(study.trials, ids):
        run_dir = Path(trial.user_attrs["run_dir"])
        assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 1  # W&B files in the run dir
        assert json.loads((run_dir / "meta.json").read_text())["wandb_id"] == run_id


def test_resume_does_not_requeue_baseline_and_checks_directions(tmp_path, stand_in):
    evaluate, space = stand_in
    storage = make_storage(f"sqlite:///{tmp_path / 'r.db'}", heartbeat_interval=5)
    baseline = baseline_params(space, _base(tmp_path))
    study, created = open_study("r", storage, [AUC, DENSITY], baseline=baseline)
    run_sweep(study, Objective(evaluate, _base(tmp_path), space, [AUC, DENSITY], study_name="r"), 4, progress=False)
    again, created_again = open_study("r", make_storage(f"sqlite:///{tmp_path / 'r.db'}"), [AUC, DENSITY], baseline=baseline)
    assert created and not created_again and len(again.trials) == 4
    assert run_sweep(again, Objective(evaluate, _base(tmp_path), space, [AUC, DENSITY], study_name="r"), 4) == 0
    assert sum(bool(t.user_attrs.get("baseline")) for t in again.trials) == 1
    with pytest.raises(ValueError, match="exists with directions \\['maximize', 'minimize'\\], not \\['maximize'\\]"):
        open_study("r", storage, [AUC])


def test_pareto_export_matches_brute_force(tmp_path, stand_in):
    import pandas as pd

    evaluate, space = stand_in
    study, _ = open_study("p", optuna.storages.InMemoryStorage(), [AUC, DENSITY],
                          sampler=optuna.samplers.RandomSampler(seed=0))
    run_sweep(study, Objective(evaluate, _base(tmp_path), space, [AUC, DENSITY], study_name="p"), 12, progress=False)
    paths = export_study(study, [AUC, DENSITY], tmp_path / "export")
    front = pd.read_csv(paths["pareto"])
    points = {t.number: t.values for t in study.trials}

    def dominated(a, b):  # b dominates a: auc >= and density <=, one strictly
        return b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1])

    expected = sorted(n for n, v in points.items() if not any(dominated(v, w) for w in points.values()))
    assert front["number"].tolist() == expected and 1 <= len(expected) < 12
    assert front["synthetic/auc30"].tolist() == pytest.approx([points[n][0] for n in expected])
    assert len(pd.read_csv(paths["trials"])) == 12


def _sweep_cmd(tmp_path, name, n_trials, *extra):
    return [sys.executable, "-m", "hess.cli", "sweep", "--name", name, "--space", "stand_in.py:SPACE",
            "--objective", "stand_in.py:evaluate", "--n-trials", str(n_trials), "--no-wandb",
            "--out", str(tmp_path / "out"), "--no-progress", "--no-plots", *extra]


def _study(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'out' / 'sweeps' / name}.db")


def test_sigkilled_sweep_resumes_without_losing_or_redoing_trials(tmp_path, stand_in):
    env = {**os.environ, "HESS_TEST_SLEEP": "0.25"}
    cmd = _sweep_cmd(tmp_path, "kill", 8, "--heartbeat", "1", "--grace", "2", "--seed", "0")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill in the middle of a trial, after 2 finished
        evals = _evals(tmp_path)
        if sum(e["event"] == "end" for e in evals) >= 2 and evals[-1]["event"] == "start":
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t for t in _study(tmp_path, "kill").trials}
    done = {n: t for n, t in before.items() if t.state == TrialState.COMPLETE}
    stale = [n for n, t in before.items() if t.state == TrialState.RUNNING]
    assert len(done) >= 2 and len(stale) == 1
    n_evals_before = len(_evals(tmp_path))
    time.sleep(1.0)  # with the restart's start-up, past the 2 s grace period: the killed trial is stale

    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    after = {t.number: t for t in _study(tmp_path, "kill").trials}
    for n, t in done.items():  # nothing lost, nothing changed
        assert after[n].state == TrialState.COMPLETE and after[n].params == t.params and after[n].values == t.values
    resumed = _evals(tmp_path)[n_evals_before:]
    keys = ("budget.keep_ratio", "score.lam", "score.scorer")  # the order of the logged params
    old_params = {tuple(t.params[k] for k in keys) for t in done.values()}
    assert not {tuple(e["params"]) for e in resumed} & old_params  # no finished trial redone
    starts = [e["run"] for e in _evals(tmp_path) if e["event"] == "start"]
    assert len(starts) == len(set(starts))  # every trial number evaluated once
    assert after[stale[0]].state == TrialState.FAIL  # the killed trial: failed by heartbeat, then retried
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == stale[0]]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == after[stale[0]].params
    assert sum(t.state == TrialState.COMPLETE for t in after.values()) == 8
    assert sum(bool(t.user_attrs.get("baseline")) for t in after.values()) == 1


def test_two_workers_share_one_sqlite_study_without_duplicates(tmp_path, stand_in):
    env = {**os.environ, "HESS_TEST_SLEEP": "0.1"}
    cmd = _sweep_cmd(tmp_path, "two", 10)
    procs = [subprocess.Popen(cmd + ["--worker", str(i)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = _study(tmp_path, "two").trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    surplus = [t for t in trials if t.user_attrs.get("hess.surplus")]  # created in a race for the last slot, never run
    assert len(complete) == 10 and len(complete) + len(surplus) == len(trials)  # exact total across workers
    assert all(t.state == TrialState.FAIL and not t.params for t in surplus)
    starts = [e for e in _evals(tmp_path) if e["event"] == "start"]
    assert len(starts) == len(complete) == len({e["run"] for e in starts})  # no trial run twice
    assert len({tuple(e["params"]) for e in starts}) == len(starts)  # no parameter set run twice
    assert len({e["pid"] for e in starts}) == 2  # both workers did work
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
