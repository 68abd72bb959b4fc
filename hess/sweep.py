"""Optuna sweeps over dotted config overrides, resumable and multi-worker (style rule 13).

    space = {"budget.keep_ratio": Float(0.1, 0.6), "score.lam": Float(0.0, 1.0)}
    targets = [Target("synthetic/auc30", "maximize"), Target(DENSITY_KEY, "minimize")]
    storage = make_storage(default_storage_url("ablations/outputs", "demo"))
    study, _ = open_study("demo", storage, targets, baseline=baseline_params(space, cfg))
    run_sweep(study, Objective(evaluate_fn, cfg, space, targets, study_name="demo"), n_trials=40)
    export_study(study, targets, "ablations/outputs/sweeps/demo")

- Search spaces (``Float``, ``Int``, ``Categorical``): :mod:`hess.search_space`.
- Storage: any SQLAlchemy URL (SQLite by default; PostgreSQL for many machines).  A killed worker
  loses no finished trial: finished trials live in the database, and a new worker continues until
  the study holds ``n_trials`` finished (complete or pruned) trials.
- Crashed trials: the storage heartbeat marks a trial whose worker died as FAIL after
  ``grace_period`` seconds, and ``RetryHeartbeatStaleTrialCallback`` re-queues its parameters
  (the optuna 5 names of ``failed_trial_callback``/``RetryFailedTrialCallback``, now deprecated).
- The baseline (the uniform allocation, ``score.scorer=uniform``) is queued once, by the process
  that creates the study (creation is atomic in the database, so concurrent workers agree).
- Each trial is its own tracked run (run directory + W&B run, ``hess.tracking``), finished before
  Optuna sees the trial's result, pruning or failure.  Use one trial at a time per process
  (``n_jobs=1``) and more processes for parallelism.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import optuna
from optuna.trial import TrialState

from hess.cli import add_config_arguments, config_from_args
from hess.config import ConfigError, RunConfig, apply_overrides, flatten, to_dict
from hess.registry import Registry
from hess.runtime import load_object
from hess.search_space import (  # noqa: F401  (the distributions stay importable from hess.sweep)
    SPACES, Categorical, Float, Int, Param, SearchSpace, baseline_params, check_space, resolve_space, space_identity,
    suggest, to_wandb_parameters,
)
from hess.sweep_study import (  # noqa: F401
    SURPLUS_ATTR, TargetMissingError, check_identity, config_digest, reap_stale_trials, run_trials,
)
from hess.results import DENSITY_KEY, LATENCY_KEY, Record, finite_or_none, write_atomic, write_json
from hess.tracking import track_run

EvaluateFn = Callable[[RunConfig], Mapping[str, float]]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# ------------------------------------------------------------------------------ targets, storage
@dataclass(frozen=True)
class Target:
    """An optimisation target: a metric key and a direction."""

    metric: str
    direction: Literal["maximize", "minimize"]

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``"synthetic/auc30:max"`` / ``"perf/realized_density:minimize"``."""
        metric, _, direction = text.rpartition(":")
        names = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
        if not metric or direction not in names:
            raise ConfigError(f"--target must look like METRIC:max or METRIC:min (e.g. synthetic/auc30:max), got {text!r}")
        return cls(metric, names[direction])  # type: ignore[arg-type]


