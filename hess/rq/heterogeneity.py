"""RQ1: are global-attention heads heterogeneous in their sensitivity to sparsification?

    run_dir = run_rq1(pipe, exp, root="…/runs", extra={"rq.name": "rq1_heterogeneity"})
    report = REPORTS.get("rq1_heterogeneity")(rows)      # from the stored rows only

The run computes, on the calibration scenes, per-head score tables ``[L, H]``: HeSS_cam (λ = 1), HeSS_pc
(λ = 0), the λ-mixed HeSS, the raw traces ``trace_cam`` / ``trace_pc`` (not normalised per layer), every
scorer of the experiment's variants, and the faithful oracle (``hess.scorers.oracle_deltas``): with one
head alone at a keep ratio and the dense model's alignment, inlier set and NN targets held fixed, the
measured ``oracle_cam`` = Δe_cam, ``oracle_pc`` = Δe_pc, ``oracle_chamfer`` = ΔChamfer, and ``oracle`` =
λ·norm(Δe_cam⁺) + (1−λ)·norm(Δe_pc⁺), normalised per layer exactly as HeSS is.  The oracle runs at
``runner.oracle_keep_ratio`` and at ``runner.eval_keep_ratio`` (tables suffixed ``@<keep>``).
Calibration stability (``hess.rq.stability``) is computed from the artifact's per-scene traces.
Score tables are stored as rows ``metric = "score/<table>"``, ``scene_id = "GA{l}-H{h}"`` (``head.layer``,
``head.index``); stability as ``stability/<name>`` rows.
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
STAB_PREFIX = "stability/"
ORACLE_ERRORS = ("cam", "pc", "chamfer")
N_PERM = 1000
#: (scorer table, oracle table) pairs that measure the same objective; pooled ρ only for the raw pairs
MATCHED = (("hess_cam", "oracle_cam"), ("hess_pc", "oracle_pc"), ("hess", "oracle"), ("hess_pc", "oracle_chamfer"),
           ("trace_cam", "oracle_cam"), ("trace_pc", "oracle_pc"))
POOLED_OK = {("trace_cam", "oracle_cam"), ("trace_pc", "oracle_pc")}  # both sides on one scale across layers


def normalized_per_layer(delta: Tensor) -> Tensor:
    """Δ⁺ / Σ_h Δ⁺ per layer (negative Δ clamped at 0; an all-zero layer stays 0). [L, H] → [L, H]."""
    d = delta.clamp_min(0.0)
    total = d.sum(dim=1, keepdim=True)
    return torch.where(total > 0, d / total.clamp_min(1e-300), torch.zeros_like(d))


def oracle_tables(pipe: Any, cfg: RunConfig, keep_ratio: float, progress: bool = True) -> dict[str, Tensor]:
    """``oracle_cam``, ``oracle_pc``, ``oracle_chamfer`` (signed Δ, fixed dense targets) and the mixed ``oracle``.

    The run's block sizes, backend and ``budget.min_blocks``; the calibration scenes and settings of HeSS.
    """
    from hess.calibrate import fixed_target_errors
    from hess.rq.resources import calib_config
    from hess.scorers import oracle_deltas

    model, _ = pipe.resources.model(cfg.model)
    scenes = pipe.resources.calib_scenes(cfg.data, cfg.calib)
    prepare, measure = fixed_target_errors(calib_config(cfg.calib, progress=False, device=pipe.resources.device_type(cfg.model)))
    delta = oracle_deltas(model, scenes, prepare, measure, keep_ratio, min_blocks=cfg.budget.min_blocks,
                          q_block=cfg.sparse.q_block, k_block=cfg.sparse.k_block, backend=cfg.sparse.backend,
                          progress=progress)
    lam = cfg.score.lam
    out = {f"oracle_{name}": delta[name] for name in ORACLE_ERRORS}
    out["oracle"] = lam * normalized_per_layer(delta["cam"]) + (1.0 - lam) * normalized_per_layer(delta["pc"])
    return out


def oracle_keeps(exp: Experiment) -> list[float]:
    """The oracle's keep ratios: ``runner.oracle_keep_ratio`` (0.1) and ``runner.eval_keep_ratio`` (if other)."""
    keeps = [float(exp.runner.get("oracle_keep_ratio", 0.1))]
    extra = exp.runner.get("eval_keep_ratio")
    if extra is not None and float(extra) not in keeps:
        keeps.append(float(extra))
    return keeps


