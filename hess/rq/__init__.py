"""The ablation suite's experiment engine: one evaluation run per config, and the RQ1–RQ5 runners.

    from hess.rq import Pipeline
    pipe = Pipeline()                                    # holds models, scenes, score artifacts
    result = pipe.evaluate(cfg)                          # calibrate (cached) → score → allocate → sparsify → evaluate
    result.metrics["synthetic/auc30"], result.records    # aggregates and per-scene tidy rows

- ``resources``: model, scenes, calibration artifacts and head scores, cached by what determines them.
- ``measure``: per-scene metrics, realised density, end-to-end and global-attention time.
- ``pipeline``: ``Pipeline.evaluate(cfg)``, ``run_config(cfg, cache)`` (sweeps), ``run_tracked`` (run dirs).
- ``runners``: the RQ registry used by ``hess reproduce``; ``heterogeneity``: RQ1's score tables and oracle.
- ``tables``: tables and plots of each experiment from stored rows (``hess report``).
- ``command``: ``hess evaluate`` / ``ablations/run.py`` (one config in a tracked run, ``--dry-run``).
"""
from hess.rq.pipeline import EvalResult, Pipeline, run_config, run_tracked
from hess.rq.resources import ModelUnavailableError

__all__ = ["EvalResult", "ModelUnavailableError", "Pipeline", "run_config", "run_tracked"]
