"""``hess evaluate`` (and ``ablations/run.py``): one model × scenes × method × sparsity in a tracked run.

    hess evaluate budget.keep_ratio=0.27 score.scorer=hess --preset demo      # (once wired in hess.cli)
    python ablations/run.py sparse.method=dense --preset demo --dry-run

Config resolution: defaults ← experiment file (``--config``, its preset) ← the preset sizing of
``hess.rq.runners.SIZING`` ← ``KEY=VALUE`` overrides ← ``--out`` / ``--no-wandb``.  Prints the run
directory and the metrics as JSON; ``--dry-run`` prints the resolved config and the plan instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hess.cli import add_config_arguments
from hess.config import ConfigError, RunConfig, apply_overrides, dump_yaml
from hess.experiment import load_experiment
from hess.rq.pipeline import Pipeline, run_tracked
from hess.rq.runners import SIZING


def resolve(args: argparse.Namespace) -> RunConfig:
    """Defaults ← experiment file (its preset) ← preset sizing ← KEY=VALUE overrides ← --out / --no-wandb."""
    if args.preset is not None and args.preset not in SIZING:
        raise ConfigError(f"unknown preset {args.preset!r}; known: {', '.join(SIZING)}")
    file_preset, sizing = SIZING[args.preset] if args.preset else (None, {})
    if args.preset and not sizing and not args.config:
        raise ConfigError(f"--preset {args.preset} changes nothing without --config (its settings live in the "
                          "experiment files): add --config ablations/configs/<experiment>.yaml")
    cfg = load_experiment(args.config, file_preset).config if args.config else RunConfig()
    cfg = apply_overrides(apply_overrides(cfg, sizing), list(args.overrides or []))
    extra = {"log.out_dir": args.out} if args.out else {}
    if args.no_wandb:
        extra["log.wandb_mode"] = "disabled"
    from hess.validate import validate_config

    return validate_config(apply_overrides(cfg, extra))


def plan_text(cfg: RunConfig) -> str:
    """What a run of ``cfg`` would do, without loading anything."""
    steps = [f"model      {cfg.model.name}" + (f" from {cfg.model.checkpoint}" if cfg.model.checkpoint else ""),
             f"scenes     {cfg.data.num_scenes} x {cfg.data.dataset}/{cfg.data.split}, {cfg.data.num_frames} frames, "
             f"{cfg.data.height}x{cfg.data.width}"]
    if cfg.sparse.method == "dense":
        steps.append("attention  dense (no calibration, no sparsification)")
    else:
        if cfg.score.scorer in ("hess", "inverted-hess"):
            source = cfg.calib.artifact or f"calibration on {cfg.calib.num_scenes} calib scenes (cached in {cfg.log.out_dir}/cache)"
            steps.append(f"scores     {cfg.score.scorer}, λ={cfg.score.lam}, proj={cfg.calib.proj}, normalise={cfg.score.normalize}: {source}")
        else:
            steps.append(f"scores     {cfg.score.scorer}")
        steps.append(f"budget     keep_ratio={cfg.budget.keep_ratio}, min_blocks={cfg.budget.min_blocks}, "
                     f"capping={cfg.budget.capping}, scope={cfg.budget.scope}")
        steps.append(f"sparse     q_block={cfg.sparse.q_block}, k_block={cfg.sparse.k_block}, backend={cfg.sparse.backend}")
    steps.append(f"output     {Path(cfg.log.out_dir) / cfg.log.experiment}/<timestamp>-<hash>/, W&B {cfg.log.wandb_mode}")
    return "\n".join(steps)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hess evaluate`` / ``ablations/run.py``."""
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")


def run_cli(args: argparse.Namespace) -> int:
    """Evaluate the resolved config in a tracked run; print the run directory and metrics as JSON."""
    cfg = resolve(args)
    if args.dry_run:
        from hess.preflight import memory_line, preflight

        problems = preflight(cfg)
        print(dump_yaml(cfg) + "\n# plan\n" + plan_text(cfg) + "\n# preflight\n" + memory_line(cfg)[0])
        print("\n".join(f"PROBLEM {p}" for p in problems) if problems else "ready: no problem found")
        return 1 if problems else 0
    pipe = Pipeline(Path(cfg.log.out_dir) / "cache")
    run_dir, result = run_tracked(pipe, cfg)
    print(json.dumps({"run_dir": str(run_dir), "metrics": result.metrics}, indent=2, default=float))
    return 0
