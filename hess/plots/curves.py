"""Figures of tidy result rows (RQ2–RQ4, latency, sweeps; notebook 02).

Input is the long DataFrame of ``hess.results.load_results``: one row per (run, scene, metric) with
``metric``, ``value``, ``keep_ratio`` (target), ``realized_density``, ``latency_ms``, a method column
and flattened config keys (``score.lam``, ...).  Points aggregate the rows of one (series, setting)
over scenes: mean ± std (or sem).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hess.plots._base import axis_label, figure_for, metric_label, new_figure, require_columns, text_colour
from hess.plots.stats import DIRECTIONS, pareto_mask
from hess.results import LATENCY_KEY

GLOBAL_ATTENTION_KEY = "perf/global_attn_ms"  # global-attention time of one forward pass
LATENCY_METRICS = {LATENCY_KEY: "end-to-end", GLOBAL_ATTENTION_KEY: "global attention"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _std(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


ERRORS: dict[str, Callable[[np.ndarray], float]] = {
    "std": _std,
    "sem": lambda v: _std(v) / np.sqrt(len(v)),
}


def _error_fn(err: str) -> Callable[[np.ndarray], float]:
    if err not in ERRORS:
        raise ValueError(f"unknown error bar {err!r}; known: {sorted(ERRORS)}")
    return ERRORS[err]


def metric_rows(df: Any, metric: str, columns: Sequence[Optional[str]], what: str) -> pd.DataFrame:
    """The rows of ``metric`` with the needed columns checked; NaN values are an error (say so, don't hide)."""
    df = require_columns(df, ["metric", "value", *columns], what)
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise ValueError(f"{what}: no rows for metric {metric!r}; available: {sorted(df['metric'].unique())}")
    nan = int(rows["value"].isna().sum())
    if nan:
        raise ValueError(f"{what}: {nan} of {len(rows)} rows of {metric!r} have value NaN; drop them "
                         "explicitly (df.dropna(subset=['value'])) if that is intended")
    return rows


def aggregate(rows: pd.DataFrame, keys: Sequence[str], columns: Sequence[str], err: str = "std") -> pd.DataFrame:
    """Mean and error of ``columns`` per group of ``keys`` (NaN keys kept as their own group).

    Returns:
        one row per group: the keys, ``<col>_mean``, ``<col>_err`` for each column, and ``n`` (rows).
    """
    fn = _error_fn(err)
    out = []
    for key, group in rows.groupby(list(keys), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key), n=len(group))
        for col in columns:
            v = group[col].to_numpy(dtype=float)
            row[f"{col}_mean"] = float(np.mean(v)) if np.isfinite(v).all() else np.nan
            row[f"{col}_err"] = fn(v) if np.isfinite(v).all() else np.nan
        out.append(row)
    return pd.DataFrame(out)


def tradeoff_curve(df: pd.DataFrame, metric: str, *, x: str = "realized_density", hue: Optional[str] = "method",
                   group: str = "keep_ratio", err: str = "std", ax: Optional[Axes] = None,
                   title: Optional[str] = None) -> Figure:
    """Metric vs sparsity or latency, one line per ``hue`` value, error bars over scenes (RQ2/RQ3).

    Rows of one (hue, group) setting make one point: y = mean ± err of ``value``; x = mean of column
    ``x`` (with a horizontal error bar when ``x`` is measured, not the group key).  A series whose ``x``
    is NaN everywhere (e.g. dense, which has no target keep ratio) is drawn as a horizontal reference
    line with its band.

    Args:
        df: tidy rows with columns metric, value, ``x``, ``group`` and ``hue``.
        metric: metric key to plot, e.g. "co3d/auc30".
        x: "realized_density", "keep_ratio", "latency_ms" or any numeric column.
        hue: column naming the series (None: one series).
        group: column whose values define the points of a series (target keep ratio by default).
        err: "std" or "sem" over the rows of a point.
    """
    rows = metric_rows(df, metric, [x, group, hue], "tradeoff_curve")
    rows = rows.assign(_series=rows[hue].astype(str) if hue else metric)
    fig, ax = figure_for(ax, (6.4, 4.4))
    for i, (name, series) in enumerate(rows.groupby("_series", sort=True)):
        stats = aggregate(series, [group], ["value", x], err)
        finite = np.isfinite(stats[f"{x}_mean"])
        if not finite.any():
            _reference_line(ax, stats, name, i)
            continue
        if not finite.all():
            raise ValueError(f"tradeoff_curve: series {name!r} has NaN in column {x!r} for some but not all "
                             f"{group} values; cannot place those points")
        stats = stats.sort_values(f"{x}_mean")
        col = lambda name: stats[name].to_numpy(dtype=float)  # noqa: E731
        xerr = None if x == group else col(f"{x}_err")
        ax.errorbar(col(f"{x}_mean"), col("value_mean"), yerr=col("value_err"), xerr=xerr,
                    marker=MARKERS[i % len(MARKERS)], capsize=3, lw=1.6, ms=6, label=name)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(metric_label(metric))
    n_scenes = rows["scene_id"].nunique() if "scene_id" in rows else None
    scenes = f", {n_scenes} scenes" if n_scenes else ""
    ax.set_title(title or f"{metric} vs {x} (mean ± {err}{scenes})")
    ax.grid(alpha=0.3)
    ax.legend(title=hue, fontsize=9)
    return fig


