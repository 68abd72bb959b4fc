"""Evaluate one configuration: config + overrides → model, scenes → calibrate (cached) → score → allocate →
sparsify → evaluate → records in a run directory and a W&B run.

Question: how accurate and how fast is one (model, scenes, scorer, sparsity) setting?
Command:  python ablations/run.py budget.keep_ratio=0.27 score.scorer=hess --config ablations/configs/rq2_sparsity.yaml --preset demo
          python ablations/run.py sparse.method=dense --preset demo --no-wandb
          python ablations/run.py score.lam=0.25 --dry-run            # print the resolved config and the plan, run nothing
Output:   <log.out_dir>/<log.experiment>/<timestamp>-<hash>/ with config.json, meta.json (git SHA, model weights),
          metrics.json, records.parquet/.csv (per-scene and "all" rows), tables/allocation.csv, log.txt; the
          metrics as JSON on stdout.

``run_config(cfg, cache)`` is the sweep pipeline (``sweeps/objective.py``): metrics only, loaded state kept
in ``cache`` across trials, calibration artifacts cached on disk by config hash (a λ or keep-ratio sweep
never recalibrates).  ``--preset`` applies the sizing of ``hess reproduce`` (demo: 84×84, 4 frames, key
blocks of 6 patches) on top of the experiment file's preset of the same name.  The command itself is
``hess.rq.command`` (also behind ``hess evaluate`` once wired).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from hess.config import ConfigError
from hess.rq import run_config  # noqa: F401  (the sweep pipeline: ablations/run.py:run_config)
from hess.rq.command import configure_cli, run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    configure_cli(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"ablations/run.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
