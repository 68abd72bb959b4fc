"""RQ1: are global-attention heads heterogeneous in their sensitivity to sparsification?

    run_dir = run_rq1(pipe, exp, root="…/runs", extra={"rq.name": "rq1_heterogeneity"})
    report = REPORTS.get("rq1_heterogeneity")(rows)      # from the stored rows only

The run computes, on the calibration scenes, per-head score tables ``[L, H]``: HeSS_cam (λ = 1), HeSS_pc
(λ = 0), the λ-mixed HeSS, every scorer of the experiment's variants, and the ``oracle``: the measured
increase of the calibration error when that head alone keeps ``oracle_keep_ratio`` of its key blocks
(all other heads dense).  Each table is stored as tidy rows ``metric = "score/<table>"``,
``scene_id = "GA{l}-H{h}"`` with ``head.layer`` / ``head.index`` columns.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hess.config import RunConfig, apply_overrides, flatten
from hess.experiment import Experiment
from hess.results import Record
from hess.rq.tables import REPORTS, Report, add_figure, finish, markdown_table

SCORE_PREFIX = "score/"


def oracle_scores(pipe: Any, cfg: RunConfig, keep_ratio: float, progress: bool = True) -> Tensor:
    """Signed ``Δe[l, h]``: mean over calibration scenes of e(head (l, h) alone at ``keep_ratio``) − e(all dense).

    ``hess.scorers.oracle_sensitivity`` with the run's block sizes (``sparse.q_block`` / ``k_block``),
    backend, ``budget.min_blocks`` and the λ-mixed calibration error (``hess.calibrate.calibration_error_fn``).
    [L, H] float64.
    """
    from hess.calibrate import calibration_error_fn
    from hess.rq.resources import calib_config
    from hess.scorers import oracle_sensitivity

    model, _ = pipe.resources.model(cfg.model)
    scenes = pipe.resources.calib_scenes(cfg.data, cfg.calib)
    error = calibration_error_fn(calib_config(cfg.calib, progress=False, device=pipe.resources.device_type(cfg.model)),
                                 lam=cfg.score.lam)
    return oracle_sensitivity(model, scenes, error, keep_ratio, min_blocks=cfg.budget.min_blocks,
                              q_block=cfg.sparse.q_block, k_block=cfg.sparse.k_block, backend=cfg.sparse.backend,
                              progress=progress)


def score_tables(pipe: Any, exp: Experiment, progress: bool = True) -> dict[str, Tensor]:
    """Name -> [L, H] tables: hess_cam, hess_pc, hess (λ-mixed), each variant's scorer, oracle."""
    cfg = exp.config
    traces = pipe.resources.head_scores(cfg)
    tables = {"hess_cam": traces.hess(lam=1.0, proj=cfg.calib.proj), "hess_pc": traces.hess(lam=0.0, proj=cfg.calib.proj),
              "hess": traces.hess(lam=cfg.score.lam, proj=cfg.calib.proj, normalize=cfg.score.normalize)}
    for name, overrides in exp.variants.items():
        if name not in tables:
            tables[name] = pipe.resources.scores(apply_overrides(cfg, overrides))
    keep = float(exp.runner.get("oracle_keep_ratio", 0.1))
    tables["oracle"] = oracle_scores(pipe, apply_overrides(cfg, {"budget.keep_ratio": keep}), keep, progress)
    return {k: v.detach().to("cpu", torch.float64) for k, v in tables.items()}


def run_rq1(pipe: Any, exp: Experiment, *, root: Path, extra: Mapping[str, Any], progress: bool = True) -> Path:
    """Compute the score tables inside one tracked run; returns its directory."""
    from hess.tracking import track_run

    cfg = exp.config
    with track_run(cfg, experiment=exp.name, root=root, extra_config=dict(extra)) as run:
        tables = score_tables(pipe, exp, progress)
        keep = float(exp.runner.get("oracle_keep_ratio", 0.1))
        flat = {**flatten(cfg), **dict(extra)}
        records = []
        for name, table in tables.items():
            for l in range(table.shape[0]):
                for h in range(table.shape[1]):
                    records.append(Record(run.run_id, f"GA{l}-H{h}", SCORE_PREFIX + name, float(table[l, h]),
                                          keep_ratio=keep if name == "oracle" else None,
                                          config={**flat, "rq.method": name, "head.layer": l, "head.index": h}))
        run.log_records(records)
        _, info = pipe.resources.model(cfg.model)
        run.dir.update_meta(model_weights=info["weights"], model_source=info["source"])
    return run.dir.path