def score_tables(pipe: Any, exp: Experiment, progress: bool = True) -> dict[str, Tensor]:
    """Name -> [L, H] tables: HeSS (cam, pc, mixed), raw traces, each variant's scorer, the oracle tables."""
    cfg = exp.config
    traces = pipe.resources.head_scores(cfg)
    proj = cfg.calib.proj
    tables = {"hess_cam": traces.hess(lam=1.0, proj=proj), "hess_pc": traces.hess(lam=0.0, proj=proj),
              "hess": traces.hess(lam=cfg.score.lam, proj=proj, normalize=cfg.score.normalize),
              "trace_cam": traces.trace("cam", proj), "trace_pc": traces.trace("pc", proj)}
    for name, overrides in exp.variants.items():  # generic: every scorer named in the experiment file
        if name not in tables:
            tables[name] = pipe.resources.scores(apply_overrides(cfg, overrides))
    for i, keep in enumerate(oracle_keeps(exp)):
        suffix = "" if i == 0 else f"@{keep:g}"
        oracle = oracle_tables(pipe, apply_overrides(cfg, {"budget.keep_ratio": keep}), keep, progress)
        tables.update({name + suffix: table for name, table in oracle.items()})
    return {k: v.detach().to("cpu", torch.float64) for k, v in tables.items()}


def stability_rows(pipe: Any, exp: Experiment) -> tuple[dict[str, np.ndarray], dict[str, float], pd.DataFrame]:
    """(per-head share CI tables, scalar stability numbers, scenes-needed curve) of RQ1's calibration."""
    from hess.rq.stability import bootstrap_tables, scenes_needed, stability

    cfg = exp.config
    keep = float(exp.runner.get("eval_keep_ratio", 0.27))
    traces = pipe.resources.head_scores(cfg)
    n_k = pipe.resources.layout(cfg.model, cfg.data).num_key_blocks(cfg.sparse.k_block)
    kw = {"lam": cfg.score.lam, "proj": cfg.calib.proj, "normalize": cfg.score.normalize}
    boot = bootstrap_tables(traces, n_boot=int(exp.runner.get("stability_boot", 500)), **kw)
    st = stability(boot, traces.hess(**kw).numpy(), keep_ratio=keep, num_key_blocks=n_k,
                   min_blocks=cfg.budget.min_blocks)
    scalars = {k: float(v) for k, v in st.items() if not isinstance(v, np.ndarray)}
    scalars.update(calib_scenes=float(traces.num_scenes), keep_ratio=keep, num_key_blocks=float(n_k))
    pool = int(exp.runner.get("stability_pool", traces.num_scenes))
    pool_traces = traces if pool <= traces.num_scenes else pipe.resources.head_scores(
        apply_overrides(cfg, {"calib.num_scenes": pool}))
    sizes = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= pool // 2] + [pool]  # subsets of at most half the pool
    curve = scenes_needed(pool_traces, sizes, keep_ratio=keep, num_key_blocks=n_k, min_blocks=cfg.budget.min_blocks, **kw)
    return {"share_low": st["share_low"], "share_high": st["share_high"]}, scalars, curve


