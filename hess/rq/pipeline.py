"""One evaluation run: config → model, scenes → scores (cached calibration) → allocate → sparsify → measure.

    pipe = Pipeline(cache_dir="ablations/outputs/cache")
    result = pipe.evaluate(apply_overrides(RunConfig(), ["budget.keep_ratio=0.27"]))
    result.metrics          # {"synthetic/auc30": …, "perf/realized_density": …, "perf/latency_ms": …}
    run_tracked(pipe, cfg, experiment="rq2")   # the same, recorded in a run directory + W&B run

    run_config(cfg, cache)  # the sweep objective's signature (sweeps/objective.py): metrics only

Metric keys: ``<dataset>/<metric>`` (auc30, auc15, rra15, rta15, rra30, rta30, chamfer, point_err,
chamfer_f0, abs_rel), ``perf/realized_density`` (kept fraction of the patch–patch score matrix; 1 for dense),
``perf/realized_density_sinks`` (SparseVGGT's convention), ``perf/latency_ms`` (median end-to-end),
``perf/global_attn_ms`` (global-attention cores of the same forwards), ``budget/blocks_per_layer``
(realised key blocks per layer and query row, summed over heads) and ``budget/wasted_fraction``.
Per-scene rows carry every metric of the scene (with its realised density, its n_k ``budget/num_key_blocks``
and its category in ``scene.category``); rows with ``scene_id="all"`` hold the aggregates (pose: VGGT's
per-category mean of AUCs pooled per category; the rest averaged over scenes; ``PROTOCOLS``).
Budgets are allocated per sequence: each scene's n_k (frame count × aspect ratio) gets its own allocation.
``budget/wasted_fraction`` is negative where the allocation exceeds its budget; ``<dataset>/pairs``: frame pairs
scored per scene.  ``eval.timing=false`` skips the timing forwards of accuracy runs (latency NaN).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from hess.config import RunConfig, flatten
from hess.results import DENSITY_KEY, LATENCY_KEY, Record
from hess.rq.measure import PROTOCOLS, Layout, category_pose, nanmean, realized, scene_metrics, time_forward
from hess.rq.resources import Resources

GLOBAL_ATTN_KEY = "perf/global_attn_ms"
SINKS_KEY = "perf/realized_density_sinks"
ALL_SCENES = "all"
PAIRS = "pairs"  # <dataset>/pairs: frame pairs scored in a scene (weights of the pooled-AUC bootstrap)
#: sections that do not change a dense run (normalised away so a dense baseline runs once per grid)
_DENSE_IRRELEVANT = ("score", "budget", "calib")


@dataclass
class EvalResult:
    """What one evaluation produced.

    Attributes:
        metrics: aggregate metrics (keys in the module docstring).
        rows: per-scene and aggregate rows ``(scene_id, metric, value, realized_density, latency_ms)``.
        blocks: [L, H] key blocks per head (None for dense), with ``num_key_blocks`` n_k.
        info: model weights origin, layout, whether calibration was computed or read from cache.
    """

    metrics: dict[str, float]
    rows: list[tuple[str, str, float, Optional[float], Optional[float]]]
    blocks: Optional[Tensor] = None
    num_key_blocks: Optional[int] = None
    info: dict[str, Any] = field(default_factory=dict)

    def records(self, run_id: str, cfg: RunConfig, extra: Optional[Mapping[str, Any]] = None) -> list[Record]:
        """Tidy Records of ``rows`` carrying the flattened config (+ ``extra`` dotted keys)."""
        flat = {**flatten(cfg), **dict(extra or {})}
        keep = None if cfg.sparse.method == "dense" else cfg.budget.keep_ratio
        cats = self.info.get("categories", {})
        return [Record(run_id, scene, metric, value, keep_ratio=keep, realized_density=density, latency_ms=latency,
                       config={**flat, "scene.category": cats.get(scene, ALL_SCENES)})
                for scene, metric, value, density, latency in self.rows]


def canonical(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the fields its method ignores at their defaults, so identical runs share one hash.

    Dense: score, budget and calibration.  Uniform / random scorers: calibration and the HeSS read-out
    (λ, normalisation; random keeps its seed).  A dense baseline or a uniform run in a λ grid runs once.
    """
    defaults = RunConfig()
    if cfg.sparse.method == "dense":
        return dataclasses.replace(cfg, **{name: getattr(defaults, name) for name in _DENSE_IRRELEVANT})
    if cfg.score.scorer in ("uniform", "random"):
        seed = cfg.score.seed if cfg.score.scorer == "random" else defaults.score.seed
        score = dataclasses.replace(defaults.score, scorer=cfg.score.scorer, seed=seed)
        return dataclasses.replace(cfg, score=score, calib=defaults.calib)
    return cfg