def _reference_line(ax: Axes, stats: pd.DataFrame, name: str, i: int) -> None:
    mean, spread = stats["value_mean"].mean(), stats["value_err"].max()
    colour = f"C{i % 10}"
    ax.axhline(mean, color=colour, ls="--", lw=1.4, label=f"{name} (no sparsity)")
    if spread > 0:
        ax.axhspan(mean - spread, mean + spread, color=colour, alpha=0.12)


def lambda_grid(df: pd.DataFrame, metric: str, *, lam: str = "score.lam", sparsity: str = "keep_ratio",
                kind: str = "heatmap", err: str = "std", title: Optional[str] = None) -> Figure:
    """RQ4: ``metric`` over the λ × sparsity grid, as an annotated heatmap or a family of lines.

    Args:
        df: tidy rows with columns metric, value, ``lam`` and ``sparsity``.
        kind: "heatmap" (rows λ, columns keep ratio, mean over scenes; empty cells "n/a") or "lines"
            (x = keep ratio, one line per λ, error bars ``err``).
    """
    rows = metric_rows(df, metric, [lam, sparsity], "lambda_grid")
    for col in (lam, sparsity):
        if rows[col].isna().any():
            raise ValueError(f"lambda_grid: column {col!r} has NaN for metric {metric!r}")
    if kind not in LAMBDA_KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(LAMBDA_KINDS)}")
    stats = aggregate(rows, [lam, sparsity], ["value"], err)
    fig, ax = figure_for(None, (6.6, 4.6))
    LAMBDA_KINDS[kind](ax, stats, lam, sparsity, metric)
    ax.set_title(title or f"RQ4: {metric} over λ × keep ratio (mean over scenes)")
    return fig


def _lambda_heatmap(ax: Axes, stats: pd.DataFrame, lam: str, sparsity: str, metric: str) -> None:
    grid = stats.pivot(index=lam, columns=sparsity, values="value_mean").sort_index().sort_index(axis=1)
    values = grid.to_numpy(dtype=float)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", interpolation="nearest")
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, "n/a" if not np.isfinite(v) else f"{v:.3g}", ha="center", va="center", fontsize=9,
                color="black" if not np.isfinite(v) else text_colour(image.cmap(image.norm(v))))
    ax.set_xticks(np.arange(values.shape[1]), labels=[f"{v:g}" for v in grid.columns])
    ax.set_yticks(np.arange(values.shape[0]), labels=[f"{v:g}" for v in grid.index])
    ax.set_xlabel(axis_label(sparsity))
    ax.set_ylabel(axis_label(lam))
    ax.get_figure().colorbar(image, ax=ax, label=metric_label(metric))


def _lambda_lines(ax: Axes, stats: pd.DataFrame, lam: str, sparsity: str, metric: str) -> None:
    lams = sorted(stats[lam].unique())
    cmap = matplotlib.colormaps["viridis"]
    for i, value in enumerate(lams):
        s = stats[stats[lam] == value].sort_values(sparsity)
        ax.errorbar(s[sparsity].to_numpy(float), s["value_mean"].to_numpy(float),
                    yerr=s["value_err"].to_numpy(float), marker=MARKERS[i % len(MARKERS)],
                    capsize=3, color=cmap(i / max(len(lams) - 1, 1) * 0.9), label=f"λ = {value:g}")
    ax.set_xlabel(axis_label(sparsity))
    ax.set_ylabel(metric_label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)


LAMBDA_KINDS = {"heatmap": _lambda_heatmap, "lines": _lambda_lines}