def run_rq1(pipe: Any, exp: Experiment, *, root: Path, extra: Mapping[str, Any], progress: bool = True) -> Path:
    """Compute the score tables and the stability inside one tracked run; returns its directory."""
    from hess.tracking import track_run

    cfg = exp.config
    with track_run(cfg, experiment=exp.name, root=root, extra_config=dict(extra)) as run:
        tables = score_tables(pipe, exp, progress)
        keeps = oracle_keeps(exp)
        flat = {**flatten(cfg), **dict(extra)}
        records = []

        def head_rows(prefix: str, name: str, table: Any, keep: Any) -> None:
            t = np.asarray(table, dtype=float)
            for l in range(t.shape[0]):
                for h in range(t.shape[1]):
                    records.append(Record(run.run_id, f"GA{l}-H{h}", prefix + name, float(t[l, h]), keep_ratio=keep,
                                          config={**flat, "rq.method": name, "head.layer": l, "head.index": h}))

        for name, table in tables.items():
            keep = (float(name.rpartition("@")[2]) if "@" in name else keeps[0]) if name.startswith("oracle") else None
            head_rows(SCORE_PREFIX, name, table.numpy(), keep)
        shares, scalars, curve = stability_rows(pipe, exp)
        for name, table in shares.items():
            head_rows(STAB_PREFIX, name, table, scalars["keep_ratio"])
        for name, value in scalars.items():
            records.append(Record(run.run_id, "all", STAB_PREFIX + name, value, config={**flat, "rq.method": "stability"}))
        for row in curve.itertuples(index=False):
            for col in ("rank_rho", "alloc_changed", "heads_changed"):
                records.append(Record(run.run_id, f"m={row.calib_scenes}", f"{STAB_PREFIX}curve_{col}",
                                      float(getattr(row, col)), config={**flat, "rq.method": "stability"}))
        run.log_records(records)
        _, info = pipe.resources.model(cfg.model)
        run.dir.update_meta(model_weights=info["weights"], model_source=info["source"])
    return run.dir.path


# ---------------------------------------------------------------------------------------------- report
def tables_from_rows(df: pd.DataFrame, prefix: str = SCORE_PREFIX) -> dict[str, np.ndarray]:
    """Rebuild the [L, H] tables from stored rows (``<prefix><name>``, head.layer, head.index)."""
    rows = df[df["metric"].astype(str).str.startswith(prefix) & (df["scene_id"].astype(str).str.startswith("GA"))]
    if rows.empty:
        raise ValueError(f"no {prefix}<table> rows: not an RQ1 run")
    out = {}
    for metric, part in rows.groupby("metric", sort=False):
        grid = part.pivot_table(index="head.layer", columns="head.index", values="value", aggfunc="mean")
        out[str(metric)[len(prefix):]] = grid.sort_index().sort_index(axis=1).to_numpy(dtype=float)
    return out


