"""Paired differences of every RQ table row against its baselines, with scene-bootstrap CIs.

    settings = comparison_settings("rq3_baselines")          # runner keys of ablations/configs/rq3_baselines.yaml
    frame = paired_differences(rows, "rq3_baselines", baselines=["uniform", "hess"])
    # columns PAIRED_COLUMNS: rq, method, keep_ratio, metric, baseline, n_scenes, mean_diff, ci_low, ci_high

Input: the per-scene result rows of one experiment (``hess.results.load_results``) with a ``method``
column (the table's row label).  An *arm* is one (method, keep ratio); its runs are the seeds of a
stochastic method (e.g. five seeds of ``random``) and enter the bootstrap as ``[n_seeds, n_scenes]``.
A method arm is compared with the baseline arm at the same keep ratio (a dense baseline has none) over
the scenes both measured.  Pose AUC / RRA / RTA are pooled over frame pairs: their Δ is the difference
of pooled values and resamples scenes with their pair counts (``hess.stats.pooled_auc_bootstrap``); other
metrics are means over scenes (``hess.stats.paired_bootstrap``).

``compare_at: realized_density`` (experiment file ``runner:``): where a method's realised density differs
from the baseline's at the same keep ratio (``hess-no-capping`` does not conserve the budget), the
baseline's per-scene curve is interpolated linearly at the method's realised density, scene by scene,
within the baseline's measured range (scenes outside it are dropped, never extrapolated).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from hess.results import DENSITY_KEY, write_atomic
from hess.stats import N_RESAMPLES, BootstrapCI, paired_bootstrap, pooled_auc_bootstrap

PAIRED_COLUMNS = ["rq", "method", "keep_ratio", "metric", "baseline", "n_scenes", "mean_diff", "ci_low", "ci_high"]
PAIRED_FILE = "paired_differences.csv"
POOLED = ("auc30", "auc15", "rra15", "rta15", "rra30", "rta30")  # pooled over frame pairs
DEFAULT_METRICS = ("auc30", "chamfer")
COMPARE_AT = ("keep_ratio", "realized_density")
PAIRS_METRIC = "pairs"  # <dataset>/pairs: frame pairs scored per scene (hess.rq.pipeline)
SEED = 0
_TOL = 1e-9


def comparison_settings(name: str, directory: Optional[Path] = None) -> dict[str, Any]:
    """``baselines``, ``metrics``, ``compare_at`` of experiment ``name`` from its file's ``runner:`` section.

    Defaults: baselines [uniform] (dense when the file has no uniform variant), metrics auc30 + chamfer,
    compare_at keep_ratio.  A missing file gives the defaults.
    """
    from hess.experiment import load_experiment
    from hess.rq.runners import configs_dir

    path = (directory or configs_dir()) / f"{name}.yaml"
    runner, variants = ({}, {}) if not path.is_file() else (lambda e: (e.runner, e.variants))(load_experiment(path))
    default = ["uniform"] if "uniform" in variants else ["dense"]
    out = {"baselines": [str(b) for b in runner.get("baselines", default)],
           "metrics": [str(m) for m in runner.get("metrics", DEFAULT_METRICS)],
           "compare_at": str(runner.get("compare_at", "keep_ratio"))}
    if out["compare_at"] not in COMPARE_AT:
        raise ValueError(f"{path}: runner.compare_at must be one of {COMPARE_AT}, got {out['compare_at']!r}")
    return out


def _keep(value: Any) -> float:
    return -1.0 if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 9)


def _arms(rows: pd.DataFrame, metric: str) -> dict[tuple[str, float], pd.DataFrame]:
    """(method, keep) -> [runs × scenes] values of ``metric`` (scene ids as columns, sorted)."""
    part = rows[rows["metric"] == metric]
    out = {}
    for (method, keep), arm in part.groupby(["method", part["keep_ratio"].map(_keep)], sort=True):
        out[(str(method), float(keep))] = arm.pivot_table(index="run_id", columns="scene_id", values="value",
                                                          aggfunc="mean").sort_index(axis=1)
    return out


def _pairs(rows: pd.DataFrame, dataset: str) -> Callable[[Sequence[str]], np.ndarray]:
    """scene ids -> frame pairs per scene (``<dataset>/pairs`` rows, else S(S−1)/2 of ``data.num_frames``)."""
    recorded = rows[rows["metric"] == f"{dataset}/{PAIRS_METRIC}"].groupby("scene_id")["value"].max()
    frames = rows["data.num_frames"].dropna() if "data.num_frames" in rows else pd.Series(dtype=float)
    fallback = float(frames.iloc[0] * (frames.iloc[0] - 1) / 2) if len(frames) else 1.0
    return lambda ids: np.array([float(recorded.get(s, fallback)) for s in ids])


def _interpolated(base: pd.DataFrame, base_density: dict[float, pd.DataFrame], target: pd.Series,
                  keeps: Sequence[float]) -> pd.Series:
    """Baseline value per scene at the realised density ``target[scene]`` (linear, within range, else NaN)."""
    out = {}
    for scene, x in target.items():
        pts = sorted((float(base_density[k][scene].mean()), float(base[k][scene].mean()))
                     for k in keeps if scene in base[k].columns and scene in base_density[k].columns)
        xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        ok = len(xs) > 0 and xs[0] - _TOL <= x <= xs[-1] + _TOL
        out[scene] = float(np.interp(x, xs, ys)) if ok else math.nan
    return pd.Series(out)


def paired_differences(rows: pd.DataFrame, rq: str, *, baselines: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS,
                       compare_at: str = "keep_ratio", dataset: Optional[str] = None,
                       n_resamples: int = N_RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Every (method, keep ratio) arm minus each baseline arm, over their common scenes, with a 95% CI.

    Args:
        rows: result rows of one experiment (per-scene rows are used; ``all`` rows ignored), column ``method``.
        baselines: method labels to compare against (a baseline is not compared with itself).
        metrics: metric names without the dataset prefix ("auc30", "chamfer", ...) or full keys ("perf/...").
        compare_at: "keep_ratio" or "realized_density" (module docstring).
    Returns:
        DataFrame with ``PAIRED_COLUMNS`` (metric as the full key), one row per arm × baseline × metric
        with at least one common scene; ``keep_ratio`` NaN for a dense arm.
    """
    if compare_at not in COMPARE_AT:
        raise ValueError(f"compare_at must be one of {COMPARE_AT}, got {compare_at!r}")
    rows = rows[rows["scene_id"] != "all"]
    if dataset is None:
        values = sorted(rows["data.dataset"].dropna().unique()) if "data.dataset" in rows else []
        dataset = str(values[0]) if values else "synthetic"
    pairs = _pairs(rows, dataset)
    density = _arms(rows, DENSITY_KEY)
    out = []
    for name in metrics:
        key = name if "/" in name else f"{dataset}/{name}"
        arms = _arms(rows.dropna(subset=["value"]), key)
        pooled = key.rpartition("/")[2] in POOLED and key.startswith(f"{dataset}/")
        for baseline in baselines:
            base_keeps = sorted(k for (m, k) in arms if m == baseline)
            if not base_keeps:
                continue
            for (method, keep), arm in arms.items():
                if method == baseline:
                    continue
                bkeep = keep if keep in base_keeps else (-1.0 if base_keeps == [-1.0] else None)
                if bkeep is None:
                    continue
                base = arms[(baseline, bkeep)].mean(axis=0)
                if compare_at == "realized_density" and bkeep != -1.0 and (method, keep) in density:
                    target = density[(method, keep)].mean(axis=0)
                    bd = density.get((baseline, bkeep))
                    if bd is not None and not np.allclose(target.reindex(bd.columns).to_numpy(), bd.mean(axis=0).to_numpy(),
                                                          atol=1e-6, equal_nan=True):
                        base = _interpolated({k: arms[(baseline, k)] for k in base_keeps if k != -1.0},
                                             {k: density[(baseline, k)] for k in base_keeps if (baseline, k) in density},
                                             target, [k for k in base_keeps if k != -1.0 and (baseline, k) in density])
                scenes = [s for s in arm.columns if s in base.index and np.isfinite(base[s]) and arm[s].notna().all()]
                if not scenes:
                    continue
                values, ref = arm[scenes].to_numpy(), base[scenes].to_numpy()
                ci: BootstrapCI = (pooled_auc_bootstrap(values, ref, pairs(scenes), n_resamples=n_resamples, seed=seed)
                                   if pooled else paired_bootstrap(values, ref, n_resamples=n_resamples, seed=seed))
                out.append({"rq": rq, "method": method, "keep_ratio": np.nan if keep == -1.0 else keep, "metric": key,
                            "baseline": baseline, "n_scenes": ci.n_scenes, "mean_diff": ci.mean_diff,
                            "ci_low": ci.ci_low, "ci_high": ci.ci_high})
    return pd.DataFrame(out, columns=PAIRED_COLUMNS)


