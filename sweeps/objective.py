"""Sweep objective: evaluate one RunConfig and return its metrics; also the W&B sweep program.

Question: which budget settings give the best accuracy at a given realised density (one trial of a sweep)?
Command:  hess sweep --name budget --space sweeps/spaces.py:BUDGET --objective sweeps/objective.py:evaluate_metrics
          python sweeps/objective.py --config-json '{"budget.keep_ratio": 0.2}' --no-wandb   # one trial
          wandb sweep sweeps/wandb/budget.yaml && wandb agent <id>      # online; this file is the program
Output:   a run directory per evaluation (config.json, metrics.json, records) + a W&B run; the metrics are
          printed as JSON on stdout.

The W&B program path: the agent writes the trial's parameters (dotted RunConfig keys) to a JSON file
passed as ``--config-file`` (``${args_json_file}``) and also exposes them as ``wandb.config``; both are
read, flattened and applied with ``apply_overrides``, exactly as ``hess sweep`` applies Optuna's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from hess.config import RunConfig, apply_overrides, flatten_mapping
from hess.objective import Evaluator  # noqa: F401  (re-exported: Evaluator(pipeline) for custom pipelines)
from hess.experiment import load_experiment
from hess.runtime import load_object
from hess.tracking import track_run



# The evaluation pipeline as a sweep objective ships in the package (``hess sweep``'s default
# ``--objective hess.objective:evaluate_metrics``); this file re-exports it and is the W&B program.
evaluate_metrics = Evaluator()


def read_params(config_json: Optional[str], config_file: Optional[str]) -> dict[str, Any]:
    """Dotted parameters from a JSON string and/or a JSON/YAML file (the file first, JSON wins)."""
    params: dict[str, Any] = {}
    for source, text in ((config_file, Path(config_file).read_text() if config_file else None), ("--config-json", config_json)):
        if text is None:
            continue
        data = yaml.safe_load(text)  # YAML is a superset of JSON
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of dotted config keys, got {type(data).__name__}")
        params.update(flatten_mapping(data))
    return params


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-json", help="trial parameters as JSON, e.g. '{\"budget.keep_ratio\": 0.2}'")
    parser.add_argument("--config-file", help="trial parameters in a JSON/YAML file (W&B's ${args_json_file})")
    parser.add_argument("--experiment", help="base experiment YAML (ablations/configs/*.yaml)")
    parser.add_argument("--preset", help="preset of --experiment")
    parser.add_argument("--objective", help="evaluation function FILE.py:NAME or MODULE:NAME (default: Evaluator)")
    parser.add_argument("--out", help="output root (log.out_dir)")
    parser.add_argument("--no-wandb", action="store_true", help="disable W&B")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate one parameter set; under a W&B agent (``WANDB_SWEEP_ID`` set) log into the agent's run."""
    args = parse_args(argv)
    base = load_experiment(args.experiment, args.preset).config if args.experiment else RunConfig()
    params = read_params(args.config_json, args.config_file)
    wandb_run = None
    if os.environ.get("WANDB_SWEEP_ID") and not args.no_wandb:
        import wandb

        wandb_run = wandb.init()
        params = {**flatten_mapping(dict(wandb_run.config)), **params}
    extra = {"log.wandb_mode": "disabled"} if args.no_wandb else {}
    if args.out:
        extra["log.out_dir"] = args.out
    cfg = apply_overrides(apply_overrides(base, params), extra)
    evaluate = load_object(args.objective) if args.objective else evaluate_metrics
    with track_run(cfg, experiment="wandb-sweep", job_type="trial", wandb_run=wandb_run) as run:
        run.log_metrics(evaluate(cfg))
    print(json.dumps({"run_dir": str(run.dir.path), "metrics": run.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
