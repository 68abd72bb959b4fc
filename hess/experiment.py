"""YAML experiment files (``ablations/configs/*.yaml``): a question, its command and output, and the
run configs it compares, resolved for one preset.

    exp = load_experiment("ablations/configs/rq4_lambda.yaml", preset="demo")
    for variant, point, cfg in exp.configs(): ...

Every key is checked against :class:`hess.config.RunConfig` at load time (all presets, not only the
selected one), so a typo fails before any run starts.
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import yaml

from hess.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    field_types,
    flatten_mapping,
    parse_value,
    split_override,
    unknown_key_message,
)


@dataclass(frozen=True)
class Experiment:
    """A named experiment (``ablations/configs/*.yaml``) resolved for one preset.

    Attributes:
        config: defaults + file overrides + the preset's overrides.
        variants: name -> dotted overrides (e.g. the methods compared); empty = one variant.
        grid: dotted key -> list of values, expanded as a Cartesian product by ``configs``.
        runner: free-form settings for the experiment's runner (not validated here).
        output: where the runner writes, with ``{preset}`` filled in when a preset is selected.
    """

    name: str
    question: str
    command: str
    output: str
    config: RunConfig
    description: str = ""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runner: dict[str, Any] = field(default_factory=dict)
    preset: Optional[str] = None
    presets: tuple[str, ...] = ()

    def configs(self) -> Iterator[tuple[str, dict[str, Any], RunConfig]]:
        """Yield ``(variant, grid_point, cfg)`` for every variant × grid point, in file order."""
        keys = list(self.grid)
        for variant, overrides in (self.variants or {"default": {}}).items():
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = dict(zip(keys, values))
                yield variant, point, apply_overrides(self.config, {**overrides, **point})


_TOP_KEYS = ("question", "command", "output", "description", "overrides", "variants", "grid", "runner", "presets")
_PRESET_KEYS = ("overrides", "variants", "grid", "runner")


def _as_overrides(value: Any) -> dict[str, Any]:
    """A YAML ``overrides``/variant entry (mapping, possibly nested, or list of KEY=VALUE) -> dotted dict."""
    if value is None:
        return {}
    if isinstance(value, list):
        known, out = field_types(), {}
        for key, text in map(split_override, value):
            if key not in known:
                raise ConfigError(unknown_key_message(key))
            out[key] = parse_value(text, known[key], key)
        return out
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping of dotted keys or a list of KEY=VALUE, got {type(value).__name__}")
    return flatten_mapping(value)


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; allowed: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _resolve(base: RunConfig, spec: Mapping[str, Any], where: str) -> tuple[RunConfig, dict, dict, dict]:
    """Apply one layer (the file or a preset): overrides, then check its variants and grid against it."""

    def check(part: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ConfigError as err:
            raise ConfigError(f"{where}{part}: {err}") from None

    cfg = check("overrides", lambda: apply_overrides(base, _as_overrides(spec.get("overrides"))))
    variants: dict[str, dict[str, Any]] = {}
    for name, value in check("variants", lambda: _mapping(spec.get("variants"))).items():
        variants[str(name)] = check(f"variants.{name}", lambda: _as_overrides(value))
        check(f"variants.{name}", lambda: apply_overrides(cfg, variants[str(name)]))
    grid = {k: list(v) if isinstance(v, (list, tuple)) else [v]
            for k, v in flatten_mapping(check("grid", lambda: _mapping(spec.get("grid")))).items()}
    for key, values in grid.items():
        for value in values:
            check(f"grid.{key}", lambda: apply_overrides(cfg, {key: value}))
    return cfg, variants, grid, dict(check("runner", lambda: _mapping(spec.get("runner"))))


def _mapping(value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {type(value).__name__} {value!r}")
    return value


def load_experiment(path: str | Path, preset: Optional[str] = None) -> Experiment:
    """Load an experiment YAML: ``question``, ``command``, ``output`` (required), ``description``,
    ``overrides``, ``variants``, ``grid``, ``runner`` and ``presets: {name: {overrides, variants,
    grid, runner}}`` (a preset's entries replace the file's entries of the same name).

    Every preset is validated, not only the one selected, so a typo anywhere fails at load time.
    Raises ConfigError (unknown keys with close matches, missing header, unknown preset) or
    FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the file (brackets, quotes, "
                          "indentation)") from None
    where = str(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    _check_keys(data, _TOP_KEYS, where)
    missing = [k for k in ("question", "command", "output") if not data.get(k)]
    if missing:
        raise ConfigError(f"{where}: missing header field(s) {', '.join(missing)} (question, command, output)")
    cfg, variants, grid, runner = _resolve(RunConfig(), data, f"{where}: ")
    presets = dict(data.get("presets") or {})
    resolved = {}
    for name, spec in presets.items():
        spec = spec or {}
        _check_keys(spec, _PRESET_KEYS, f"{where}: presets.{name}")
        pcfg, pvar, pgrid, prun = _resolve(cfg, spec, f"{where}: presets.{name}.")
        resolved[name] = (pcfg, {**variants, **pvar}, {**grid, **pgrid}, {**runner, **prun})
    if preset is not None:
        if preset not in resolved:
            raise ConfigError(f"{where}: unknown preset {preset!r}; known: {', '.join(resolved) or '(none)'}")
        cfg, variants, grid, runner = resolved[preset]
    return Experiment(
        name=path.stem, question=str(data["question"]).strip(), command=str(data["command"]).strip(),
        output=str(data["output"]).strip().replace("{preset}", preset or "{preset}"), description=str(data.get("description") or "").strip(),
        config=cfg, variants=variants, grid=grid, runner=runner, preset=preset, presets=tuple(resolved),
    )