def agreement(tables: Mapping[str, np.ndarray], n_perm: int = N_PERM) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matched pairs with per-layer ρ, permutation p and pooled ρ where comparable; every scorer × oracle)."""
    from hess.plots import spearman
    from hess.stats import spearman_permutation_test

    def test(a: str, b: str) -> dict[str, Any]:
        t = spearman_permutation_test(tables[a], tables[b], n_perm=n_perm, seed=0)
        return {"ρ per layer (mean)": t.rho, "p (permutation)": t.p_value, "null sd": t.null_sd, "layers": t.layers}

    suffixes = sorted({n.partition("@")[1] + n.partition("@")[2] for n in tables if n.startswith("oracle")})
    matched = []
    for suffix in suffixes:
        for a, b in MATCHED:
            if a in tables and b + suffix in tables:
                pooled = spearman(tables[a].ravel(), tables[b + suffix].ravel()) if (a, b) in POOLED_OK else np.nan
                matched.append({"scorer": a, "oracle": b + suffix, **test(a, b + suffix), "ρ pooled": pooled})
    oracles = [n for n in tables if n.startswith("oracle")]
    scorers = [n for n in tables if not n.startswith("oracle") and not n.startswith("trace_")]
    grid = []
    for a in scorers:
        row = {"scorer": a}
        for b in oracles:
            t = test(a, b)
            row[f"vs {b}"] = ("n/a" if not np.isfinite(t["ρ per layer (mean)"])
                              else f"{t['ρ per layer (mean)']:+.2f} (p={t['p (permutation)']:.3f})")
        grid.append(row)
    return pd.DataFrame(matched), pd.DataFrame(grid)


def _stability_parts(df: pd.DataFrame, hess: np.ndarray) -> tuple[list[str], dict[str, np.ndarray], pd.DataFrame]:
    rows = df[df["metric"].astype(str).str.startswith(STAB_PREFIX)]
    if rows.empty:
        return [], {}, pd.DataFrame()
    scal = {str(m)[len(STAB_PREFIX):]: float(v) for m, v in
            rows[rows["scene_id"] == "all"].groupby("metric")["value"].mean().items()}
    shares = tables_from_rows(rows, STAB_PREFIX)
    curve_rows = rows[rows["scene_id"].astype(str).str.startswith("m=")]
    curve = curve_rows.pivot_table(index="scene_id", columns="metric", values="value", aggfunc="mean")
    curve.columns = [str(c)[len(STAB_PREFIX) + len("curve_"):] for c in curve.columns]
    curve = curve.reset_index().rename(columns={"scene_id": "calib scenes"})
    curve["m"] = curve["calib scenes"].str[2:].astype(int)
    curve = curve.sort_values("m").drop(columns="m").reset_index(drop=True)
    from hess.rq.stability import CHANGE_STABLE, RHO_STABLE

    stable = curve[(curve["rank_rho"] >= RHO_STABLE) & (curve["heads_changed"] <= CHANGE_STABLE)]
    pool = curve["calib scenes"].iloc[-1] if len(curve) else "?"
    first = (f"the smallest tested number of calibration scenes that is stable is {stable['calib scenes'].iloc[0][2:]}"
             if len(stable) and stable.index[0] < len(curve) - 1 else
             f"no subset smaller than the whole pool ({pool[2:] if isinstance(pool, str) else pool} scenes) is stable")
    keep = scal.get("keep_ratio", float("nan"))
    width = shares["share_high"] - shares["share_low"] if shares else np.zeros(1)
    text = (f"**Calibration stability** (bootstrap over the {scal.get('calib_scenes', float('nan')):.0f} calibration "
            f"scenes of the artifact, stored per-scene traces, 500 draws): each head's HeSS share has a 95% interval "
            f"of mean width {float(width.mean()):.3f} (max {float(width.max()):.3f}); mean per-layer Spearman between "
            f"bootstrap tables {scal.get('rank_rho', float('nan')):.2f} (with the table in use "
            f"{scal.get('rank_rho_reference', float('nan')):.2f}); the allocation at keep {keep:g} (n_k = "
            f"{scal.get('num_key_blocks', float('nan')):.0f}) changes in {100 * scal.get('alloc_changed', float('nan')):.0f}% "
            f"of the draws ({100 * scal.get('heads_changed', float('nan')):.0f}% of heads on average).")
    how_many = (f"**Calibration scenes needed**: random subsets of m scenes of a pool, compared with the pool's table "
                f"(stable = mean per-layer ρ ≥ {RHO_STABLE} and ≤ {100 * CHANGE_STABLE:.0f}% of heads get another block "
                f"count; `alloc_changed`: fraction of subsets whose allocation differs at all); {first}.")
    return [text, how_many, markdown_table(curve)], shares, curve


@REPORTS.register("rq1_heterogeneity")
def rq1(df: pd.DataFrame) -> Report:
    """Dispersion per table, rank agreement with the oracle (with nulls), stability; heatmaps."""
    from hess.plots import (coefficient_of_variation, dispersion_bars, extreme_heads_bars, extreme_heads_table, gini,
                            head_heatmap, hess_heatmaps, rank_correlation_matrix)

    tables = tables_from_rows(df)
    lam = float(df["score.lam"].dropna().iloc[0]) if "score.lam" in df else 0.5
    keep = df.loc[df["metric"] == SCORE_PREFIX + "oracle", "keep_ratio"].dropna()
    keep = float(keep.iloc[0]) if len(keep) else float("nan")
    disp_rows, long_rows = [], []
    for name in ("hess_cam", "hess_pc", "hess", "oracle_cam", "oracle_pc", "oracle"):
        if name not in tables:
            continue
        t = np.clip(tables[name], 0.0, None) if name.startswith("oracle") else tables[name]
        cv, g = coefficient_of_variation(t), gini(t)
        median = np.median(t, axis=1)
        ratio = np.where(median > 0, np.max(t, axis=1) / np.where(median > 0, median, 1.0), np.nan)
        disp_rows.append({"table": name, "mean CV": float(np.nanmean(cv)), "max CV": float(np.nanmax(cv)),
                          "mean Gini": float(np.nanmean(g)),
                          "mean max/median": float(np.nanmean(ratio)) if np.isfinite(ratio).any() else np.nan})
        long_rows += [{"table": name, "global_layer": l, "cv": float(cv[l]), "gini": float(g[l])} for l in range(len(cv))]
    parts = [f"**Per-layer dispersion** (coefficient of variation and Gini over the heads of a layer, averaged over "
             f"layers; oracle Δ clamped at 0). HeSS λ = {lam:g}.", markdown_table(pd.DataFrame(disp_rows))]
    matched, grid = (agreement(tables) if any(n.startswith("oracle") for n in tables) else (pd.DataFrame(), pd.DataFrame()))
    if not matched.empty:
        parts += [f"**Rank agreement with the oracle, per objective** (oracle: one head alone at keep ratio {keep:g} "
                  "— and at the evaluated keep ratio, suffix `@` — with the dense model's alignment, inlier set and NN "
                  "targets held fixed; `oracle` mixes per-layer-normalised Δe_cam⁺ and Δe_pc⁺ with λ as HeSS does). "
                  f"ρ per layer: mean over layers of Spearman over the H heads; p: one-sided permutation p-value, heads "
                  f"shuffled within layers, {N_PERM} permutations (null sd = sd of the null mean ρ). Pooled ρ only "
                  "where both sides share one scale across layers (raw traces vs raw Δ).",
                  markdown_table(matched), "**Every scorer of the experiment file vs every oracle table** (ρ per "
                  "layer, permutation p)", markdown_table(grid, digits=2)]
    stab_parts, shares, curve = _stability_parts(df, tables["hess"])
    parts += stab_parts
    top = extreme_heads_table(tables["hess"], k=min(5, tables["hess"].size))
    if shares:
        top = top.assign(ci_low=shares["share_low"][top["global_layer"], top["head"]],
                         ci_high=shares["share_high"][top["global_layer"], top["head"]])
    parts += [f"**Most / least sensitive heads by HeSS (λ = {lam:g})**, 0-based `GA{{layer}}-H{{head}}`"
              + (", with the calibration-bootstrap 95% interval of the share" if shares else ""),
              markdown_table(top[[c for c in ("group", "rank", "head_label", "score", "ci_low", "ci_high") if c in top]],
                             digits=4)]
    figures, notes = {}, []
    add_figure(figures, notes, "hess_heatmaps", lambda: hess_heatmaps(tables["hess_cam"], tables["hess_pc"], tables["hess"], lam))
    add_figure(figures, notes, "dispersion", lambda: dispersion_bars(tables["hess"]))
    if shares:
        add_figure(figures, notes, "extreme_heads", lambda: extreme_heads_bars(tables["hess"], shares["share_low"],
                                                                              shares["share_high"], k=min(5, tables["hess"].size // 2)))
    for name, what in (("oracle_cam", "Δe_cam"), ("oracle_pc", "Δe_pc (fixed inliers)"), ("oracle", "mixed, per-layer normalised")):
        if name in tables:
            add_figure(figures, notes, name, lambda n=name, w=what: head_heatmap(
                tables[n], title=f"oracle {w}: one head sparsified at keep {keep:g}", cbar_label=w))
    ranked = {n: t for n, t in tables.items() if not n.startswith("trace_") and "@" not in n
              and n not in ("oracle_chamfer",)}
    if len(ranked) > 1:
        add_figure(figures, notes, "rank_correlation", lambda: rank_correlation_matrix(ranked, pooled=False))
    csv = pd.concat([pd.DataFrame(long_rows).assign(kind="dispersion"), matched.assign(kind="agreement"),
                     curve.assign(kind="stability_curve")], ignore_index=True)
    return Report(finish(parts, notes), csv, figures)
