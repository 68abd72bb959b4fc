"""``hess reproduce``: run the RQ1–RQ5 and latency experiments, then write their tables and plots.

Question: every research question of the study (method.md §6) on one preset.
Command:  hess reproduce all --preset demo            # embedded model, synthetic scenes, CPU-sized
          hess reproduce rq2 --preset paper           # VGGT-1B weights + CO3Dv2/DTU (users with data)
          hess reproduce rq3 data.num_scenes=8 --preset demo --no-wandb   # overrides right after the RQ
          hess reproduce all --preset paper --dry-run   # preflight: weights, data, calibration split, memory
Output:   runs under <out>/reproduce/<preset>-<timestamp>/<experiment>/<run>/ (ablations/outputs by default),
          tables/plots in ablations/results/<preset>/ (regenerate them with ``hess report <runs> --out ...``).

Presets: the experiment files' ``demo`` / ``paper`` presets plus the sizing of ``hess.rq.runners.SIZING``
(demo: 84×84 scenes of 4 frames, key blocks of 6 patches); ``micro`` is the demo shrunk for tests.
Calibration artifacts are cached by config hash under ``<out>/cache``, so every RQ reuses one calibration.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hess.config import ConfigError, RunConfig, apply_overrides
from hess.rq.runners import ORDER, RUNNERS, SIZING, experiment


def reproduce(rqs: Sequence[str], preset: str = "demo", *, out: str | Path = "ablations/outputs",
              report_dir: Optional[str | Path] = None, overrides: Sequence[str] = (), wandb: bool = True,
              progress: bool = True, configs: Optional[str | Path] = None,
              now: Optional[_dt.datetime] = None, pipeline: Any = None, raise_single: bool = True) -> dict[str, Any]:
    """Run ``rqs`` (names of ``RUNNERS``, in order) on ``preset``; write the reports.

    Args:
        out: output root: run directories and the calibration cache.
        report_dir: where tables and plots go (default ``ablations/results/<preset>``).
        overrides: dotted ``KEY=VALUE`` overrides applied to every run (after the preset).
        wandb: False disables W&B (``log.wandb_mode=disabled``).
        configs: folder of the experiment files (default ``ablations/configs``).
        pipeline: a ``Pipeline`` to reuse (loaded models, scenes, scores; e.g. across calls of a rehearsal).
        raise_single: a single RQ's failure raises (default); False records it in "failed" as for several.
    Returns:
        {"session": runs folder, "report_dir": ..., "reports": paths, "skipped": {rq: reason},
        "failed": {rq: error} (only when several RQs run; a single RQ raises), "seconds": {rq: s}}.
    """
    from hess.report import write_reports, write_skipped
    from hess.rq.pipeline import Pipeline

    unknown = [r for r in rqs if r not in RUNNERS]
    if unknown:
        raise ConfigError(f"unknown research question(s) {unknown}; known: {', '.join(ORDER)}, all")
    now = now or _dt.datetime.now()
    session = Path(out) / "reproduce" / f"{preset}-{now:%Y%m%d-%H%M%S}"
    report_dir = Path(report_dir) if report_dir is not None else Path("ablations") / "results" / preset
    extra_overrides = list(overrides) + [f"log.out_dir={out}"] + ([] if wandb else ["log.wandb_mode=disabled"])
    apply_overrides(RunConfig(), extra_overrides)  # validates every override before any work
    pipe = pipeline if pipeline is not None else Pipeline(Path(out) / "cache", progress=progress)
    result: dict[str, Any] = {"session": session, "report_dir": report_dir, "reports": [], "skipped": {}, "failed": {},
                              "seconds": {}}
    for rq in rqs:
        start = time.perf_counter()
        exp = experiment(rq, preset, extra_overrides, Path(configs) if configs is not None else None)
        command = f"hess reproduce {rq}" + "".join(f" {o}" for o in overrides) + f" --preset {preset}"
        extra = {"rq.name": exp.name, "rq.preset": preset, "rq.command": command, "rq.session": session.name}
        _say(progress, f"[{rq}] {exp.question}")
        try:
            outcome = RUNNERS.get(rq)(pipe, exp, root=session, extra=extra, progress=progress)
        except Exception as err:  # noqa: BLE001 - with several RQs, one failure must not lose the others
            if len(rqs) == 1 and raise_single:
                raise
            result["failed"][rq] = f"{type(err).__name__}: {err}"
            _say(progress, f"[{rq}] FAILED: {result['failed'][rq]} (continuing with the other experiments)")
            continue
        if outcome.skipped:
            result["skipped"][rq] = outcome.skipped
            result["reports"].append(write_skipped(exp.name, outcome.skipped, command, report_dir))
            _say(progress, f"[{rq}] skipped: {outcome.skipped}")
        else:
            result["reports"] += write_reports([session / exp.name], report_dir, [exp.name])
        result["seconds"][rq] = time.perf_counter() - start
        _say(progress, f"[{rq}] done in {result['seconds'][rq]:.0f} s -> {report_dir / exp.name}.md")
    return result


def preflight_reproduce(rqs: Sequence[str], preset: str = "demo", *, overrides: Sequence[str] = (),
                        configs: Optional[str | Path] = None) -> dict[str, list[str]]:
    """``--dry-run``: per RQ, the problems of every run it would make (``hess.preflight``), then the largest
    memory estimate as its last line ("ok" lines carry no problem).  Nothing is loaded or run."""
    from hess.preflight import preflight_lines

    apply_overrides(RunConfig(), list(overrides))
    out: dict[str, list[str]] = {}
    for rq in rqs:
        exp = experiment(rq, preset, list(overrides), Path(configs) if configs is not None else None)
        problems, info = preflight_lines([cfg for _, _, cfg in exp.configs()], rq1=rq == "rq1")
        out[rq] = [f"PROBLEM {p}" for p in problems] + info
    return out


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of the command (``hess.cli`` calls this)."""
    parser.add_argument("rq", choices=[*ORDER, "all"], help="research question (all = rq1..rq5 and latency)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides applied to every run")
    parser.add_argument("--preset", choices=list(SIZING), default="demo",
                        help="demo: embedded default model + synthetic scenes (CPU, < 20 min for all); "
                             "paper: VGGT-1B / π³ weights on CO3Dv2 and DTU; micro: tiny, for tests")
    parser.add_argument("--out", default="ablations/outputs", help="output root for run folders and the calibration cache")
    parser.add_argument("--report-dir", help="tables and plots folder (default ablations/results/<preset>)")
    parser.add_argument("--no-wandb", action="store_true", help="disable W&B (default: offline unless an API key is set)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 is fastest for the "
                                                    "tiny demo model on a busy machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--dry-run", action="store_true",
                        help="preflight only: weights, data roots and layout, calibration split and a peak-memory "
                             "estimate per RQ, one line per problem (exit 1 if any); runs nothing")


def run_cli(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code."""
    from hess.runtime import set_threads

    set_threads(args.threads)
    rqs = list(ORDER) if args.rq == "all" else [args.rq]
    if getattr(args, "dry_run", False):
        report = preflight_reproduce(rqs, args.preset, overrides=args.overrides)
        for rq, lines in report.items():
            print(f"[{rq}] " + ("ok" if not any(l.startswith("PROBLEM") for l in lines) else "problems:"))
            print("\n".join(f"  {line}" for line in lines))
        return 1 if any(l.startswith("PROBLEM") for lines in report.values() for l in lines) else 0
    result = reproduce(rqs, args.preset, out=args.out, report_dir=args.report_dir, overrides=args.overrides,
                       wandb=not args.no_wandb, progress=not args.quiet)
    total = sum(result["seconds"].values())
    print(f"runs: {result['session']}\nreports: {result['report_dir']}  ({total:.0f} s in all)")
    for rq, reason in result["skipped"].items():
        print(f"{rq}: not measured: {reason}")
    for rq, error in result["failed"].items():
        print(f"{rq}: FAILED: {error}", file=sys.stderr)
    return 1 if result["failed"] else 0

