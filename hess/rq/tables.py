"""Tables and plots of each research question, built from stored result rows only.

    df = load_results("ablations/outputs/reproduce/demo-20261123-220000")
    report = REPORTS.get("rq2_sparsity")(rows_of(df, "rq2_sparsity"))   # Report(markdown, csv, figures)

Every number comes from the records (``hess.results.load_results``): rows with ``scene_id == "all"``
give the table cells (pose metrics pooled over all frame pairs, the rest averaged over scenes); the
per-scene rows give the plots' error bars.  Records carry ``rq.name`` (which experiment) and
``rq.method`` (which variant).  A builder reads nothing but the DataFrame, so ``hess report``
regenerates the same tables from the same rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from hess.registry import Registry
from hess.results import DENSITY_KEY, LATENCY_KEY

GLOBAL_ATTN_KEY = "perf/global_attn_ms"
ALL = "all"
_NO_KEEP = -1.0  # stands for the dense runs' missing keep ratio inside groupings


@dataclass
class Report:
    """One experiment's outputs: markdown body, the tidy CSV behind it, figures (name -> Figure)."""

    markdown: str
    csv: pd.DataFrame
    figures: dict[str, Any] = field(default_factory=dict)


REPORTS: Registry[Callable[[pd.DataFrame], Report]] = Registry("report")


# ------------------------------------------------------------------------------------------ helpers
def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals, NaN/None as "n/a"."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """GitHub markdown of ``frame`` (no index)."""
    head = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def rows_of(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of experiment ``name`` (column ``rq.name``), with a ``method`` column."""
    if "rq.name" not in df:
        raise ValueError("these results carry no rq.name column: they were not written by hess reproduce")
    part = df[df["rq.name"] == name]
    if part.empty:
        raise ValueError(f"no rows of {name!r}; present: {sorted(df['rq.name'].dropna().unique())}")
    return part.assign(method=part["rq.method"].astype(str))


def dataset_of(df: pd.DataFrame) -> str:
    """The dataset prefix of the accuracy metric keys (``data.dataset``)."""
    values = sorted(df["data.dataset"].dropna().unique()) if "data.dataset" in df else []
    return str(values[0]) if values else "synthetic"


def accuracy_columns(df: pd.DataFrame) -> dict[str, str]:
    """Metric key -> column name of the accuracy tables."""
    ds = dataset_of(df)
    return {f"{ds}/auc30": "AUC@30 ↑", f"{ds}/chamfer": "Chamfer ↓", DENSITY_KEY: "realised density",
            LATENCY_KEY: "latency ms"}


def summary(df: pd.DataFrame, keys: Sequence[str], columns: dict[str, str]) -> pd.DataFrame:
    """One row per ``keys`` group of the ``all`` rows; metric ``k`` goes to column ``columns[k]``.

    Dense rows (keep ratio NaN) form their own group.
    """
    rows = df[(df["scene_id"] == ALL) & df["metric"].isin(list(columns))]
    rows = rows.assign(keep_ratio=rows["keep_ratio"].fillna(_NO_KEEP))
    table = rows.groupby([*keys, "metric"], sort=True)["value"].mean().unstack("metric")
    table = table.reindex(columns=list(columns)).rename(columns=columns).reset_index()
    table.columns.name = None
    if "keep_ratio" in table:
        table["keep_ratio"] = table["keep_ratio"].replace(_NO_KEEP, np.nan)
        table.insert(list(table.columns).index("keep_ratio") + 1, "sparsity", (1.0 - table["keep_ratio"]).round(6))
    return table


def order(frame: pd.DataFrame, first: Sequence[str] = ("dense", "uniform", "hess")) -> pd.DataFrame:
    """Dense, uniform, HeSS first, then the rest by name; keep ratio decreasing within a method."""
    rank = {m: i for i, m in enumerate(first)}
    keys = frame.assign(_r=frame["method"].map(lambda m: rank.get(m, len(first))),
                        _k=-frame["keep_ratio"].fillna(2.0) if "keep_ratio" in frame else 0.0)
    by = ["_r", "method"] + [c for c in ("lam",) if c in frame] + ["_k"]
    return keys.sort_values(by, kind="stable").drop(columns=["_r", "_k"]).reset_index(drop=True)


