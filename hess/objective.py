"""The default objective of ``hess sweep``: one evaluation of the pipeline per trial, shipped in the package.

    from hess.objective import evaluate_metrics
    evaluate_metrics(cfg)                 # {"synthetic/auc30": …, "perf/realized_density": …, …}
    evaluate_metrics.metric_names(cfg)    # the keys it will return, known before any trial runs

``hess sweep --objective hess.objective:evaluate_metrics`` (the default) works outside a clone of the
repository; ``sweeps/objective.py`` is the editable example built on it (and the W&B program).
An objective is any ``(cfg) -> {metric: value}``; one that also has ``metric_names(cfg)`` lets
``hess sweep`` check ``--target`` before the first trial.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from hess.config import RunConfig
from hess.results import DENSITY_KEY, LATENCY_KEY

Pipeline = Callable[[RunConfig, dict], Mapping[str, float]]

#: per-dataset metrics of an evaluation (``hess.rq.measure.scene_metrics``), keys ``<dataset>/<name>``
SCENE_METRICS = ("auc30", "auc15", "rra15", "rta15", "rra30", "rta30", "chamfer", "point_err", "chamfer_f0", "abs_rel")
PERF_METRICS = (DENSITY_KEY, "perf/realized_density_sinks", LATENCY_KEY, "perf/global_attn_ms")
BUDGET_METRICS = ("budget/blocks_per_layer", "budget/wasted_fraction")  # sparse runs only


def pipeline_metric_names(cfg: RunConfig) -> set[str]:
    """The metric keys ``hess.rq.run_config(cfg, cache)`` returns for ``cfg``."""
    names = {f"{cfg.data.dataset}/{m}" for m in SCENE_METRICS} | set(PERF_METRICS)
    return names | (set(BUDGET_METRICS) if cfg.sparse.method == "sparse" else set())


class Evaluator:
    """``(cfg) -> {metric: value}`` holding loaded state across the trials of one process.

    Args:
        pipeline: ``(cfg, cache) -> metrics``; ``cache`` is a dict kept across calls where the pipeline
            keeps what is expensive to load (model, scenes, score artifacts).  Default:
            ``hess.rq.run_config`` (config -> calibrate (cached) -> allocate -> sparsify -> evaluate).
    """

    def __init__(self, pipeline: Optional[Pipeline] = None) -> None:
        self.pipeline = pipeline
        self.cache: dict[str, Any] = {}

    def __call__(self, cfg: RunConfig) -> dict[str, float]:
        if self.pipeline is None:
            from hess.rq import run_config

            self.pipeline = run_config
        return dict(self.pipeline(cfg, self.cache))

    def metric_names(self, cfg: RunConfig) -> Optional[set[str]]:
        """The keys a trial of ``cfg`` returns (None for a custom pipeline: known only after a trial)."""
        return pipeline_metric_names(cfg) if self.pipeline is None else None


evaluate_metrics = Evaluator()
