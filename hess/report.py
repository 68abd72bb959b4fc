"""``hess report``: markdown tables, CSV and PNG plots of every experiment, from stored results only.

Question: what do the recorded runs of an experiment show (RQ1–RQ5, latency)?
Command:  hess report ablations/outputs/reproduce/demo-20261123-220000 --out ablations/results/demo
Output:   <out>/<experiment>.md (provenance header + tables), <out>/<experiment>.csv, <out>/<experiment>_<plot>.png,
          <out>/paired_differences.csv (every comparison of every experiment: Δ with its 95% bootstrap CI)

Rows are read with ``hess.results.load_results``; each run's meta.json gives the provenance (date, git SHA,
model weights).  Nothing else is read, so running the command twice on the same results writes the same
markdown and CSV.  Experiments are recognised by the ``rq.name`` column written by ``hess reproduce``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from hess.config import ConfigError
from hess.results import load_results, write_atomic
from hess.rq import heterogeneity  # noqa: F401  (registers the rq1 report)
from hess.rq.tables import REPORTS, Report, rows_of

RANDOM_INIT_NOTICE = ("> **Random weights.** These runs used a randomly initialised model (the trained checkpoint was "
                      "not available). The numbers check that the pipeline runs end to end; they say nothing about "
                      "HeSS.")


def _question(name: str) -> str:
    from hess.experiment import load_experiment
    from hess.rq.runners import configs_dir

    path = configs_dir() / f"{name}.yaml"
    return load_experiment(path).question if path.is_file() else ""


def provenance(df: pd.DataFrame) -> dict[str, Any]:
    """Dates, git SHAs, model weights and sources of the runs behind ``df`` (from their meta.json)."""
    metas = []
    for run_dir in sorted(df["run_dir"].unique()):
        path = Path(run_dir) / "meta.json"
        metas.append(json.loads(path.read_text()) if path.is_file() else {})
    pick = lambda key: sorted({str(m[key]) for m in metas if m.get(key) is not None})  # noqa: E731
    return {"runs": len(metas), "started": pick("started"), "git_sha": pick("git_sha"),
            "weights": pick("model_weights"), "sources": pick("model_source"), "dirty": pick("git_dirty")}


def header(name: str, df: pd.DataFrame) -> str:
    """Title, question, command, date, commit, model and where the runs are."""
    info = provenance(df)
    command = sorted(df["rq.command"].dropna().unique()) if "rq.command" in df else []
    dates = info["started"]
    when = f"{dates[0]} … {dates[-1]}" if len(dates) > 1 else (dates[0] if dates else "unknown")
    folders = sorted({str(Path(d).parent.parent) for d in df["run_dir"].unique()})
    lines = [f"# {name}", ""]
    question = _question(name)
    if question:
        lines += [f"**Question.** {question}", ""]
    lines += [f"- command: `{'; '.join(command) or 'unknown'}`",
              f"- runs: {info['runs']} in `{', '.join(folders)}`, started {when}",
              f"- git: {', '.join(s[:10] for s in info['git_sha']) or 'unknown'}"
              + (" (uncommitted changes)" if "True" in info["dirty"] else ""),
              f"- model: {', '.join(info['sources']) or 'unknown'} (weights: {', '.join(info['weights']) or 'unknown'})",
              "- cells: rows `scene_id = all` of the records (pose metrics pooled over all frame pairs, other metrics "
              "averaged over scenes); Δ: paired over the same scenes with 95% bootstrap CIs (also in "
              "`paired_differences.csv`); curves of absolute values: mean ± std over scenes", ""]
    if "random-init" in info["weights"]:
        lines += [RANDOM_INIT_NOTICE, ""]
    return "\n".join(lines)


def write_report(name: str, report: Report, body_header: str, out: Path) -> list[Path]:
    """``<out>/<name>.md``, ``<name>.csv`` and ``<name>_<figure>.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    from hess.plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / f"{name}.md", out / f"{name}.csv"
    figures = "\n".join(f"![{fig}]({name}_{fig}.png)" for fig in report.figures)
    text = "\n\n".join(part for part in (body_header.rstrip(), report.markdown, figures) if part) + "\n"
    write_atomic(md_path, lambda tmp: Path(tmp).write_text(text))
    write_atomic(csv_path, lambda tmp: report.csv.to_csv(tmp, index=False, float_format="%.6g"))
    paths = [md_path, csv_path]
    if report.paired is not None:
        from hess.rq.paired import merge_paired_csv

        paths.append(merge_paired_csv(out, name, report.paired))
    for fig_name, fig in report.figures.items():
        paths.append(save_figure(fig, out / f"{name}_{fig_name}.png"))
    return paths


def write_skipped(name: str, reason: str, command: str, out: Path) -> Path:
    """The markdown of an experiment that measured nothing, saying why (e.g. RQ5 without trained π³)."""
    out.mkdir(parents=True, exist_ok=True)
    question = _question(name)
    text = (f"# {name}\n\n" + (f"**Question.** {question}\n\n" if question else "") + f"- command: `{command}`\n\n"
            f"**Not measured.** {reason}\n")
    path = out / f"{name}.md"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_reports(sources: Sequence[str | Path], out: str | Path, names: Optional[Sequence[str]] = None) -> list[Path]:
    """Tables and plots of every experiment found in ``sources`` (or only ``names``) into ``out``."""
    frames = [load_results(s) for s in sources]
    df = pd.concat(frames, ignore_index=True)
    present = sorted(df["rq.name"].dropna().unique()) if "rq.name" in df else []
    if not present:
        raise ConfigError(f"no experiment rows (column rq.name) in {', '.join(map(str, sources))}: hess report "
                          "reads the run folders written by hess reproduce; read evaluate/sweep folders with "
                          "hess.results.load_results (sweeps also write trials.csv)")
    unknown = [n for n in present if n not in REPORTS]
    if unknown:
        raise ValueError(f"no report builder for {unknown}; known: {', '.join(REPORTS.names())}")
    paths = []
    for name in names or present:
        rows = rows_of(df, name)
        paths += write_report(name, REPORTS.get(name)(rows), header(name, rows), Path(out))
    return paths


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of the command (``hess.cli`` calls this)."""
    parser.add_argument("results", nargs="+", help="run folders or globs written by hess reproduce (load_results)")
    parser.add_argument("--out", required=True, help="report folder (markdown tables, CSV, PNG)")
    parser.add_argument("--only", nargs="*", help="experiment names (e.g. rq2_sparsity); default: all present")


def run_cli(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code."""
    for path in write_reports(args.results, args.out, args.only):
        print(path)
    return 0
