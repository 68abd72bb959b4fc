"""Paired differences with their confidence intervals (the ``paired_differences.csv`` rows of one RQ).

    fig = difference_plot(paired, "synthetic/auc30", baseline="uniform")

One horizontal interval per (method, keep ratio): the mean paired difference with its 95% bootstrap CI
over scenes, a vertical line at 0; filled markers where the CI excludes 0, open ones where it does not.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hess.plots._base import metric_label, new_figure, require_columns

COLUMNS = ("method", "keep_ratio", "metric", "baseline", "n_scenes", "mean_diff", "ci_low", "ci_high")


def difference_plot(paired: pd.DataFrame, metric: str, *, baseline: str, title: Optional[str] = None) -> Figure:
    """Forest plot of ``method − baseline`` for ``metric``, rows grouped by keep ratio (decreasing).

    Args:
        paired: rows with ``COLUMNS`` (``hess.rq.paired.paired_differences``).
        metric: full metric key, e.g. "synthetic/auc30".
        baseline: which baseline's rows to draw.
    """
    df = require_columns(paired, COLUMNS, "difference_plot")
    rows = df[(df["metric"] == metric) & (df["baseline"] == baseline)]
    if rows.empty:
        raise ValueError(f"difference_plot: no rows for metric {metric!r} against {baseline!r}")
    rows = rows.assign(_k=rows["keep_ratio"].fillna(2.0)).sort_values(["_k", "method"], ascending=[False, True])
    labels = [f"{m}" + ("" if pd.isna(k) else f" @ {k:g}") for m, k in zip(rows["method"], rows["keep_ratio"])]
    y = np.arange(len(rows))[::-1]
    fig, axes = new_figure(1, 1, (6.4, max(2.4, 0.32 * len(rows) + 1.2)))
    ax = axes[0, 0]
    mean, lo, hi = (rows[c].to_numpy(dtype=float) for c in ("mean_diff", "ci_low", "ci_high"))
    sig = (lo > 0) | (hi < 0)
    for i in range(len(rows)):
        colour = "tab:red" if sig[i] and mean[i] < 0 else ("tab:green" if sig[i] else "tab:gray")
        if np.isfinite(lo[i]):
            ax.plot([lo[i], hi[i]], [y[i], y[i]], color=colour, lw=2)
        ax.plot(mean[i], y[i], "o", color=colour, mfc=colour if sig[i] else "white", ms=6)
    ax.axvline(0.0, color="black", lw=1, ls="--")
    ax.set_yticks(y, labels=labels, fontsize=8)
    ax.set_xlabel(f"Δ {metric_label(metric)}\n(method − {baseline}; 95% paired bootstrap CI over scenes)")
    n = int(rows["n_scenes"].max())
    ax.set_title(title or f"{metric}: difference to {baseline} ({n} scenes; filled = CI excludes 0)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig
