"""Tables and plots of each research question, built from stored result rows only.

    df = load_results("ablations/outputs/reproduce/demo-20261123-220000")
    report = REPORTS.get("rq2_sparsity")(rows_of(df, "rq2_sparsity"))   # Report(markdown, csv, figures)

Every number comes from the records (``hess.results.load_results``): rows with ``scene_id == "all"``
give the table cells (pose metrics pooled over all frame pairs, the rest averaged over scenes; a
stochastic method's seeds averaged); the per-scene rows give the paired differences with their 95%
bootstrap CIs (``hess.rq.paired``; ``Report.paired`` → ``paired_differences.csv``) and the plots' bars.  Records carry ``rq.name`` (which experiment) and
``rq.method`` (which variant).  A builder reads nothing but the DataFrame, so ``hess report``
regenerates the same tables from the same rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

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
    paired: Optional[pd.DataFrame] = None  # PAIRED_COLUMNS rows (hess.rq.paired) of this experiment


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


def accuracy_keys(df: pd.DataFrame) -> dict[str, str]:
    """Full metric key -> short label of the Δ columns."""
    ds = dataset_of(df)
    return {f"{ds}/auc30": "AUC@30", f"{ds}/chamfer": "Chamfer"}


def compare(df: pd.DataFrame, name: str, *, label: Optional[Callable[[pd.DataFrame], pd.Series]] = None
            ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(rows relabelled, paired differences, settings) of experiment ``name`` (its file's ``runner:``)."""
    from hess.rq.paired import comparison_settings, paired_differences

    settings = comparison_settings(name)
    if label is not None:
        df = df.assign(method=label(df))
    paired = paired_differences(df, name, baselines=settings["baselines"], metrics=settings["metrics"],
                                compare_at=settings["compare_at"], dataset=dataset_of(df))
    return df, paired, settings


def difference_figures(paired: pd.DataFrame, baselines: Sequence[str], metrics: Sequence[str], figures: dict,
                       notes: list) -> None:
    """One forest plot (Δ with 95% CI) per baseline and metric."""
    from hess.plots import difference_plot

    for base in baselines:
        for key in metrics:
            short = key.rpartition("/")[2]
            add_figure(figures, notes, f"delta_{short}_vs_{base}".replace(" ", "_").replace("=", ""),
                       lambda b=base, k=key: difference_plot(paired, k, baseline=b))


