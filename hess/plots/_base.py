"""Shared plumbing of ``hess.plots``: input checks, figure creation, index ticks, labels, saving.

Figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot: no global figure
registry, no GUI backend, nothing to ``show``.  PNGs are rendered by Agg in :func:`save_figure`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

MAX_FULL_TICKS = 32   # every layer/head index is labelled up to this many; beyond, ticks are thinned
LAYER_LABEL = "global layer (0-based)"
HEAD_LABEL = "head (0-based)"
NAMING_NOTE = "head GA{l}-H{h} = global layer l, head h; 0-based"

X_LABELS = {
    "realized_density": "realised density (fraction of patch key blocks computed)",
    "keep_ratio": "target keep ratio c_h / n_k",
    "budget.keep_ratio": "target keep ratio c_h / n_k",
    "latency_ms": "latency (ms)",
    "score.lam": "λ (camera weight in HeSS)",
}
# metric name (the part after "<dataset>/") -> readable description with units and direction
METRIC_LABELS = {
    "auc30": "pose AUC@30 (fraction, ↑)", "auc15": "pose AUC@15 (fraction, ↑)",
    "rra15": "RRA@15 (fraction, ↑)", "rta15": "RTA@15 (fraction, ↑)",
    "rra30": "RRA@30 (fraction, ↑)", "rta30": "RTA@30 (fraction, ↑)",
    "chamfer": "Chamfer distance (scene units, ↓)", "chamfer_f0": "Chamfer, frame 0 (scene units, ↓)",
    "acc": "accuracy distance (scene units, ↓)", "comp": "completeness distance (scene units, ↓)",
    "abs_rel": "depth AbsRel (↓)", "latency_ms": "latency (ms, ↓)",
    "realized_density": "realised density (fraction, ↓)",
}
MM_DATASETS = {"dtu"}  # DTU point metrics are in millimetres (evaluation protocol)


def head_label(layer: int, head: int) -> str:
    """The paper's head name ``GA{l}-H{h}`` with 0-based global layer ``l`` and head ``h``."""
    return f"GA{layer}-H{head}"


def metric_label(metric: str) -> str:
    """``"co3d/auc30"`` -> ``"co3d/auc30: pose AUC@30 (fraction, ↑)"``; unknown keys are returned as is."""
    dataset, _, name = metric.rpartition("/")
    desc = METRIC_LABELS.get(name)
    if desc is None:
        return metric
    if dataset in MM_DATASETS:
        desc = desc.replace("scene units", "mm")
    return f"{metric}: {desc}"


def axis_label(column: str) -> str:
    return X_LABELS.get(column, column)


def as_table(x: Any, name: str, *, ndim: int = 2) -> np.ndarray:
    """A finite float64 array of rank ``ndim`` from a tensor / array / nested list, or a clear error.

    Torch tensors are read through ``.detach().cpu()`` (duck-typed: torch is not imported here).
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be numeric, got {type(x).__name__}: {err}") from None
    if arr.ndim != ndim:
        want = "[L, H]" if ndim == 2 else f"rank {ndim}"
        raise ValueError(f"{name} must be {want} (rank {ndim}), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN/inf), first at index {first}")
    return arr


def require_columns(df: Any, columns: Iterable[str | None], what: str) -> pd.DataFrame:
    """Check ``df`` is a non-empty DataFrame holding ``columns`` (None entries are skipped)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} needs a pandas DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError(f"{what}: the DataFrame is empty (no result rows)")
    missing = [c for c in columns if c is not None and c not in df.columns]
    if missing:
        raise KeyError(f"{what}: missing column(s) {missing}; available: {sorted(map(str, df.columns))}")
    return df


def new_figure(nrows: int, ncols: int, panel: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A constrained-layout Figure with an ``[nrows, ncols]`` array of axes, each about ``panel`` inches."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def figure_for(ax: Axes | None, panel: tuple[float, float]) -> tuple[Figure, Axes]:
    """``(ax.figure, ax)`` when an axes is given, else a new one-panel figure."""
    if ax is not None:
        fig = ax.figure
        while not isinstance(fig, Figure):  # an axes inside a SubFigure: climb to the root Figure
            fig = fig.figure
        return fig, ax
    fig, axes = new_figure(1, 1, panel)
    return fig, axes[0, 0]


def index_ticks(ax: Axes, n: int, axis: str) -> None:
    """Integer tick labels 0..n-1 on ``axis`` ('x' or 'y'); every index up to MAX_FULL_TICKS, then thinned."""
    step = 1 if n <= MAX_FULL_TICKS else math.ceil(n / MAX_FULL_TICKS)
    ticks = np.arange(0, n, step)
    setter = ax.set_xticks if axis == "x" else ax.set_yticks
    setter(ticks, labels=[str(t) for t in ticks], fontsize=8 if n > 16 else 9)


def category_ticks(ax: Axes, labels: Sequence[str], axis: str = "x") -> None:
    setter = ax.set_xticks if axis == "x" else ax.set_yticks
    setter(np.arange(len(labels)), labels=list(labels))


def text_colour(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell colour)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG (or the format of ``path``'s suffix) at ``dpi``; parents are created.

    Returns:
        the path written.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"save_figure needs a matplotlib Figure, got {type(fig).__name__}")
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path