class Pipeline:
    """The evaluation pipeline holding loaded state (see ``Resources``) across runs of one process."""

    def __init__(self, cache_dir: Optional[str | Path] = None, *, progress: bool = True,
                 resources: Optional[Resources] = None) -> None:
        self.resources = resources or Resources(cache_dir, progress=progress)

    def plan(self, cfg: RunConfig, scene: Any = None) -> tuple[Optional[Tensor], Optional[int], Layout]:
        """[L, H] block budgets for ``cfg`` on ``scene`` (None for dense), n_k and the sequence layout.

        The allocation is recomputed for each sequence's n_k (cached per n_k), so every sequence, whatever its
        frame count and aspect ratio, realises the target keep ratio.  scene None: the first evaluation scene.
        """
        from hess.budget import allocate

        scene = scene if scene is not None else self.resources.eval_scenes(cfg.data)[0]
        layout = self.resources.scene_layout(cfg.model, scene)
        if cfg.sparse.method == "dense":
            return None, None, layout
        n_k = layout.num_key_blocks(cfg.sparse.k_block)
        if cfg.budget.min_blocks > n_k:
            raise ValueError(f"budget.min_blocks={cfg.budget.min_blocks} exceeds the {n_k} key blocks of sequence "
                             f"{scene.scene_id} ({layout.num_patches} patches / sparse.k_block={cfg.sparse.k_block})")
        scores = self.resources.scores(cfg)
        key = repr(("allocation", cfg.model, cfg.score, cfg.calib, cfg.budget, cfg.sparse.k_block, n_k))
        blocks = self.resources._get(key, lambda: allocate(scores, cfg.budget.keep_ratio, n_k,
                                                           min_blocks=cfg.budget.min_blocks,
                                                           capping=cfg.budget.capping, scope=cfg.budget.scope))
        return blocks, n_k, layout

    @contextlib.contextmanager
    def attention(self, cfg: RunConfig, scene: Any = None
                  ) -> Iterator[tuple[torch.nn.Module, Optional[Tensor], Optional[int], Layout]]:
        """The model with ``cfg``'s attention sparsified per its plan for ``scene`` (default: the first
        evaluation scene), dense again on exit, even on error."""
        from hess.patch import SparsePlan, densify, sparsify

        model, _ = self.resources.model(cfg.model)
        blocks, n_k, layout = self.plan(cfg, scene)
        if blocks is not None:
            sparsify(model, SparsePlan(blocks_per_head=blocks, q_block=cfg.sparse.q_block, k_block=cfg.sparse.k_block,
                                       cdf_threshold=cfg.sparse.cdf_threshold, backend=cfg.sparse.backend))
        try:
            yield model, blocks, n_k, layout
        finally:
            densify(model)

    def interleaved_timings(self, cfgs: Sequence[RunConfig], *, warmup: int, repeats: int,
                            progress: bool = False) -> list[dict[str, dict[str, float]]]:
        """Time several configs side by side: each round times one forward of every config on every scene.

        A busy or throttling machine then slows every method alike.  Returns, per config, scene id ->
        {"latency_ms": median end-to-end, "global_attn_ms": median global-attention time} over ``repeats``
        rounds (after ``warmup`` rounds).
        """
        from tqdm.auto import tqdm

        cfgs = [canonical(c) for c in cfgs]
        samples: list[dict[str, dict[str, list]]] = [{} for _ in cfgs]
        for r in tqdm(range(warmup + repeats), desc="latency rounds", disable=not progress):
            for i, cfg in enumerate(cfgs):
                for scene in self.resources.eval_scenes(cfg.data):
                    with self.attention(cfg, scene) as (model, *_):
                        t = time_forward(model, scene, warmup=0, repeats=1)
                        if r >= warmup:
                            slot = samples[i].setdefault(scene.scene_id, {"latency_ms": [], "global_attn_ms": []})
                            for key in slot:
                                slot[key].append(t[key])
        return [{sid: {k: statistics.median(v) for k, v in slot.items()} for sid, slot in s.items()} for s in samples]

    def evaluate(self, cfg: RunConfig, timings: Optional[Mapping[str, Mapping[str, float]]] = None) -> EvalResult:
        """Run ``cfg`` end to end; the model is restored to dense attention afterwards, even on error.

        Args:
            timings: scene id -> {"latency_ms", "global_attn_ms"} measured elsewhere (``interleaved_timings``);
                None: timed here (``eval.latency_warmup`` + ``eval.latency_repeats`` forwards per scene).
        """
        cfg = canonical(cfg)
        _, info = self.resources.model(cfg.model)
        scenes = self.resources.eval_scenes(cfg.data)
        if not scenes:
            raise ValueError(f"no evaluation scenes for {cfg.data}")
        computed_before = self.resources.calibrations_computed
        prefix = cfg.data.dataset
        rows, errors, per_scene, plans = [], [], [], {}
        for scene in scenes:
            with self.attention(cfg, scene) as (model, blocks, n_k, layout):
                rows_s, values, pairs = self._measure_scene(model, scene, cfg, timings)
            plans[scene.scene_id] = (blocks, n_k, layout)
            if blocks is not None:
                budget = self._budget_metrics(blocks, n_k, cfg)
                budget["budget/num_key_blocks"] = float(n_k)
                rows_s += [(scene.scene_id, k, v, values[DENSITY_KEY], values[LATENCY_KEY]) for k, v in budget.items()]
                values.update(budget)
            rows += rows_s
            errors.append(pairs)
            per_scene.append(values)
        keys = dict.fromkeys(k for v in per_scene for k in v)
        metrics = {key: nanmean([v.get(key, math.nan) for v in per_scene]) for key in keys}
        pose, per_category = category_pose(errors, [s.category for s in scenes])
        metrics.update({f"{prefix}/{k}": v for k, v in pose.items()})
        rows += [(ALL_SCENES, k, v, metrics[DENSITY_KEY], metrics[LATENCY_KEY]) for k, v in metrics.items()]
        blocks, n_k, layout = plans[scenes[0].scene_id]
        info = {**info, "layout": dataclasses.asdict(layout), "num_key_blocks": n_k,
                "calibrated": self.resources.calibrations_computed > computed_before,
                "layouts": {sid: dataclasses.asdict(p[2]) for sid, p in plans.items()},
                "num_key_blocks_per_scene": {sid: p[1] for sid, p in plans.items()},
                "categories": {s.scene_id: s.category for s in scenes},
                "pose_per_category": per_category, "protocol": PROTOCOLS.get(prefix, "")}
        return EvalResult(metrics, rows, blocks, n_k, info)

    def _measure_scene(self, model: torch.nn.Module, scene: Any, cfg: RunConfig,
                       timings: Optional[Mapping[str, Mapping[str, float]]]) -> tuple[list, dict[str, float], tuple]:
        """Rows, values and pose pair errors of one scene under the model's current attention."""
        prefix = cfg.data.dataset
        if timings is not None:
            timing = timings[scene.scene_id]
        elif cfg.eval.timing:
            timing = time_forward(model, scene, warmup=cfg.eval.latency_warmup, repeats=cfg.eval.latency_repeats)
        else:
            timing = {"latency_ms": math.nan, "global_attn_ms": math.nan}
        values, pairs = scene_metrics(model, scene, cfg.eval.metrics, cfg.eval.icp_threshold)
        density, sinks = realized(model) or (1.0, 1.0)
        scene_values = {**{f"{prefix}/{k}": v for k, v in values.items()}, f"{prefix}/{PAIRS}": float(pairs[0].numel()),
                        DENSITY_KEY: density,
                        SINKS_KEY: sinks, LATENCY_KEY: timing["latency_ms"], GLOBAL_ATTN_KEY: timing["global_attn_ms"]}
        rows = [(scene.scene_id, k, v, density, timing["latency_ms"]) for k, v in scene_values.items()]
        return rows, scene_values, pairs

    @staticmethod
    def _budget_metrics(blocks: Tensor, n_k: int, cfg: RunConfig) -> dict[str, float]:
        from hess.budget import budget_report

        report = budget_report(blocks, cfg.budget.keep_ratio, n_k, min_blocks=cfg.budget.min_blocks)
        return {"budget/blocks_per_layer": float(report["realized_per_layer"].double().mean()),
                "budget/wasted_fraction": float(report["wasted_per_layer"].sum()) / max(float(report["budget_total"]), 1.0)}