def seeds_column(df: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``runs`` = how many runs (seeds) each (method, keep ratio) row averages."""
    counts = df.assign(_k=df["keep_ratio"].fillna(_NO_KEEP)).groupby(["method", "_k"])["run_id"].nunique()
    keys = zip(table["method"], table["keep_ratio"].fillna(_NO_KEEP))
    return table.assign(runs=[int(counts.get(k, 0)) for k in keys])


def delta_parts(paired: pd.DataFrame, table: pd.DataFrame, baselines: Sequence[str], keys: dict[str, str],
                method_col: str = "method") -> list[str]:
    """A Δ table per baseline (Δ [95% CI], * = CI excludes 0) and the sentence naming significant rows."""
    from hess.rq.paired import add_delta_columns, significance_summary

    parts = []
    base_cols = [c for c in (method_col, "keep_ratio") if c in table]
    for base in baselines:
        if not (paired["baseline"] == base).any():
            continue
        delta = add_delta_columns(table[base_cols], paired, base, keys, method_col)
        delta = delta[delta[method_col] != base]
        parts += [f"**Paired differences vs {base}** (mean over the same scenes; pose AUC pooled over frame pairs; "
                  "95% percentile bootstrap CI resampling scenes, 2000 resamples, seed 0; * = CI excludes 0)",
                  markdown_table(delta)]
        parts += [significance_summary(paired, key, base) for key in keys]
    return [p for p in parts if p]


# ----------------------------------------------------------------------------------------- RQ2, RQ3
@REPORTS.register("rq2_sparsity")
def rq2(df: pd.DataFrame) -> Report:
    """Accuracy vs sparsity, dense and HeSS (method × keep ratio), paired Δ vs the baselines."""
    df, paired, settings = compare(df, "rq2_sparsity")
    table = order(summary(df, ["method", "keep_ratio"], accuracy_columns(df)))
    figures, notes = {}, []
    tradeoff_figures(df, figures, notes)
    difference_figures(paired, settings["baselines"], list(accuracy_keys(df))[:1], figures, notes)
    parts = [markdown_table(table), *delta_parts(paired, table, settings["baselines"], accuracy_keys(df))]
    return Report(finish(parts, notes), table, figures, paired)


@REPORTS.register("rq3_baselines")
def rq3(df: pd.DataFrame) -> Report:
    """Every scorer / ablation at each keep ratio with paired Δ (95% CI) vs each baseline of the file."""
    df, paired, settings = compare(df, "rq3_baselines")
    columns = {**accuracy_columns(df), "budget/wasted_fraction": "budget used"}
    table = order(summary(df, ["method", "keep_ratio"], columns))
    table["budget used"] = 1.0 - table["budget used"]  # fraction of the layer budget H·c_base allocated
    table = seeds_column(df, table)
    figures, notes = {}, []
    tradeoff_figures(df, figures, notes)
    difference_figures(paired, settings["baselines"], list(accuracy_keys(df))[:1], figures, notes)
    over = table[table["budget used"] > 1.0 + 1e-9]
    excess = ("; ".join(f"`{m}` at keep {k:g} allocates {100 * (u - 1):.1f}% more blocks than its budget"
                        for m, k, u in zip(over["method"], over["keep_ratio"], over["budget used"]))
              or "no row allocates more blocks than its budget")
    matched = ("rows whose realised density differs from the baseline's at the same keep ratio are compared with "
               "the baseline's per-scene accuracy interpolated at their realised density"
               if settings["compare_at"] == "realized_density" else "rows are matched on the target keep ratio")
    note = ("Budget-conserving methods at one keep ratio share the per-layer block budget exactly, so their realised "
            f"densities match; `hess-no-capping` (clip, no redistribution) does not conserve it: {excess} "
            f"(`budget used` = allocated / budget; > 1 exceeds it). Matching: {matched}. `runs` > 1: one run per "
            "seed; cells average the seeds and the CI resamples seeds and scenes.")
    parts = [markdown_table(table), note, *delta_parts(paired, table, settings["baselines"], accuracy_keys(df))]
    return Report(finish(parts, notes), table, figures, paired)


# --------------------------------------------------------------------------------------------- RQ4
def lam_label(df: pd.DataFrame) -> pd.Series:
    """RQ4's row label ``lam=<λ>``."""
    return df["score.lam"].map(lambda v: f"lam={v:g}")


@REPORTS.register("rq4_lambda")
def rq4(df: pd.DataFrame) -> Report:
    """λ × keep ratio grids of AUC@30 and Chamfer, and paired Δ vs the file's baseline λ."""
    from hess.plots import lambda_grid

    df, paired, settings = compare(df, "rq4_lambda", label=lam_label)
    columns = accuracy_columns(df)
    table = summary(df, ["score.lam", "keep_ratio"], columns).rename(columns={"score.lam": "lam"})
    table = table.sort_values(["lam", "keep_ratio"], ascending=[True, False], kind="stable").reset_index(drop=True)
    parts = []
    for col in ("AUC@30 ↑", "Chamfer ↓"):
        grid = table.pivot(index="lam", columns="keep_ratio", values=col).sort_index(axis=1, ascending=False)
        grid.columns = [f"keep {k:g}" for k in grid.columns]
        parts.append(f"**{col}** (rows λ: 1 = camera error only, 0 = point-cloud error only)\n\n"
                     + markdown_table(grid.reset_index().rename(columns={"lam": "λ"})))
    labelled = table.assign(method=table["lam"].map(lambda v: f"lam={v:g}"))
    parts += delta_parts(paired, labelled, settings["baselines"], accuracy_keys(df))
    figures, notes, ds, rows = {}, [], dataset_of(df), scene_rows(df)
    for metric in ("auc30", "chamfer"):
        add_figure(figures, notes, metric, lambda m=metric: lambda_grid(rows, f"{ds}/{m}", kind="heatmap"))
    difference_figures(paired, settings["baselines"], list(accuracy_keys(df))[:1], figures, notes)
    return Report(finish(parts, notes), table, figures, paired)


# --------------------------------------------------------------------------------------------- RQ5
def hess_lam_label(df: pd.DataFrame) -> pd.Series:
    """RQ5's row label: ``hess lam=<λ>`` for HeSS rows, the method otherwise."""
    return df["method"].where(df["method"] != "hess", df["score.lam"].map(lambda v: f"hess lam={v:g}"))


@REPORTS.register("rq5_pi3")
def rq5(df: pd.DataFrame) -> Report:
    """Dense / uniform / HeSS on π³ at each λ (HeSS only) and keep ratio, paired Δ vs the baselines."""
    df = df.assign(**{"score.lam": df["score.lam"].where(df["method"] == "hess")})
    labelled, paired, settings = compare(df, "rq5_pi3", label=hess_lam_label)
    table = summary(df.assign(**{"score.lam": df["score.lam"].fillna(_NO_KEEP)}), ["method", "score.lam", "keep_ratio"],
                    accuracy_columns(df)).rename(columns={"score.lam": "lam"})
    table["lam"] = table["lam"].replace(_NO_KEEP, np.nan)
    table = order(table)
    figures, notes = {}, []
    tradeoff_figures(labelled, figures, notes)
    difference_figures(paired, settings["baselines"], list(accuracy_keys(df))[:1], figures, notes)
    rows = table.assign(method=[m if pd.isna(l) else f"{m} lam={l:g}" for m, l in zip(table["method"], table["lam"])])
    parts = [markdown_table(table), *delta_parts(paired, rows, settings["baselines"], accuracy_keys(df))]
    return Report(finish(parts, notes), table, figures, paired)


# ----------------------------------------------------------------------------------------- latency
@REPORTS.register("latency")
def latency(df: pd.DataFrame) -> Report:
    """End-to-end and global-attention time per method and keep ratio, speed-ups, paired Δ ms vs dense."""
    from hess.plots import latency_bars

    df, paired, settings = compare(df, "latency")
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
    keys = {LATENCY_KEY: "e2e ms", GLOBAL_ATTN_KEY: "attention ms"}
    parts = [markdown_table(table), note, *delta_parts(paired, table, settings["baselines"], keys)]
    return Report(finish(parts, notes), table, figures, paired)
