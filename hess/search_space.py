"""Search spaces of ``hess sweep``: one distribution per dotted config key, usable by Optuna and W&B.

    space = {"budget.keep_ratio": Float(0.1, 0.6), "score.lam": Float(0.0, 1.0), "budget.min_blocks": Int(1, 4)}
    check_space(space, cfg)                 # every key and bound is a valid override of cfg
    params = suggest(trial, space)          # Optuna parameter names are the dotted keys
    to_wandb_parameters(space)              # the same space as a W&B sweep's ``parameters:`` block
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import optuna

from hess.config import RunConfig, apply_overrides, flatten


@dataclass(frozen=True)
class Float:
    """A float in [low, high] (log-uniform when ``log``; a grid of ``step`` when given)."""

    low: float
    high: float
    log: bool = False
    step: Optional[float] = None

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def examples(self) -> list[float]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def wandb(self) -> dict[str, Any]:
        if self.step is not None:
            return {"distribution": "q_uniform", "min": self.low, "max": self.high, "q": self.step}
        return {"distribution": "log_uniform_values" if self.log else "uniform", "min": self.low, "max": self.high}


@dataclass(frozen=True)
class Int:
    """An int in [low, high] with ``step``."""

    low: int
    high: int
    step: int = 1

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step)

    def examples(self) -> list[int]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high and (value - self.low) % self.step == 0

    def wandb(self) -> dict[str, Any]:
        if self.step != 1:
            return {"values": list(range(self.low, self.high + 1, self.step))}
        return {"distribution": "int_uniform", "min": self.low, "max": self.high}


@dataclass(frozen=True)
class Categorical:
    """One of ``choices`` (None, bool, int, float or str)."""

    choices: tuple[Any, ...]

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def examples(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return any(value == c and type(value) is type(c) for c in self.choices)

    def wandb(self) -> dict[str, Any]:
        return {"values": list(self.choices)}


Param = Union[Float, Int, Categorical]
SearchSpace = Mapping[str, Param]  # dotted config key -> distribution


def check_space(space: SearchSpace, base: RunConfig) -> None:
    """Every key is a config key and every bound/choice is a valid value for it (ConfigError otherwise)."""
    if not space:
        raise ValueError("the search space is empty")
    for key, param in space.items():
        if not isinstance(param, (Float, Int, Categorical)):
            raise TypeError(f"search space entry {key!r} must be Float, Int or Categorical, got {param!r}")
        for value in param.examples():
            apply_overrides(base, {key: value})


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Sample the space; Optuna parameter names are the dotted config keys."""
    return {key: param.suggest(trial, key) for key, param in space.items()}


def to_wandb_parameters(space: SearchSpace) -> dict[str, dict[str, Any]]:
    """The ``parameters:`` block of a W&B sweep YAML for the same space (same dotted keys)."""
    return {key: param.wandb() for key, param in space.items()}


def baseline_params(space: SearchSpace, base: RunConfig,
                    fixed: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Parameters of the baseline trial: ``fixed`` values (default the uniform scorer) where the space
    has the key, else the base config's values.  Raises ValueError if one lies outside the space."""
    fixed = {"score.scorer": "uniform"} if fixed is None else dict(fixed)
    current = flatten(base)
    params = {key: fixed.get(key, current[key]) for key in space}
    for key, value in params.items():
        if not space[key].contains(value):
            raise ValueError(f"baseline value {value!r} of {key!r} is outside the search space {space[key]}")
    return params


# ------------------------------------------------------------------------------ packaged spaces
#: ``hess sweep --space NAME`` (``sweeps/spaces.py`` holds the same spaces as an editable example).
#: Every space contains the default config's values (keep ratio 0.27, λ 0.5, iterative capping, 1 block,
#: no CDF floor), so the uniform baseline (``score.scorer=uniform``) is a valid first trial.
SWEEP_SCORERS = ("hess", "uniform", "random", "head-importance", "attention-entropy")
SPACES: dict[str, dict[str, Param]] = {
    # sparsity alone: the accuracy/density curve of the base scorer
    "keep_ratio": {"budget.keep_ratio": Float(0.05, 0.6)},
    # RQ4-style: how the camera/point mix interacts with sparsity
    "lambda": {"budget.keep_ratio": Float(0.05, 0.6), "score.lam": Float(0.0, 1.0)},
    # keep ratio, λ, capping, min blocks, CDF floor, scorer
    "budget": {
        "budget.keep_ratio": Float(0.05, 0.6),
        "score.lam": Float(0.0, 1.0),
        "budget.capping": Categorical(("iterative", "clip")),
        "budget.min_blocks": Int(1, 4),
        "sparse.cdf_threshold": Categorical((None, 0.8, 0.9, 0.95)),
        "score.scorer": Categorical(SWEEP_SCORERS),
    },
}


def space_identity(space: SearchSpace) -> dict[str, str]:
    """A JSON-able description of ``space`` (key -> distribution repr): what a study stores to recognise it."""
    return {key: repr(param) for key, param in sorted(space.items())}


def resolve_space(spec: str) -> SearchSpace:
    """``hess sweep --space``: a packaged name (``SPACES``) or ``FILE.py:NAME`` / ``MODULE:NAME``.

    Raises ConfigError (one line) for an unknown name, a missing file or attribute, or an object that is
    not a mapping of dotted keys to Float / Int / Categorical.
    """
    from hess.config import ConfigError
    from hess.runtime import load_object

    if spec in SPACES:
        return SPACES[spec]
    if ":" not in spec:
        raise ConfigError(f"--space {spec!r}: unknown space; use one of {', '.join(SPACES)} or FILE.py:NAME / MODULE:NAME")
    try:
        space = load_object(spec)
    except (AttributeError, ImportError, ValueError) as err:
        raise ConfigError(f"--space {spec!r}: {err}; use one of {', '.join(SPACES)} or FILE.py:NAME / MODULE:NAME") from None
    if not isinstance(space, Mapping) or not all(isinstance(p, (Float, Int, Categorical)) for p in space.values()):
        raise ConfigError(f"--space {spec!r} is not a mapping of dotted config keys to Float / Int / Categorical")
    return space
