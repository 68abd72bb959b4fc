"""Figures of per-head tables (RQ1, notebook 01): heatmaps, allocations, dispersion, rank agreement.

Every grid is global layer (rows, top = layer 0) × head (columns), 0-based, with heads named
``GA{l}-H{h}`` in the paper's notation (method.md §1).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hess.plots._base import (HEAD_LABEL, LAYER_LABEL, NAMING_NOTE, as_table, category_ticks, figure_for,
                              index_ticks, new_figure, text_colour)
from hess.plots.stats import coefficient_of_variation, gini, rank_correlations

ANNOTATE_MAX_CELLS = 160  # annotate="auto" writes values into grids up to this size (e.g. 10 × 16)


def _wants_annotation(annotate: bool | str, L: int, H: int) -> bool:
    if annotate not in ("auto", True, False):
        raise ValueError(f"annotate must be True, False or 'auto', got {annotate!r}")
    return L * H <= ANNOTATE_MAX_CELLS if annotate == "auto" else bool(annotate)


def _panel_size(L: int, H: int, annotated: bool) -> tuple[float, float]:
    """Inches for one [L, H] heatmap panel: annotated cells fit a number, plain cells stay compact."""
    w, h = (0.55, 0.42) if annotated else (0.3, 0.24)
    return float(np.clip(w * H + 1.6, 3.4, 12.0)), float(np.clip(h * L + 1.3, 2.6, 11.0))


def _annotate(ax: Axes, values: np.ndarray, image: Any, fmt: str) -> None:
    fontsize = 8 if values.shape[1] <= 8 else 6.5
    for (r, c), v in np.ndenumerate(values):
        text = "n/a" if not np.isfinite(v) else fmt.format(v)
        colour = "black" if not np.isfinite(v) else text_colour(image.cmap(image.norm(v)))
        ax.text(c, r, text, ha="center", va="center", fontsize=fontsize, color=colour)


def head_heatmap(scores: Any, *, title: str, cbar_label: str, ax: Optional[Axes] = None,
                 annotate: bool | str = "auto", cmap: str = "viridis", vmin: Optional[float] = None,
                 vmax: Optional[float] = None, colorbar: bool = True, fmt: str = "{:.2g}") -> Figure:
    """Layers × heads image of a score table.

    Args:
        scores: [L, H] finite values (tensor, array or nested list).
        title: axes title.
        cbar_label: colour-bar label (what the colour means, with units).
        ax: draw into this axes (its figure is returned); default a new figure sized to the grid.
        annotate: write each value in its cell; "auto" does so when L·H <= ANNOTATE_MAX_CELLS.
        vmin, vmax: colour range (default: the data's range).
        colorbar: add a colour bar (turn off when the caller draws one shared bar).
        fmt: format of the annotations.
    Returns:
        the Figure holding ``ax``.
    """
    x = as_table(scores, "scores")
    L, H = x.shape
    annotate = _wants_annotation(annotate, L, H)
    fig, ax = figure_for(ax, _panel_size(L, H, annotate))
    image = ax.imshow(x, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    index_ticks(ax, H, "x")
    index_ticks(ax, L, "y")
    ax.set_xlabel(HEAD_LABEL)
    ax.set_ylabel(LAYER_LABEL)
    ax.set_title(title)
    if annotate:
        _annotate(ax, x, image, fmt)
    if colorbar:
        fig.colorbar(image, ax=ax, label=cbar_label, shrink=0.9)
    return fig


def hess_heatmaps(cam: Any, pc: Any, mixed: Any, lam: float, *, shared_scale: bool = True,
                  annotate: bool | str = "auto") -> Figure:
    """Camera, point-cloud and λ-mixed HeSS side by side (RQ1).

    Args:
        cam, pc, mixed: [L, H] per-layer-normalised HeSS (each row sums to 1, method.md §3.4).
        lam: λ used for ``mixed`` (λ·cam + (1−λ)·pc).
        shared_scale: one colour range and one colour bar for all three panels (they share units).
    Returns:
        a Figure with three heatmap panels (plus colour-bar axes).
    """
    tables = {"camera HeSS_cam": as_table(cam, "cam"), "point-cloud HeSS_pc": as_table(pc, "pc"),
              f"mixed HeSS, λ = {lam:g}": as_table(mixed, "mixed")}
    shapes = {name.split()[0]: t.shape for name, t in tables.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"cam, pc and mixed must share one [L, H] shape, got {shapes}")
    L, H = next(iter(tables.values())).shape
    fig, axes = new_figure(1, 3, _panel_size(L, H, _wants_annotation(annotate, L, H)))
    lo = min(t.min() for t in tables.values()) if shared_scale else None
    hi = max(t.max() for t in tables.values()) if shared_scale else None
    label = "share of the layer's sensitivity (row sums to 1)"
    for ax, (name, table) in zip(axes[0], tables.items()):
        head_heatmap(table, title=name, cbar_label=label, ax=ax, annotate=annotate, vmin=lo, vmax=hi,
                     colorbar=not shared_scale)
    if shared_scale:
        fig.colorbar(axes[0, -1].images[0], ax=list(axes[0]), label=label, shrink=0.9)
    fig.suptitle(f"HeSS per head ({NAMING_NOTE})")
    return fig


def allocation_heatmaps(blocks: Mapping[float, Any], num_key_blocks: int, *,
                        annotate: bool | str = "auto") -> Figure:
    """Per-head keep ratio c_h / n_k at several target keep ratios, one panel each, colour scale 0..1.

    Args:
        blocks: target keep ratio -> [L, H] integer key-block budgets c_h in [0, n_k].
        num_key_blocks: n_k, the patch key blocks per query-block row.
    Returns:
        a Figure with one heatmap panel per entry (sorted by decreasing keep ratio) and one colour bar.
    """
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError("allocation_heatmaps needs a non-empty mapping keep_ratio -> [L, H] block counts")
    if isinstance(num_key_blocks, bool) or not isinstance(num_key_blocks, (int, np.integer)) or num_key_blocks < 1:
        raise ValueError(f"num_key_blocks must be a positive integer, got {num_key_blocks!r}")
    tables = {float(r): as_table(c, f"blocks[{r!r}]") for r, c in blocks.items()}
    shapes = {r: t.shape for r, t in tables.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all allocations must share one [L, H] shape, got {shapes}")
    for r, t in tables.items():
        if (t != np.round(t)).any() or t.min() < 0 or t.max() > num_key_blocks:
            raise ValueError(f"blocks[{r:g}] must hold integers in [0, n_k = {num_key_blocks}], "
                             f"got range [{t.min():g}, {t.max():g}]")
    L, H = next(iter(tables.values())).shape
    ratios = sorted(tables, reverse=True)
    fig, axes = new_figure(1, len(ratios), _panel_size(L, H, _wants_annotation(annotate, L, H)))
    for ax, r in zip(axes[0], ratios):
        share = tables[r] / num_key_blocks
        head_heatmap(share, title=f"target keep ratio {r:g}\n(mean c_h/n_k = {share.mean():.3f})",
                     cbar_label="", ax=ax, annotate=annotate, vmin=0.0, vmax=1.0, colorbar=False,
                     cmap="magma", fmt="{:.2f}")
    fig.colorbar(axes[0, 0].images[0], ax=list(axes[0]), label="keep ratio per head c_h / n_k", shrink=0.9)
    fig.suptitle(f"Key-block budget per head (n_k = {num_key_blocks}; {NAMING_NOTE})")
    return fig


def dispersion_bars(scores: Any, *, title: str = "Per-layer dispersion of head sensitivity") -> Figure:
    """Per-layer coefficient of variation and Gini coefficient as bars (RQ1 heterogeneity).

    Args:
        scores: [L, H] non-negative head scores.
    Returns:
        a Figure with two stacked panels (CV, Gini); each shows the mean over layers as a dashed line.
    """
    x = as_table(scores, "scores")
    L, H = x.shape
    series = {"coefficient of variation (std / mean)": coefficient_of_variation(x),
              f"Gini coefficient (0 = equal, max (H−1)/H = {(H - 1) / H:.2f})": gini(x)}
    fig, axes = new_figure(2, 1, (float(np.clip(0.3 * L + 2.5, 5.0, 10.0)), 2.9))
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        ax.bar(np.arange(L), values, color="tab:blue", label="per layer")
        ax.axhline(np.nanmean(values), color="tab:red", ls="--", lw=1.2,
                   label=f"mean over layers = {np.nanmean(values):.3f}")
        index_ticks(ax, L, "x")
        ax.set_xlim(-0.6, L - 0.4)
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        ax.set_ylim(0, 1.35 * top if top > 0 else 1.0)  # headroom for the legend
        ax.set_xlabel(LAYER_LABEL)
        ax.set_ylabel(name.split(" (")[0])
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title} ({H} heads per layer)")
    return fig


def extreme_heads_bars(scores: Any, low: Any, high: Any, *, k: int = 5,
                       title: str = "Most / least sensitive heads with their calibration-bootstrap 95% CI") -> Figure:
    """The ``k`` most and least sensitive heads of ``scores`` as bars with error bars ``[low, high]``.

    Args:
        scores: [L, H] the table in use; low, high: [L, H] its bootstrap interval (``hess.rq.stability``).
    """
    from hess.plots.stats import extreme_heads_table

    x, lo, hi = as_table(scores, "scores"), as_table(low, "low"), as_table(high, "high")
    if not x.shape == lo.shape == hi.shape:
        raise ValueError(f"scores, low and high must share one [L, H] shape, got {x.shape}, {lo.shape}, {hi.shape}")
    top = extreme_heads_table(x, k=min(k, x.size))
    L, H = x.shape
    fig, axes = new_figure(1, 1, (max(5.0, 0.45 * len(top) + 1.5), 3.4))
    ax = axes[0, 0]
    pos = np.arange(len(top))
    val = top["score"].to_numpy()
    l_, h_ = lo[top["global_layer"], top["head"]], hi[top["global_layer"], top["head"]]
    colours = ["tab:red" if g == "most" else "tab:blue" for g in top["group"]]
    ax.bar(pos, val, color=colours, alpha=0.75)
    ax.errorbar(pos, val, yerr=[np.clip(val - l_, 0, None), np.clip(h_ - val, 0, None)], fmt="none", ecolor="black",
                capsize=3, lw=1.2)
    ax.axhline(1.0 / H, color="gray", ls="--", lw=1, label=f"uniform share 1/H = {1 / H:.3f}")
    category_ticks(ax, list(top["head_label"]), "x")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_ylabel("share of the layer's sensitivity")
    ax.set_title(f"{title}\n(red: {k} most, blue: {k} least; {NAMING_NOTE})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def rank_correlation_matrix(score_tables: Mapping[str, Any], *, title: str = "Rank agreement between scorers",
                            pooled: bool = True) -> Figure:
    """Spearman ρ between score tables: pooled over all heads, and mean of per-layer ρ.

    Args:
        score_tables: name -> [L, H] scores, at least two (e.g. HeSS, oracle, michel, entropy).
        pooled: also draw ρ pooled over all heads (only meaningful when every table is on one scale across
            layers; per-layer-normalised HeSS is not).
    Returns:
        a Figure with two (one without ``pooled``) names × names panels and one colour bar (-1..1); cells with no defined ρ
        (a constant table) read "n/a".
    """
    corr = rank_correlations(score_tables)
    names = list(score_tables)
    n = len(names)
    side = float(np.clip(0.7 * n + 2.2, 3.8, 9.0))
    fig, axes = new_figure(1, 2 if pooled else 1, (side, side * 0.85))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    panels = {"pooled over all L·H heads": corr["pooled"]} if pooled else {}
    panels["mean of per-layer ρ (over H heads)"] = corr["per_layer"]
    for ax, (name, frame) in zip(axes[0], panels.items()):
        values = frame.to_numpy()
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        category_ticks(ax, names, "x")
        category_ticks(ax, names, "y")
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_xlabel("score table")
        ax.set_ylabel("score table")
        ax.set_title(f"Spearman ρ, {name}", fontsize=10)
        _annotate(ax, values, image, "{:.2f}")
    fig.colorbar(axes[0, 0].images[0], ax=list(axes[0]), label="Spearman ρ", shrink=0.9)
    fig.suptitle(title)
    return fig
