"""Search spaces for sweeps: dotted config key -> distribution (the same keys as RunConfig).

Question: which budget settings (keep ratio, λ, capping, min blocks, CDF floor, scorer) trade accuracy
          against realised density or latency best?
Command:  hess sweep --name budget --space sweeps/spaces.py:BUDGET \
              --target synthetic/auc30:max --target perf/realized_density:min --n-trials 40
Output:   <out>/sweeps/<name>.db (Optuna), <out>/sweeps/<name>/{trials.csv, pareto.csv, pareto.png} and one
          run directory per trial; sweeps/wandb/<name>.yaml hold the same spaces for W&B sweeps
          (tests/test_sweep.py checks that they agree).

The same spaces ship inside the package (``hess.search_space.SPACES``: ``hess sweep --space budget``);
this file is the example to copy and edit (``--space my_spaces.py:NAME``); tests check that they agree.

Every space contains the base config's values (keep ratio 0.27, λ 0.5, iterative capping, 1 block, no
CDF floor), so the uniform baseline (``score.scorer=uniform``) is a valid first trial.
"""
from hess.search_space import Categorical, Float, Int

SCORERS = ("hess", "uniform", "random", "head-importance", "attention-entropy")

# Sparsity alone: the accuracy/density curve of the base scorer.
KEEP_RATIO = {
    "budget.keep_ratio": Float(0.05, 0.6),
}

# RQ4-style: how the camera/point mix interacts with sparsity.
LAMBDA = {
    "budget.keep_ratio": Float(0.05, 0.6),
    "score.lam": Float(0.0, 1.0),
}

# Everything the issue lists: keep ratio, λ, capping, min blocks, CDF floor, scorer.
BUDGET = {
    "budget.keep_ratio": Float(0.05, 0.6),
    "score.lam": Float(0.0, 1.0),
    "budget.capping": Categorical(("iterative", "clip")),
    "budget.min_blocks": Int(1, 4),
    "sparse.cdf_threshold": Categorical((None, 0.8, 0.9, 0.95)),
    "score.scorer": Categorical(SCORERS),
}

SPACES = {"keep_ratio": KEEP_RATIO, "lambda": LAMBDA, "budget": BUDGET}
