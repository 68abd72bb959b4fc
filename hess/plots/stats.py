"""Pure numbers behind the figures: dispersion, rank correlation, extreme heads, Pareto optimality.

Score tables are ``[L, H]``: global layer × head, 0-based, as everywhere in hess (method.md §1).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from hess.plots._base import as_table, head_label

DIRECTIONS = {"maximize": -1.0, "max": -1.0, "minimize": 1.0, "min": 1.0}  # sign that turns it into minimise


def coefficient_of_variation(scores: Any) -> np.ndarray:
    """Per-layer std / mean (population std, ddof = 0).

    Args:
        scores: [L, H] non-negative head scores.
    Returns:
        [L] coefficient of variation of each layer's H scores; NaN for a layer whose mean is 0.
    """
    x = as_table(scores, "scores")
    mean = x.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean != 0, x.std(axis=1) / mean, np.nan)


def gini(scores: Any) -> np.ndarray:
    """Per-layer Gini coefficient: mean absolute pairwise difference / (2 · mean).

    0 when every head of the layer has the same score, (H−1)/H when one head holds all of it.

    Args:
        scores: [L, H] non-negative head scores.
    Returns:
        [L] Gini coefficient per layer; NaN for a layer whose scores are all 0.
    """
    x = as_table(scores, "scores")
    if (x < 0).any():
        raise ValueError(f"gini needs non-negative scores, got minimum {x.min():g}")
    mad = np.abs(x[:, :, None] - x[:, None, :]).mean(axis=(1, 2))  # [L] mean over all H² ordered pairs
    mean = x.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, mad / (2.0 * mean), np.nan)


def average_ranks(x: Any) -> np.ndarray:
    """Ranks 1..n of a 1-D array, tied values sharing the mean of their ranks. x: [n] -> [n]."""
    x = as_table(x, "x", ndim=1)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):  # walk runs of equal values in sorted order
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = 0.5 * (start + 1 + end)  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman's ρ: Pearson correlation of average ranks. a, b: [n]; NaN if either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.shape != rb.shape:
        raise ValueError(f"spearman needs equal lengths, got {ra.shape[0]} and {rb.shape[0]}")
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((da * da).sum() * (db * db).sum())
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def rank_correlations(score_tables: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Spearman agreement between score tables, pooled and per layer.

    Args:
        score_tables: name -> [L, H] scores (same shape for all; at least two tables).
    Returns:
        ``{"pooled": ρ over all L·H heads, "per_layer": mean over layers of ρ over the H heads}``,
        each a names × names DataFrame.  Per-layer ρ is what matters for a per-layer budget; a layer
        where a table is constant (e.g. the uniform scorer) has no ρ and is left out of the mean
        (NaN when no layer has one).
    """
    if not isinstance(score_tables, Mapping) or len(score_tables) < 2:
        raise ValueError("rank_correlations needs a mapping of at least two name -> [L, H] score tables")
    tables = {name: as_table(t, f"score_tables[{name!r}]") for name, t in score_tables.items()}
    shapes = {name: t.shape for name, t in tables.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"score tables must share one [L, H] shape, got {shapes}")
    names = list(tables)
    pooled = np.full((len(names), len(names)), np.nan)
    per_layer = np.full_like(pooled, np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            pooled[i, j] = spearman(tables[a].ravel(), tables[b].ravel())
            rhos = np.array([spearman(ra, rb) for ra, rb in zip(tables[a], tables[b])])
            if np.isfinite(rhos).any():
                per_layer[i, j] = np.nanmean(rhos)
    frame = lambda m: pd.DataFrame(m, index=names, columns=names)  # noqa: E731
    return {"pooled": frame(pooled), "per_layer": frame(per_layer)}


def extreme_heads_table(scores: Any, k: int = 5) -> pd.DataFrame:
    """The ``k`` most and ``k`` least sensitive heads, labelled ``GA{l}-H{h}`` (0-based).

    Args:
        scores: [L, H] head scores.
        k: heads per group, 1 <= k <= L·H.
    Returns:
        DataFrame with columns ``group`` ("most"/"least"), ``rank`` (1 = most extreme), ``head_label``,
        ``global_layer``, ``head``, ``score``; 2k rows, "most" first.  Ties go to the lower
        (layer, head) index in both groups.
    """
    x = as_table(scores, "scores")
    L, H = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= L * H:
        raise ValueError(f"k must be an integer in [1, L·H = {L * H}], got {k!r}")
    flat = x.ravel()
    index = np.arange(flat.size)
    groups = {"most": np.lexsort((index, -flat))[:k], "least": np.lexsort((index, flat))[:k]}
    rows = [
        {"group": group, "rank": rank + 1, "head_label": head_label(i // H, i % H),
         "global_layer": int(i // H), "head": int(i % H), "score": float(flat[i])}
        for group, picks in groups.items() for rank, i in enumerate(picks)
    ]
    return pd.DataFrame(rows)


def pareto_mask(values: Any, directions: Sequence[str]) -> np.ndarray:
    """Which points are Pareto-optimal (no other point is at least as good in every objective and
    strictly better in one).  Identical points do not dominate each other.

    Args:
        values: [n, k] objective values, one row per trial.
        directions: k entries, each "maximize"/"max" or "minimize"/"min".
    Returns:
        [n] bool mask of the non-dominated points.
    """
    v = as_table(values, "values")
    if len(directions) != v.shape[1]:
        raise ValueError(f"got {len(directions)} directions for {v.shape[1]} objectives")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"unknown direction(s) {unknown}; known: {sorted(DIRECTIONS)}")
    cost = v * np.array([DIRECTIONS[d] for d in directions])  # [n, k], lower is better everywhere
    no_worse = (cost[None, :, :] <= cost[:, None, :]).all(-1)  # [i, j]: j is no worse than i
    better = (cost[None, :, :] < cost[:, None, :]).any(-1)     # [i, j]: j beats i somewhere
    return ~(no_worse & better).any(axis=1)