def pareto_front(points: Any, objectives: Sequence[str], directions: Sequence[str], *,
                 labels: Optional[Sequence[str]] = None, annotate: Optional[str] = None,
                 ax: Optional[Axes] = None, title: Optional[str] = None) -> Figure:
    """All trials of a two-objective study, Pareto-optimal ones highlighted and joined.

    Args:
        points: DataFrame holding the ``objectives`` columns (e.g. ``study.trials_dataframe()`` with
            "values_0", "values_1"), or an [n, 2] array.
        objectives: two names: columns of ``points``, or axis names for an array; x first.
        directions: two of "maximize"/"minimize".
        labels: axis labels overriding ``objectives`` (e.g. for "values_0").
        annotate: column whose value is written beside each Pareto point (e.g. "number").
    """
    if len(objectives) != 2 or len(directions) != 2:
        raise ValueError(f"pareto_front plots exactly two objectives, got {list(objectives)} / {list(directions)}")
    if isinstance(points, pd.DataFrame):
        require_columns(points, [*objectives, annotate], "pareto_front")
        values = points[list(objectives)].to_numpy(dtype=float)
    else:
        values = np.asarray(points.detach().cpu() if hasattr(points, "detach") else points, dtype=float)
        if values.ndim != 2 or values.shape[1] != 2:
            raise ValueError(f"pareto_front needs points [n, 2], got shape {values.shape}")
    mask = pareto_mask(values, directions)  # also rejects NaN and unknown directions
    fig, ax = figure_for(ax, (6.4, 4.6))
    ax.scatter(values[~mask, 0], values[~mask, 1], s=22, color="0.6", label="dominated trial")
    front = values[mask][np.argsort(values[mask, 0], kind="stable")]
    ax.plot(front[:, 0], front[:, 1], "-o", color="tab:red", ms=7, lw=1.5, label="Pareto-optimal")
    if annotate is not None:
        for (xv, yv), tag in zip(values[mask], points.loc[mask, annotate]):
            ax.annotate(str(tag), (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=8)
    names = list(labels) if labels is not None else [axis_label(o) for o in objectives]
    arrows = {d: ("higher is better" if DIRECTIONS[d] < 0 else "lower is better") for d in directions}
    ax.set_xlabel(f"{names[0]} ({arrows[directions[0]]})")
    ax.set_ylabel(f"{names[1]} ({arrows[directions[1]]})")
    ax.set_title(title or f"Pareto front: {int(mask.sum())} of {len(values)} trials optimal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def latency_bars(df: pd.DataFrame, *, metrics: Optional[Mapping[str, str]] = None, hue: str = "method",
                 group: str = "keep_ratio", err: str = "std", title: Optional[str] = None) -> Figure:
    """Grouped bars of time per method at each target keep ratio, one panel per timing metric.

    Args:
        df: tidy rows with columns metric, value, ``hue`` and ``group``.
        metrics: metric key -> panel name; default end-to-end (``perf/latency_ms``) and global attention
            (``perf/global_attn_ms``).  Every key must be present.
        group: x categories; NaN (dense: no target) is shown as "dense" on the left, then decreasing
            keep ratio (sparser to the right).
        err: error bars over the rows of a bar (scenes / repeats).
    """
    metrics = dict(metrics or LATENCY_METRICS)
    frames = {key: metric_rows(df, key, [hue, group], "latency_bars") for key in metrics}
    everything = pd.concat(frames.values())
    cats = sorted(everything[group].dropna().unique(), reverse=True)
    has_dense = everything[group].isna().any()
    cat_labels = (["dense"] if has_dense else []) + [f"{c:g}" for c in cats]
    methods = sorted(everything[hue].astype(str).unique())
    width = 0.8 / len(methods)
    fig, axes = new_figure(1, len(metrics), (max(4.2, 1.1 * len(cat_labels) + 2.0), 3.8))
    for ax, (key, name) in zip(axes[0], metrics.items()):
        stats = aggregate(frames[key].assign(_m=frames[key][hue].astype(str)), ["_m", group], ["value"], err)
        for j, method in enumerate(methods):
            s = stats[stats["_m"] == method]
            pos = [0 if np.isnan(g) and has_dense else cats.index(g) + has_dense for g in s[group]]
            ax.bar(np.asarray(pos) + (j - (len(methods) - 1) / 2) * width, s["value_mean"], width * 0.95,
                   yerr=s["value_err"], capsize=3, color=f"C{j % 10}", label=method)
        ax.set_xticks(np.arange(len(cat_labels)), labels=cat_labels)
        ax.set_xlabel(axis_label(group))
        ax.set_ylabel("time (ms)")
        ax.set_title(f"{name} ({key})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(title=hue, fontsize=8)
    fig.suptitle(title or f"Latency per {hue} and keep ratio (mean ± {err})")
    return fig