def scene_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per-scene rows with a value (the plots' input)."""
    return df[df["scene_id"] != ALL].dropna(subset=["value"])


def add_figure(figures: dict, notes: list, name: str, make: Callable[[], Any]) -> None:
    """Draw a figure; one that cannot be drawn from these rows is noted in the report, not hidden."""
    try:
        figures[name] = make()
    except ValueError as err:
        notes.append(f"- figure `{name}` not drawn: {err}")


def tradeoff_figures(df: pd.DataFrame, figures: dict, notes: list) -> None:
    """AUC@30 and Chamfer vs realised density, one line per method."""
    from hess.plots import tradeoff_curve

    ds, rows = dataset_of(df), scene_rows(df)
    for metric in ("auc30", "chamfer"):
        add_figure(figures, notes, metric,
                   lambda m=metric: tradeoff_curve(rows, f"{ds}/{m}", x="realized_density", hue="method"))


def finish(parts: Sequence[str], notes: Sequence[str]) -> str:
    """Markdown parts separated by blank lines, notes about undrawn figures last."""
    return "\n\n".join([*parts, *(["\n".join(notes)] if notes else [])])


# ----------------------------------------------------------------------------------------- RQ2, RQ3
@REPORTS.register("rq2_sparsity")
def rq2(df: pd.DataFrame) -> Report:
    """Accuracy vs sparsity, dense and HeSS (method × keep ratio)."""
    table = order(summary(df, ["method", "keep_ratio"], accuracy_columns(df)))
    figures, notes = {}, []
    tradeoff_figures(df, figures, notes)
    return Report(finish([markdown_table(table)], notes), table, figures)


@REPORTS.register("rq3_baselines")
def rq3(df: pd.DataFrame) -> Report:
    """Every scorer / ablation at each keep ratio, with the difference to uniform at the same keep ratio."""
    table = order(summary(df, ["method", "keep_ratio"], accuracy_columns(df)))
    uniform = table[table["method"] == "uniform"].set_index("keep_ratio")
    for col, name in (("AUC@30 ↑", "ΔAUC@30 vs uniform"), ("Chamfer ↓", "ΔChamfer vs uniform")):
        base = table["keep_ratio"].map(uniform[col]) if not uniform.empty else np.nan
        table[name] = table[col] - base
    figures, notes = {}, []
    tradeoff_figures(df, figures, notes)
    note = ("Methods at one keep ratio share the per-layer block budget exactly (top-k, no CDF floor), so their "
            "realised densities match; `hess-no-capping` (clip: clamp to [min_blocks, n_k] without redistribution) "
            "does not conserve the budget, so compare its row at its own realised density.")
    return Report(finish([markdown_table(table), note], notes), table, figures)


# --------------------------------------------------------------------------------------------- RQ4
@REPORTS.register("rq4_lambda")
def rq4(df: pd.DataFrame) -> Report:
    """λ × keep ratio grids of AUC@30 and Chamfer."""
    from hess.plots import lambda_grid

    columns = accuracy_columns(df)
    table = summary(df, ["score.lam", "keep_ratio"], columns).rename(columns={"score.lam": "lam"})
    table = table.sort_values(["lam", "keep_ratio"], ascending=[True, False], kind="stable").reset_index(drop=True)
    parts = []
    for col in ("AUC@30 ↑", "Chamfer ↓"):
        grid = table.pivot(index="lam", columns="keep_ratio", values=col).sort_index(axis=1, ascending=False)
        grid.columns = [f"keep {k:g}" for k in grid.columns]
        parts.append(f"**{col}** (rows λ: 1 = camera error only, 0 = point-cloud error only)\n\n"
                     + markdown_table(grid.reset_index().rename(columns={"lam": "λ"})))
    figures, notes, ds, rows = {}, [], dataset_of(df), scene_rows(df)
    for metric in ("auc30", "chamfer"):
        add_figure(figures, notes, metric, lambda m=metric: lambda_grid(rows, f"{ds}/{m}", kind="heatmap"))
    return Report(finish(parts, notes), table, figures)


# --------------------------------------------------------------------------------------------- RQ5
@REPORTS.register("rq5_pi3")
def rq5(df: pd.DataFrame) -> Report:
    """Dense / uniform / HeSS on π³ at each λ (HeSS only) and keep ratio."""
    df = df.assign(**{"score.lam": df["score.lam"].where(df["method"] == "hess")})
    table = summary(df.assign(**{"score.lam": df["score.lam"].fillna(_NO_KEEP)}), ["method", "score.lam", "keep_ratio"],
                    accuracy_columns(df)).rename(columns={"score.lam": "lam"})
    table["lam"] = table["lam"].replace(_NO_KEEP, np.nan)
    table = order(table)
    figures, notes = {}, []
    labelled = df.assign(method=df["method"] + df["score.lam"].map(lambda v: "" if pd.isna(v) else f" λ={v:g}"))
    tradeoff_figures(labelled, figures, notes)
    return Report(finish([markdown_table(table)], notes), table, figures)


# ----------------------------------------------------------------------------------------- latency
@REPORTS.register("latency")
def latency(df: pd.DataFrame) -> Report:
    """End-to-end and global-attention time per method and keep ratio, and speed-ups over dense."""
    from hess.plots import latency_bars

    columns = {LATENCY_KEY: "end-to-end ms", GLOBAL_ATTN_KEY: "global attention ms", DENSITY_KEY: "realised density"}
    table = order(summary(df, ["method", "keep_ratio"], columns))
    dense = table[table["method"] == "dense"]
    for col, name in (("end-to-end ms", "speed-up e2e"), ("global attention ms", "speed-up attention")):
        table[name] = float(dense[col].iloc[0]) / table[col] if len(dense) else np.nan
    figures, notes = {}, []
    add_figure(figures, notes, "bars", lambda: latency_bars(scene_rows(df), hue="method"))
    note = ("Times are medians over rounds (mean over scenes); each round times one forward of every method on every "
            "scene, interleaved, so that machine load affects all methods alike.  Global attention is the summed time "
            "of the global layers' attention cores inside the same forwards.  Compare within one table only.")
    return Report(finish([markdown_table(table), note], notes), table, figures)