# ---------------------------------------------------------------------------------------------- report
def tables_from_rows(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Rebuild the [L, H] tables from stored rows (score/<name>, head.layer, head.index)."""
    rows = df[df["metric"].astype(str).str.startswith(SCORE_PREFIX)]
    if rows.empty:
        raise ValueError("no score/<table> rows: not an RQ1 run")
    out = {}
    for metric, part in rows.groupby("metric", sort=False):
        grid = part.pivot_table(index="head.layer", columns="head.index", values="value", aggfunc="mean")
        out[str(metric)[len(SCORE_PREFIX):]] = grid.sort_index().sort_index(axis=1).to_numpy(dtype=float)
    return out


@REPORTS.register("rq1_heterogeneity")
def rq1(df: pd.DataFrame) -> Report:
    """Dispersion per table, rank agreement with the oracle, most/least sensitive heads; heatmaps."""
    from hess.plots import (coefficient_of_variation, dispersion_bars, extreme_heads_table, gini, head_heatmap,
                            hess_heatmaps, rank_correlation_matrix, rank_correlations)

    tables = tables_from_rows(df)
    lam = float(df["score.lam"].dropna().iloc[0]) if "score.lam" in df else 0.5
    keep = df.loc[df["metric"] == SCORE_PREFIX + "oracle", "keep_ratio"].dropna()
    disp_rows, long_rows = [], []
    for name in ("hess_cam", "hess_pc", "hess", "oracle"):
        if name not in tables:
            continue
        t = tables[name] if name != "oracle" else np.clip(tables[name], 0.0, None)
        cv, g = coefficient_of_variation(t), gini(t)
        median = np.median(t, axis=1)
        ratio = np.where(median > 0, np.max(t, axis=1) / np.where(median > 0, median, 1.0), np.nan)
        disp_rows.append({"table": name, "mean CV": float(np.nanmean(cv)), "max CV": float(np.nanmax(cv)),
                          "mean Gini": float(np.nanmean(g)), "mean max/median": float(np.nanmean(ratio)) if np.isfinite(ratio).any() else np.nan})
        long_rows += [{"table": name, "global_layer": l, "cv": float(cv[l]), "gini": float(g[l])} for l in range(len(cv))]
    dispersion = pd.DataFrame(disp_rows)
    parts = [f"**Per-layer dispersion** (coefficient of variation and Gini over the heads of a layer, averaged over "
             f"layers; the oracle is clamped at 0). HeSS λ = {lam:g}.", markdown_table(dispersion)]
    agreement = pd.DataFrame()
    if "oracle" in tables and len(tables) > 1:
        corr = rank_correlations(tables)
        names = [n for n in tables if n != "oracle"]
        agreement = pd.DataFrame({"scorer": names, "Spearman ρ vs oracle (pooled)": [corr["pooled"].loc[n, "oracle"] for n in names],
                                  "Spearman ρ vs oracle (mean per layer)": [corr["per_layer"].loc[n, "oracle"] for n in names]})
        parts += [f"**Rank agreement with the oracle** (one head alone at keep ratio {keep.iloc[0]:g}, measured "
                  "increase of the calibration error; n/a = constant table)", markdown_table(agreement)]
    top = extreme_heads_table(tables["hess"], k=min(5, tables["hess"].size))
    parts += [f"**Most / least sensitive heads by HeSS (λ = {lam:g})**, 0-based `GA{{layer}}-H{{head}}`",
              markdown_table(top[["group", "rank", "head_label", "score"]], digits=4)]
    figures, notes = {}, []
    add_figure(figures, notes, "hess_heatmaps", lambda: hess_heatmaps(tables["hess_cam"], tables["hess_pc"], tables["hess"], lam))
    add_figure(figures, notes, "dispersion", lambda: dispersion_bars(tables["hess"]))
    if "oracle" in tables:
        add_figure(figures, notes, "oracle", lambda: head_heatmap(tables["oracle"], title="oracle: Δ calibration error, one head sparsified",
                                                                      cbar_label="Δ error (normalised units²)"))
    if len(tables) > 1:
        add_figure(figures, notes, "rank_correlation", lambda: rank_correlation_matrix(tables))
    csv = pd.concat([pd.DataFrame(long_rows).assign(kind="dispersion"),
                     agreement.assign(kind="agreement")], ignore_index=True)
    return Report(finish(parts, notes), csv, figures)