def run_config(cfg: RunConfig, cache: dict) -> dict[str, float]:
    """The sweep objective's pipeline (``sweeps/objective.py``): evaluate ``cfg``, return its metrics.

    ``cache`` keeps one ``Pipeline`` (models, scenes, score artifacts) across the trials of a process;
    calibration artifacts are also cached on disk under ``<log.out_dir>/cache``.
    """
    pipe = cache.get("pipeline")
    if pipe is None:
        pipe = cache["pipeline"] = Pipeline(Path(cfg.log.out_dir) / "cache")
    return pipe.evaluate(cfg).metrics


def run_tracked(pipe: Pipeline, cfg: RunConfig, *, experiment: Optional[str] = None, root: Optional[str | Path] = None,
                extra: Optional[Mapping[str, Any]] = None, group: Optional[str] = None,
                timings: Optional[Mapping[str, Mapping[str, float]]] = None) -> tuple[Path, EvalResult]:
    """Evaluate ``cfg`` inside a tracked run (run directory + W&B run, closed even on failure).

    The run directory gets metrics.json, records.parquet/.csv (per-scene + ``all`` rows carrying the
    flattened config and ``extra`` dotted keys such as ``rq.method``), ``tables/allocation.csv``
    ([L, H] key blocks per head) and meta.json with the model's weights origin.
    ``timings``: per-scene times measured side by side with other configs (``Pipeline.interleaved_timings``).
    Returns:
        (run directory, result).
    """
    import pandas as pd

    from hess.tracking import track_run

    cfg = canonical(cfg)
    with track_run(cfg, experiment=experiment, root=root, group=group, extra_config=dict(extra or {})) as run:
        result = pipe.evaluate(cfg, timings)
        run.dir.update_meta(model_weights=result.info.get("weights"), model_source=result.info.get("source"),
                            calibrated=result.info.get("calibrated"), layout=result.info.get("layout"),
                            layouts=result.info.get("layouts"), protocol=result.info.get("protocol"),
                            num_key_blocks_per_scene=result.info.get("num_key_blocks_per_scene"),
                            pose_per_category=result.info.get("pose_per_category"),
                            notes=list(pipe.resources.notes))  # e.g. calib.allow_model_mismatch used
        run.log_metrics({k: v for k, v in result.metrics.items() if not math.isnan(v)})
        run.log_records(result.records(run.run_id, cfg, extra))
        if result.blocks is not None:
            frame = pd.DataFrame(result.blocks.numpy(), columns=[f"H{h}" for h in range(result.blocks.shape[1])])
            run.log_table("allocation", frame.assign(layer=range(len(frame)), num_key_blocks=result.num_key_blocks))
    return run.dir.path, result