def default_storage_url(out_dir: str | Path, name: str) -> str:
    """``sqlite:///<out_dir>/sweeps/<name>.db`` (absolute path; the folder is created)."""
    path = Path(out_dir).resolve() / "sweeps" / f"{name}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_storage(url: str, *, heartbeat_interval: int = 10, grace_period: Optional[int] = None,
                 max_retry: int = 1) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a trial silent for ``grace_period`` s (default 3 × interval) is
    failed and re-queued up to ``max_retry`` times."""
    import sqlalchemy.exc

    engine_kwargs = _sqlite_engine_kwargs(url) if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period or 3 * heartbeat_interval, heartbeat_stale_trial_callback=retry)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
                # workers starting together on a fresh database race to create its schema; the
                # loser finds it created on the next attempt
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _sqlite_engine_kwargs(url: str) -> dict[str, Any]:
    """SQLite in WAL mode with ``synchronous=NORMAL``: several processes read while one writes, and a
    commit costs no fsync (a killed process loses nothing; only a power cut may lose the last trials).
    Use a server database (PostgreSQL) rather than SQLite on a network file system."""
    import sqlite3

    from sqlalchemy.engine import make_url

    path = make_url(url).database
    if not path or path == ":memory:":
        return {}
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return {"creator": connect}


SAMPLERS: Registry[Callable[[Optional[int]], optuna.samplers.BaseSampler]] = Registry("sampler")
def _tpe(seed: Optional[int]) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


SAMPLERS.register("tpe")(_tpe)
SAMPLERS.register("random")(lambda seed: optuna.samplers.RandomSampler(seed=seed))
SAMPLERS.register("nsga2")(lambda seed: optuna.samplers.NSGAIISampler(seed=seed))


def open_study(name: str, storage: Any, targets: Sequence[Target], *, sampler: Optional[optuna.samplers.BaseSampler] = None,
               baseline: Optional[Mapping[str, Any]] = None, identity: Optional[Mapping[str, Any]] = None,
               storage_url: str = "") -> tuple[optuna.Study, bool]:
    """Create the study, or load it if it exists (``load_if_exists`` semantics); returns (study, created).

    Only the creating process queues ``baseline``, so it runs once however many workers start or
    restart.  A loaded study must have the same directions as ``targets``, and the same ``identity``
    (``study_identity``: targets, search space, objective) when one is given (``check_identity``).
    """
    directions = [t.direction for t in targets]
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=sampler)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
        found = [d.name.lower() for d in study.directions]
        if found != directions:
            raise ConfigError(f"study {name!r} exists with directions {found}, not {directions}; resume it with its own "
                              "--target settings, or start a new study with another --name")
    if created:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([t.metric for t in targets])
        if baseline:
            study.enqueue_trial(dict(baseline), user_attrs={"baseline": True}, skip_if_exists=True)
    if identity is not None:
        check_identity(study, {"targets": [t.metric for t in targets], "directions": directions, **identity},
                       created, storage_url=storage_url)
    return study, created


def study_identity(space: SearchSpace, objective: str, base: Optional[RunConfig] = None) -> dict[str, Any]:
    """What a study stores about itself besides its targets: search space, objective, base config digest.

    ``objective`` is named as given without the folder of a ``FILE.py`` (workers on other machines keep
    the file elsewhere); the base config digest leaves out ``log`` and ``model.device`` (one GPU per worker).
    """
    target, _, attr = objective.rpartition(":")
    name = f"{Path(target).name}:{attr}" if target.endswith(".py") else objective
    out: dict[str, Any] = {"space": space_identity(space), "objective": name}
    if base is not None:
        data = {k: v for k, v in to_dict(base).items() if k != "log"}
        data["model"] = {k: v for k, v in data["model"].items() if k != "device"}
        out["base_config"] = config_digest(data)
    return out


def check_targets(targets: Sequence[Target], names: Optional[Any]) -> None:
    """Every target is a metric the objective returns (``names``; None = not known before a trial)."""
    import difflib

    if names is None:
        return
    names = sorted(names)
    for t in targets:
        if t.metric not in names:
            close = difflib.get_close_matches(t.metric, names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"--target {t.metric}: the objective returns no such metric; {hint}it returns {', '.join(names)}")


def sampler_seed(seed: Optional[int], n_existing: int, worker: int = 0) -> Optional[int]:
    """The seed itself for worker 0 of a study with no started trial; otherwise mixed with the number
    of started trials and the worker id, so that a resumed or second worker does not replay the
    first one's parameters (a seeded sampler restarted as-is would propose them again)."""
    if seed is None or (n_existing == 0 and worker == 0):
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, n_existing, worker]).generate_state(1)[0])


