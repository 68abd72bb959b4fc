"""The experiment runners behind ``hess reproduce``: one per research question, one signature.

    exp = experiment("rq2", preset="demo")                     # ablations/configs/rq2_sparsity.yaml + sizing
    outcome = RUNNERS.get("rq2")(pipe, exp, root=runs_root, extra={...})

A runner executes the experiment's runs (each a tracked run directory whose records carry ``rq.name``
and ``rq.method``) and returns an ``Outcome``; tables and plots are made afterwards from the stored
rows by ``hess.report``.  ``rq5`` returns ``Outcome(skipped=reason)`` when no trained π³ is available,
instead of numbers from random weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hess.config import apply_overrides, config_hash
from hess.experiment import Experiment, load_experiment
from hess.registry import Registry
from hess.rq.pipeline import Pipeline, canonical, run_tracked
from hess.rq.resources import ModelUnavailableError

CONFIG_FILES = {"rq1": "rq1_heterogeneity", "rq2": "rq2_sparsity", "rq3": "rq3_baselines", "rq4": "rq4_lambda",
                "rq5": "rq5_pi3", "latency": "latency"}
ORDER = ("rq1", "rq2", "rq3", "rq4", "rq5", "latency")

#: Sizing applied on top of an experiment file's preset.  ``demo``: the embedded model's resolution
#: (84×84, 4 frames) and key blocks of 6 patches (one patch row, so n_k = 24 per sequence); the number of
#: evaluation scenes is each experiment file's (``presets.demo.overrides``): RQ3 uses 160 held-out scenes,
#: sized so that the paired 95% CI of ΔAUC@30 (HeSS − uniform, keep 0.27) has half-width <= 0.02 (a pilot
#: of 96 scenes gave a per-scene Δ sd of 0.115, so n ≈ (1.96 · 0.115 / 0.02)² ≈ 127), RQ2 / RQ4 use 48.
#: ``micro``: the demo preset shrunk for tests (one or two tiny scenes).
SIZING: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": ("demo", {"data.height": 84, "data.width": 84, "data.num_frames": 4,
                      "calib.num_frames": 4, "sparse.q_block": 12, "sparse.k_block": 6}),
    "paper": ("paper", {}),
    "micro": ("demo", {"data.height": 42, "data.width": 42, "data.num_frames": 2, "data.num_scenes": 1,
                       "calib.num_frames": 2, "calib.num_scenes": 1, "sparse.q_block": 3, "sparse.k_block": 2,
                       "eval.latency_warmup": 0, "eval.latency_repeats": 1}),
}


@dataclass
class Outcome:
    """What a runner did: run directories written, or the reason it measured nothing."""

    run_dirs: list[Path] = field(default_factory=list)
    skipped: Optional[str] = None


Runner = Callable[..., Outcome]
RUNNERS: Registry[Runner] = Registry("research question")


def configs_dir() -> Path:
    """``ablations/configs`` of this checkout."""
    import hess

    return Path(hess.__file__).resolve().parents[1] / "ablations" / "configs"


def experiment(rq: str, preset: str, overrides: Sequence[str] | Mapping[str, Any] = (),
               directory: Optional[Path] = None) -> Experiment:
    """The experiment file of ``rq`` resolved for ``preset`` (``SIZING``), then ``overrides`` applied."""
    if rq not in CONFIG_FILES:
        raise ValueError(f"unknown research question {rq!r}; known: {', '.join(CONFIG_FILES)}")
    if preset not in SIZING:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(SIZING)}")
    file_preset, sizing = SIZING[preset]
    path = (directory or configs_dir()) / f"{CONFIG_FILES[rq]}.yaml"
    exp = load_experiment(path, file_preset)
    cfg = apply_overrides(apply_overrides(exp.config, sizing), overrides)
    return dataclasses.replace(exp, config=cfg, preset=preset)


def seeds_of(exp: Experiment) -> dict[str, list[int]]:
    """``runner.seeds`` of the experiment file: variant -> ``score.seed`` values (a stochastic method
    runs once per seed; ``{random: 5}`` means seeds 0..4).  Variants not listed run once."""
    raw = exp.runner.get("seeds", {}) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{exp.name}: runner.seeds must map variant -> number of seeds or list of seeds, got {raw!r}")
    unknown = sorted(set(raw) - set(exp.variants))
    if unknown:
        raise ValueError(f"{exp.name}: runner.seeds names unknown variants {unknown}; variants: {sorted(exp.variants)}")
    return {str(k): list(range(int(v))) if isinstance(v, int) else [int(s) for s in v] for k, v in raw.items()}


def _runs(exp: Experiment) -> list[tuple[str, Any]]:
    """(variant, config) of every distinct run: a dense baseline runs once, not once per grid point;
    a variant of ``runner.seeds`` runs once per seed (``score.seed``)."""
    seen, todo = set(), []
    seeds = seeds_of(exp)
    for variant, _, cfg in exp.configs():
        for seed in seeds.get(variant, [None]):
            run = canonical(cfg if seed is None else apply_overrides(cfg, {"score.seed": seed}))
            key = (variant, config_hash(run))
            if key not in seen:
                seen.add(key)
                todo.append((variant, run))
    return todo


def run_grid(pipe: Pipeline, exp: Experiment, *, root: Path, extra: Mapping[str, Any], progress: bool = True) -> Outcome:
    """Every variant × grid point of ``exp`` as a tracked run (progress bar over runs)."""
    from tqdm.auto import tqdm

    outcome = Outcome()
    todo = _runs(exp)
    bar = tqdm(todo, desc=f"{exp.name}: {len(todo)} runs", unit="run", disable=not progress)
    for variant, cfg in bar:
        bar.set_postfix_str(f"{variant} keep={cfg.budget.keep_ratio:g} seed={cfg.score.seed}" if cfg.sparse.method != "dense"
                            else variant)
        path, _ = run_tracked(pipe, cfg, experiment=exp.name, root=root, extra={**extra, "rq.method": variant},
                              group=str(extra.get("rq.session", exp.name)))
        outcome.run_dirs.append(path)
    return outcome


def _grid_runner(pipe: Pipeline, exp: Experiment, *, root: Path, extra: Mapping[str, Any], progress: bool = True) -> Outcome:
    return run_grid(pipe, exp, root=root, extra=extra, progress=progress)


@RUNNERS.register("latency")
def _latency(pipe: Pipeline, exp: Experiment, *, root: Path, extra: Mapping[str, Any], progress: bool = True) -> Outcome:
    """Every method and keep ratio timed side by side (interleaved rounds), then evaluated and recorded."""
    from tqdm.auto import tqdm

    todo = _runs(exp)
    cfg = exp.config
    for _, c in todo:  # plans (calibration, scores) first, so that no timing round waits for them
        pipe.plan(c)
    timings = pipe.interleaved_timings([c for _, c in todo], warmup=cfg.eval.latency_warmup,
                                       repeats=cfg.eval.latency_repeats, progress=progress)
    outcome = Outcome()
    for (variant, c), timing in zip(tqdm(todo, desc=f"{exp.name}: record {len(todo)} runs", disable=not progress), timings):
        path, _ = run_tracked(pipe, c, experiment=exp.name, root=root, extra={**extra, "rq.method": variant},
                              group=str(extra.get("rq.session", exp.name)), timings=timing)
        outcome.run_dirs.append(path)
    return outcome


for _name in ("rq2", "rq3", "rq4"):
    RUNNERS.register(_name)(_grid_runner)


@RUNNERS.register("rq1")
def _rq1(pipe: Pipeline, exp: Experiment, *, root: Path, extra: Mapping[str, Any], progress: bool = True) -> Outcome:
    from hess.rq.heterogeneity import run_rq1

    return Outcome([run_rq1(pipe, exp, root=root, extra=extra, progress=progress)])


@RUNNERS.register("rq5")
def _rq5(pipe: Pipeline, exp: Experiment, *, root: Path, extra: Mapping[str, Any], progress: bool = True) -> Outcome:
    """π³: runs only with trained weights (``model.checkpoint`` or an embedded π³); otherwise says why not."""
    try:
        pipe.resources.model(exp.config.model)
    except ModelUnavailableError as err:
        return Outcome(skipped=f"no trained π³ is available, so RQ5 was not measured: {err}")
    return run_grid(pipe, exp, root=root, extra=extra, progress=progress)