def significant(row: Mapping[str, Any]) -> bool:
    """The CI of ``row`` excludes 0."""
    return bool(row["ci_low"] > 0 or row["ci_high"] < 0)


def delta_text(row: Optional[Mapping[str, Any]], digits: Optional[int] = None) -> str:
    """``+0.012 [−0.004, +0.029]`` with ``*`` when the CI excludes 0; "n/a" without a comparison.

    ``digits`` None: at least 3 decimals, more until the CI half-width shows two significant digits.
    """
    if row is None or not np.isfinite(row["mean_diff"]):
        return "n/a"
    if digits is None:
        hw = 0.5 * (row["ci_high"] - row["ci_low"])
        digits = 3 if not np.isfinite(hw) or hw <= 0 else int(min(6, max(3, 1 - math.floor(math.log10(hw)))))
    f = lambda v: "n/a" if not np.isfinite(v) else f"{v:+.{digits}f}"  # noqa: E731
    return f"{f(row['mean_diff'])} [{f(row['ci_low'])}, {f(row['ci_high'])}]" + (" *" if significant(row) else "")


def add_delta_columns(table: pd.DataFrame, paired: pd.DataFrame, baseline: str, metrics: Mapping[str, str],
                      method_col: str = "method") -> pd.DataFrame:
    """Columns ``Δ<label> vs <baseline> [95% CI]`` beside a table (rows matched on method and keep ratio).

    Args:
        metrics: full metric key -> short label ("synthetic/auc30" -> "AUC@30").
    """
    table = table.copy()
    for key, label in metrics.items():
        part = paired[(paired["baseline"] == baseline) & (paired["metric"] == key)]
        index = {(str(r["method"]), _keep(r["keep_ratio"])): r for _, r in part.iterrows()}
        table[f"Δ{label} vs {baseline} [95% CI]"] = [
            delta_text(index.get((str(m), _keep(k)))) for m, k in zip(table[method_col], table["keep_ratio"])]
    return table