# ------------------------------------------------------------------------------------ objective
class Objective:
    """``study.optimize`` callable: trial -> dotted overrides -> ``evaluate_fn(cfg)`` -> target values.

    Args:
        evaluate_fn: ``(cfg) -> {metric: value}``; holds the loaded state (model, scenes, scores).
            It may raise ``optuna.TrialPruned``.
        base: the config every trial starts from.
        space: dotted key -> distribution.
        targets: metrics returned to Optuna, in order.
        study_name: W&B group and run-name prefix.
        root: folder of the trial run directories (``<root>/trials/<ts>-<hash>/``).
    """

    def __init__(self, evaluate_fn: EvaluateFn, base: RunConfig, space: SearchSpace, targets: Sequence[Target],
                 *, study_name: str, root: Optional[str | Path] = None) -> None:
        check_space(space, base)
        if not targets:
            raise ValueError("need at least one target")
        self.evaluate_fn, self.base, self.space, self.targets = evaluate_fn, base, dict(space), list(targets)
        self.study_name = study_name
        self.root = Path(root) if root is not None else Path(base.log.out_dir) / "sweeps" / study_name

    def config_for(self, params: Mapping[str, Any], number: int) -> RunConfig:
        cfg = apply_overrides(self.base, dict(params))
        return apply_overrides(cfg, {"log.run_name": f"{self.study_name}-{number:04d}"})

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        cfg = self.config_for(suggest(trial, self.space), trial.number)
        extra = {"trial.number": trial.number, "trial.study": self.study_name}
        with track_run(cfg, experiment="trials", root=self.root, group=self.study_name, job_type="trial",
                       ok_exceptions=(optuna.TrialPruned,), extra_config=extra) as run:
            trial.set_user_attr("run_dir", str(run.dir.path))
            if run.wandb_id:
                trial.set_user_attr("wandb_run_id", run.wandb_id)
            run.log_metrics(self.evaluate_fn(cfg))
            run.log_records(self._records(run.run_id, cfg, run.metrics))
            values = self._values(run.metrics)
        # the W&B run is finished here, before Optuna records the result
        trial.set_user_attr("metrics", finite_or_none(run.metrics))
        return values[0] if len(values) == 1 else values

    def _values(self, metrics: Mapping[str, float]) -> tuple[float, ...]:
        missing = [t.metric for t in self.targets if t.metric not in metrics]
        if missing:
            raise TargetMissingError(f"objective returned no {missing}; it returned {sorted(metrics)}: fix --target "
                                     "(the trial's parameters are queued again)")
        bad = [t.metric for t in self.targets if not math.isfinite(metrics[t.metric])]
        if bad:
            raise ValueError(f"target metric(s) {bad} are not finite: {[metrics[m] for m in bad]}")
        return tuple(float(metrics[t.metric]) for t in self.targets)

    @staticmethod
    def _records(run_id: str, cfg: RunConfig, metrics: Mapping[str, float]) -> list[Record]:
        """One row per metric, scene ``all`` (the objective returns aggregates)."""
        flat = flatten(cfg)
        keep = None if cfg.sparse.method == "dense" else cfg.budget.keep_ratio
        return [Record(run_id, "all", key, value, keep_ratio=keep, realized_density=metrics.get(DENSITY_KEY),
                       latency_ms=metrics.get(LATENCY_KEY), config=flat) for key, value in metrics.items()]


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_sweep(study: optuna.Study, objective: Callable[[optuna.Trial], Any], n_trials: int, *,
              catch: tuple[type[Exception], ...] = (), progress: bool = True,
              sampler_for: Optional[Callable[[int], optuna.samplers.BaseSampler]] = None) -> int:
    """Run trials until the study holds exactly ``n_trials`` finished (complete or pruned) trials in total.

    Safe to call again after a crash (resume: dead workers' RUNNING trials are failed and retried) and
    from several processes on one storage (``hess.sweep_study.run_trials``).  ``sampler_for``: trial
    number -> sampler (per-trial seeds, ``sampler_seed``).  Returns the number of trials this call ran.
    """
    from tqdm.auto import tqdm

    remaining = n_trials - count_finished(study)
    if remaining <= 0:
        reap_stale_trials(study)
        return 0
    bar = tqdm(total=remaining, desc=f"sweep {study.study_name}", unit="trial", disable=not progress or None)
    try:
        return run_trials(study, objective, n_trials, catch=catch, sampler_for=sampler_for,
                          on_trial=lambda trial: bar.update(1))
    finally:
        bar.close()


