"""Figures of the HeSS study: tensors / arrays / tidy DataFrames in, ``matplotlib.figure.Figure`` out.

    fig = hess_heatmaps(scores.cam, scores.pc, scores.hess(lam=0.5), lam=0.5)     # RQ1
    fig = tradeoff_curve(load_results("ablations/outputs/rq2"), "synthetic/auc30")  # RQ2/RQ3
    save_figure(fig, run.file("figures", "rq2_auc30.png"))

Figures never go through pyplot (nothing to ``show``; PNGs are rendered by Agg).  Per-head grids are
global layer × head, 0-based, heads named ``GA{l}-H{h}`` (method.md §1).  Layering: this package
imports ``hess.results`` only (style.md §5).

- ``stats``: pure numbers (coefficient of variation, Gini, Spearman, extreme heads, Pareto mask).
- ``heads``: per-head tables [L, H] (heatmaps, allocations, dispersion, rank agreement).
- ``curves``: tidy result rows (trade-off curves, λ grid, Pareto front, latency bars).
- ``paired``: paired differences with their bootstrap CIs (forest plot).
"""
from hess.plots._base import head_label, metric_label, save_figure
from hess.plots.curves import (GLOBAL_ATTENTION_KEY, LATENCY_METRICS, aggregate, lambda_grid, latency_bars,
                               pareto_front, tradeoff_curve)
from hess.plots.heads import (allocation_heatmaps, dispersion_bars, extreme_heads_bars, head_heatmap,
                              hess_heatmaps, rank_correlation_matrix)
from hess.plots.paired import difference_plot
from hess.plots.stats import (average_ranks, coefficient_of_variation, extreme_heads_table, gini, pareto_mask,
                              rank_correlations, spearman)

__all__ = [
    "GLOBAL_ATTENTION_KEY", "LATENCY_METRICS", "aggregate", "allocation_heatmaps", "average_ranks",
    "coefficient_of_variation", "difference_plot", "dispersion_bars", "extreme_heads_bars", "extreme_heads_table",
    "gini", "head_heatmap", "head_label",
    "hess_heatmaps", "lambda_grid", "latency_bars", "metric_label", "pareto_front", "pareto_mask",
    "rank_correlation_matrix", "rank_correlations", "save_figure", "spearman", "tradeoff_curve",
]