def significance_summary(paired: pd.DataFrame, metric: str, baseline: str) -> str:
    """One sentence per baseline: which rows differ significantly (CI excludes 0) and in which direction."""
    part = paired[(paired["metric"] == metric) & (paired["baseline"] == baseline)]
    if part.empty:
        return ""
    label = lambda r: f"{r['method']}" + ("" if pd.isna(r["keep_ratio"]) else f" @ keep {r['keep_ratio']:g}")  # noqa: E731
    up = [label(r) for _, r in part.iterrows() if r["ci_low"] > 0]
    down = [label(r) for _, r in part.iterrows() if r["ci_high"] < 0]
    n = int(part["n_scenes"].max())
    text = (f"Against {baseline} on {metric} ({n} scenes, 95% paired bootstrap CI, {N_RESAMPLES} resamples): "
            f"{len(up) + len(down)} of {len(part)} differences exclude 0")
    parts = [f"higher: {', '.join(up)}" if up else "", f"lower: {', '.join(down)}" if down else ""]
    parts = [p for p in parts if p]
    return text + (" (" + "; ".join(parts) + ")." if parts else "; none is significant.")


def merge_paired_csv(out: str | Path, rq: str, frame: pd.DataFrame) -> Path:
    """``<out>/paired_differences.csv`` with experiment ``rq``'s rows replaced by ``frame``; returns the path."""
    path = Path(out) / PAIRED_FILE
    old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=PAIRED_COLUMNS)
    old = old[old["rq"] != rq]
    merged = pd.concat([f for f in (old, frame[PAIRED_COLUMNS]) if not f.empty], ignore_index=True)
    merged = merged if not merged.empty else pd.DataFrame(columns=PAIRED_COLUMNS)
    merged = merged.sort_values(["rq", "baseline", "metric", "method", "keep_ratio"], kind="stable", na_position="first")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: merged.to_csv(tmp, index=False, float_format="%.6g"))
    return path