def export_study(study: optuna.Study, targets: Sequence[Target], out_dir: str | Path, *, plots: bool = False) -> dict[str, Path]:
    """Write ``trials.csv`` (every trial), ``best.json`` (single target) or ``pareto.csv`` (the
    Pareto front of complete trials, multi-target) and optional PNG plots; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.metric for t in targets]
    paths = {"trials": out / "trials.csv"}
    trials = study.trials_dataframe()
    surplus = f"user_attrs_{SURPLUS_ATTR}"
    if surplus in trials:  # created in a race for the last slot and never run
        trials = trials[trials[surplus] != True].drop(columns=[surplus])  # noqa: E712
    write_atomic(paths["trials"], lambda tmp: trials.to_csv(tmp, index=False))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete and len(targets) == 1:
        best = study.best_trial
        paths["best"] = write_json(out / "best.json", _trial_row(best, names))
    elif complete:
        import pandas as pd

        rows = [_trial_row(t, names) for t in sorted(study.best_trials, key=lambda t: t.number)]
        paths["pareto"] = out / "pareto.csv"
        front = pd.json_normalize(rows, sep=".")
        write_atomic(paths["pareto"], lambda tmp: front.to_csv(tmp, index=False))
    if plots and complete:
        paths.update(_plots(study, names, out))
    return paths


def _trial_row(trial: optuna.trial.FrozenTrial, names: Sequence[str]) -> dict[str, Any]:
    return {"number": trial.number, **dict(zip(names, trial.values)), "params": trial.params,
            "baseline": bool(trial.user_attrs.get("baseline")), "run_dir": trial.user_attrs.get("run_dir")}


def _plots(study: optuna.Study, names: Sequence[str], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if len(names) == 2:
            ax = ovm.plot_pareto_front(study, target_names=list(names))
        else:
            ax = ovm.plot_optimization_history(study, target=(lambda t: t.values[0]) if len(names) > 1 else None,
                                               target_name=names[0])
    name = "pareto" if len(names) == 2 else "history"
    paths[f"{name}_png"] = out / f"{name}.png"
    write_atomic(paths[f"{name}_png"], lambda tmp: ax.figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(ax.figure)
    return paths


# ------------------------------------------------------------------------------------------ CLI
DEFAULT_OBJECTIVE = "hess.objective:evaluate_metrics"
OUT_ENV = "HESS_OUT"


def default_out_dir(cwd: Optional[Path] = None) -> Path:
    """Where ``hess sweep`` writes without ``--out``: ``$HESS_OUT``, else ``ablations/outputs`` inside a clone
    of the repository (the working directory holds ``ablations/configs``), else ``./hess-outputs``."""
    import os

    cwd = Path.cwd() if cwd is None else cwd
    if os.environ.get(OUT_ENV):
        return Path(os.environ[OUT_ENV]).expanduser()
    return cwd / "ablations" / "outputs" if (cwd / "ablations" / "configs").is_dir() else cwd / "hess-outputs"


def resolve_objective(spec: str) -> Callable[[RunConfig], Mapping[str, float]]:
    """``--objective``: ``MODULE:NAME`` or ``FILE.py:NAME`` of a callable ``(cfg) -> {metric: value}``."""
    try:
        fn = load_object(spec)
    except (AttributeError, ImportError, ValueError) as err:
        raise ConfigError(f"--objective {spec!r}: {err}; give MODULE:NAME or FILE.py:NAME "
                          f"(default {DEFAULT_OBJECTIVE})") from None
    if not callable(fn):
        raise ConfigError(f"--objective {spec!r} is a {type(fn).__name__}, not a function (cfg) -> {{metric: value}}")
    return fn


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hess sweep``."""
    add_config_arguments(parser)
    parser.add_argument("--name", required=True, help="study name (also the folder <out>/sweeps/<name>/)")
    parser.add_argument("--space", default="budget",
                        help=f"search space: {' | '.join(SPACES)} (packaged), FILE.py:NAME or MODULE:NAME (default budget)")
    parser.add_argument("--objective", default=DEFAULT_OBJECTIVE,
                        help=f"evaluation function (cfg) -> {{metric: value}}, FILE.py:NAME or MODULE:NAME (default {DEFAULT_OBJECTIVE})")
    parser.add_argument("--target", action="append", metavar="METRIC:max|min",
                        help="repeat for multi-objective (default synthetic/auc30:max)")
    parser.add_argument("--n-trials", type=int, default=20, help="finished trials the study holds in total (exact, all workers)")
    parser.add_argument("--storage", help="SQLAlchemy URL, e.g. postgresql://user@host/db for many machines "
                        "(default sqlite:///<out>/sweeps/<name>.db)")
    parser.add_argument("--sampler", default="tpe", choices=SAMPLERS.names())
    parser.add_argument("--seed", type=int, help="sampler seed; each trial's sampler is seeded from (seed, trial number, "
                        "--worker), so workers sharing a seed never propose the same parameters")
    parser.add_argument("--worker", type=int, default=0, help="worker index, mixed into the seed")
    parser.add_argument("--baseline", action="append", metavar="KEY=VALUE",
                        help="baseline trial values (default score.scorer=uniform where the space has it)")
    parser.add_argument("--no-baseline", action="store_true", help="do not queue a baseline trial")
    parser.add_argument("--heartbeat", type=int, default=10, help="heartbeat interval, seconds")
    parser.add_argument("--grace", type=int, help="seconds without heartbeat before a trial is failed (default 3 x heartbeat)")
    parser.add_argument("--max-retry", type=int, default=1, help="re-runs of a crashed trial")
    parser.add_argument("--export-only", action="store_true", help="only export trials/Pareto front")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="no Pareto/history PNG")


def run_cli(args: argparse.Namespace) -> int:
    """``hess sweep``: check the settings, open/resume the study, run trials, export results."""
    from hess.config import LogSection

    if args.n_trials < 1:
        raise ConfigError(f"--n-trials must be >= 1, got {args.n_trials}")
    cfg = config_from_args(args)
    if not args.out and cfg.log.out_dir == LogSection.out_dir:
        cfg = apply_overrides(cfg, {"log.out_dir": str(default_out_dir())})
    targets = [Target.parse(t) for t in (args.target or ["synthetic/auc30:max"])]
    space = resolve_space(args.space)
    check_space(space, cfg)
    evaluate_fn = resolve_objective(args.objective)
    names = getattr(evaluate_fn, "metric_names", None)
    check_targets(targets, names(cfg) if callable(names) else names)  # before any trial or study exists
    baseline = None
    if not args.no_baseline:
        baseline = baseline_params(space, cfg, _baseline_overrides(args.baseline))
    optuna.logging.set_verbosity(logging.WARNING)
    url = args.storage or default_storage_url(cfg.log.out_dir, args.name)
    storage = make_storage(url, heartbeat_interval=args.heartbeat, grace_period=args.grace, max_retry=args.max_retry)
    study, created = open_study(args.name, storage, targets, baseline=baseline, storage_url=url,
                                identity=study_identity(space, args.objective, cfg))
    make = SAMPLERS.get(args.sampler)
    study.sampler = make(sampler_seed(args.seed, 0, args.worker))
    root = Path(cfg.log.out_dir) / "sweeps" / args.name
    if not args.export_only:
        objective = Objective(evaluate_fn, cfg, space, targets, study_name=args.name, root=root)
        ran = run_sweep(study, objective, args.n_trials, progress=not args.no_progress,
                        sampler_for=lambda number: make(sampler_seed(args.seed, number, args.worker)))
        print(f"sweep {args.name}: ran {ran} trial(s); {count_finished(study)} finished in total")
    for key, path in export_study(study, targets, root, plots=not args.no_plots).items():
        print(f"{key}: {path}")
    return 0


def _baseline_overrides(items: Optional[Sequence[str]]) -> Optional[dict[str, Any]]:
    if not items:
        return None
    cfg = apply_overrides(RunConfig(), list(items))
    keys = [item.split("=", 1)[0].strip() for item in items]
    return {key: flatten(cfg)[key] for key in keys}
