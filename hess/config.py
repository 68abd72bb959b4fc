"""Run configuration: one typed dataclass tree and validated dotted overrides.

    cfg = RunConfig()                                             # the embedded default
    cfg = apply_overrides(cfg, ["budget.keep_ratio=0.27", "score.lam=0.5"])
    flatten(cfg)["budget.keep_ratio"]                             # 0.27 (feeds W&B and pandas)

YAML experiment files built on it: :mod:`hess.experiment`.

Configuration stops at the entry points (style rule 3): library functions receive the values, never
a ``RunConfig``.  Every section is a frozen dataclass whose fields are type-checked (and coerced:
int -> float, list -> tuple) on construction, so an invalid config cannot exist.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import json
import types
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type, value out of range, malformed file."""


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_UNIT_OPEN = (lambda v: 0.0 < v <= 1.0, "in (0, 1]")
# value rules beyond types: dotted key -> (predicate, what it must be)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{f"data.{n}": _AT_LEAST_1 for n in ("num_scenes", "num_frames", "height", "width")},
    "calib.num_scenes": _AT_LEAST_1, "calib.num_frames": (lambda v: v >= 2, ">= 2"),
    "calib.inlier_eps": (lambda v: v > 0, "> 0"),
    **{f"calib.{n}": (lambda v: v is None or v >= 1, "None or >= 1") for n in ("max_frames", "max_points", "icp_max_points", "height", "width")},
    "calib.icp_max_distance": (lambda v: v > 0, "> 0"), "calib.icp_iterations": _AT_LEAST_1, "score.lam": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "budget.keep_ratio": _UNIT_OPEN, "budget.min_blocks": _AT_LEAST_1,
    "sparse.q_block": _AT_LEAST_1, "sparse.k_block": _AT_LEAST_1,
    "sparse.cdf_threshold": (lambda v: v is None or _UNIT_OPEN[0](v), "None or in (0, 1]"),
    "eval.latency_warmup": (lambda v: v >= 0, ">= 0"), "eval.latency_repeats": _AT_LEAST_1,
}


class _Section:
    """Base of every config section: type-checks and coerces each field, then applies ``_RULES``."""

    _name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, hint in get_type_hints(type(self)).items():
            if name.startswith("_"):
                continue
            key = f"{self._name}.{name}"
            value = coerce(getattr(self, name), hint, key)
            object.__setattr__(self, name, value)
            ok, what = _RULES.get(key, (lambda v: True, ""))
            if not ok(value):
                raise ConfigError(f"{key}: must be {what}, got {value!r}")


@dataclass(frozen=True)
class DataSection(_Section):
    """Scenes to evaluate on (``hess.build_scenes``)."""
    _name: ClassVar[str] = "data"
    dataset: str = "synthetic"  # a DATASETS name: synthetic | co3d | dtu
    split: str = "eval"
    root: Optional[str] = None  # dataset root for real data
    num_scenes: int = 4
    num_frames: int = 4  # the embedded model's training views (hess.data.synthetic.EMBEDDED_SCENE_OPTIONS)
    height: int = 84
    width: int = 84
    seed: int = 0
    #: real data: frames are resized to ``width`` (VGGT's crop preprocessing), their height follows each
    #: sequence's aspect ratio (a multiple of 14) and is centre-cropped to at most ``height``.
    scans: tuple[int, ...] = ()  # DTU scans to evaluate (empty = the 22 test scans); data.num_scenes caps them
    categories: tuple[str, ...] = ()  # CO3D categories (empty = the 41 seen categories present under the root)


@dataclass(frozen=True)
class ModelSection(_Section):
    """Which model, from which weights, on which device and dtype."""
    _name: ClassVar[str] = "model"
    name: str = "hess-tiny"  # a MODELS name; "hess-tiny" is the embedded default
    checkpoint: Optional[str] = None  # weights: a file, a folder (model.safetensors + config.json) or an HF repo id
    config: Optional[str] = None  # architecture: a config.json path or a preset (vggt-1b, ...); None = beside the weights
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class CalibSection(_Section):
    """HeSS calibration (method.md §3): errors against ground truth, Fisher traces of W_Q rows."""
    _name: ClassVar[str] = "calib"
    num_scenes: int = 4
    num_frames: int = 4
    inlier_eps: float = 0.05
    proj: Literal["q", "k", "v"] = "q"
    use_icp: bool = True
    seed: int = 1
    artifact: Optional[str] = None  # a precomputed score artifact; None = calibrate (cached)
    #: where calibration scenes come from, independent of data.* (the paper: CO3Dv2 dev, also for DTU runs);
    #: None = data.dataset (and then data.root)
    dataset: Optional[str] = None
    root: Optional[str] = None  # None: data.root when calib.dataset is data.dataset, else $HESS_CO3D_ROOT / $HESS_DTU_ROOT
    split: str = "calib"  # co3d: the set list's train subset, checked disjoint from test; synthetic: the calib split
    height: Optional[int] = None  # calibration frame size (real data: height limit); None = data.height / data.width
    width: Optional[int] = None
    # hess.calibrate.CalibConfig options (memory: VGGT-1B at 20 frames needs checkpointing + bf16 autocast on CUDA;
    # autocast applies on CUDA only, CPU runs stay in the model's dtype)
    checkpointing: bool = False
    autocast: Optional[Literal["bfloat16", "float16"]] = None
    max_frames: Optional[int] = None
    max_points: Optional[int] = None
    icp_max_distance: float = 0.1
    icp_iterations: int = 30
    icp_max_points: Optional[int] = 4096
    points_source: Literal["point_head", "depth"] = "point_head"
    include_bias: bool = False
    allow_model_mismatch: bool = False  # use an artifact calibrated on other weights anyway (recorded)


@dataclass(frozen=True)
class ScoreSection(_Section):
    """How head scores are read from the traces: scorer, λ mix, per-layer normalisation."""
    _name: ClassVar[str] = "score"
    scorer: str = "hess"  # a SCORERS name: hess | uniform | random | inverted-hess | ...
    lam: float = 0.5  # HeSS = lam * cam + (1 - lam) * pc
    normalize: bool = True
    seed: int = 0  # for the random scorer


@dataclass(frozen=True)
class BudgetSection(_Section):
    """Key-block budgets per head (method.md §4)."""
    _name: ClassVar[str] = "budget"
    keep_ratio: float = 0.27  # target fraction of patch key blocks kept per query block
    min_blocks: int = 1
    capping: Literal["iterative", "clip"] = "iterative"
    scope: Literal["layer", "global"] = "layer"


@dataclass(frozen=True)
class SparseSection(_Section):
    """The sparse attention op (issue 3): block sizes, CDF floor, backend; ``method`` dense/sparse."""
    _name: ClassVar[str] = "sparse"
    method: Literal["dense", "sparse"] = "sparse"  # dense = no sparsification at all
    q_block: int = 12  # hess-tiny: 6×6 patches per 84×84 frame → key blocks of one patch row (VGGT-1B: 128 / 64)
    k_block: int = 6
    cdf_threshold: Optional[float] = None
    backend: str = "auto"


@dataclass(frozen=True)
class EvalSection(_Section):
    """What an evaluation measures."""
    _name: ClassVar[str] = "eval"
    #: what is computed (hess.rq.measure.METRIC_GROUPS): pose (auc30, auc15, rra/rta), points (acc, comp,
    #: chamfer + medians, evaluation.md §2.5), nc (normal consistency, adds normals), depth (abs_rel), point_err
    metrics: tuple[str, ...] = ("pose", "points", "depth", "point_err")
    #: points: rigid ICP radius after Umeyama; None = 0.1 × GT scale (normalised units: 0.1 of the mean point distance)
    icp_threshold: Optional[float] = None
    latency_warmup: int = 1
    latency_repeats: int = 3
    timing: bool = True  # time every scene's forward in accuracy runs; False: latency NaN (the latency experiment times)


@dataclass(frozen=True)
class LogSection(_Section):
    """Where results go: run directories and W&B (mode auto = online iff an API key is set)."""
    _name: ClassVar[str] = "log"
    out_dir: str = "ablations/outputs"
    experiment: str = "default"
    wandb_project: str = "hess"
    wandb_entity: Optional[str] = None
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    run_name: Optional[str] = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run; see each section for its fields."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    calib: CalibSection = field(default_factory=CalibSection)
    score: ScoreSection = field(default_factory=ScoreSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    sparse: SparseSection = field(default_factory=SparseSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")


_SECTIONS: dict[str, type] = {
    "data": DataSection, "model": ModelSection, "calib": CalibSection, "score": ScoreSection,
    "budget": BudgetSection, "sparse": SparseSection, "eval": EvalSection, "log": LogSection,
}


# ----------------------------------------------------------------------------------------- typing
def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin is tuple:
        return f"list of {_type_name(get_args(hint)[0])}"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _accepts_str(hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts_str(arm) for arm in get_args(hint))
    if origin is Literal:
        return any(isinstance(a, str) for a in get_args(hint))
    return hint is str


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` of config field ``key``; return it coerced.

    int is accepted for float fields, lists for tuple fields; bool is never an int or a float.
    Raises ConfigError naming the key, the expected type and what was given.
    """
    origin = get_origin(hint)
    bad = ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if origin in (Union, types.UnionType):
        for arm in sorted(get_args(hint), key=lambda a: a is not type(None)):
            try:
                return coerce(value, arm, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in get_args(hint)):
            return value
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(coerce(v, get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if hint is type(None):
        if value is None:
            return None
        raise bad
    if isinstance(value, bool) and hint is not bool:
        raise bad
    if hint is float and isinstance(value, int):
        return float(value)
    if isinstance(value, hint):
        return value
    raise bad


def parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse the text of a ``KEY=VALUE`` override for a field of type ``hint``.

    ``ast.literal_eval`` first (also accepting YAML-style true/false/null/none); a text that does
    not parse, or parses to a non-string, is kept verbatim only when the field accepts strings.
    """
    aliases = {"true": True, "false": False, "null": None, "none": None}
    if text.strip().lower() in aliases:
        value = aliases[text.strip().lower()]
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    try:
        return coerce(value, hint, key)
    except ConfigError:
        if _accepts_str(hint) and not isinstance(value, str):
            return coerce(text, hint, key)
        raise


# -------------------------------------------------------------------------------- dicts and keys
def field_types() -> dict[str, Any]:
    """Dotted key -> type hint for every field of ``RunConfig``."""
    return {
        f"{section}.{name}": hint
        for section, cls in _SECTIONS.items()
        for name, hint in get_type_hints(cls).items()
        if not name.startswith("_")
    }


def unknown_key_message(key: str) -> str:
    """The error for a dotted key that is not a field, with the closest known keys."""
    known = list(field_types())
    tail = key.rsplit(".", 1)[-1]
    close = [k for k in known if k.endswith("." + tail)] + difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """``{"budget.keep_ratio": 0.27, ...}`` for every field (tuples as lists), in declaration order."""
    return {
        f"{section}.{f.name}": _plain(getattr(getattr(cfg, section), f.name))
        for section in _SECTIONS
        for f in dataclasses.fields(getattr(cfg, section))
    }


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Nested JSON-ready dict ``{"budget": {"keep_ratio": 0.27, ...}, ...}``."""
    out: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for key, value in flatten(cfg).items():
        section, name = key.split(".", 1)
        out[section][name] = value
    return out


def flatten_mapping(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``{"budget": {"keep_ratio": 1}}`` -> ``{"budget.keep_ratio": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_mapping(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a RunConfig from a nested (or dotted) mapping; absent fields keep their defaults."""
    return apply_overrides(RunConfig(), flatten_mapping(data))


def apply_overrides(cfg: RunConfig, overrides: Sequence[str] | Mapping[str, Any]) -> RunConfig:
    """Return a copy of ``cfg`` with dotted overrides applied.

    Args:
        cfg: the config to start from (unchanged).
        overrides: ``["budget.keep_ratio=0.27", ...]`` (values parsed by ``parse_value``) or a
            mapping ``{"budget.keep_ratio": 0.27}`` of already-typed values (strings are not parsed).
    Raises:
        ConfigError: listing every unknown key (with close matches), type mismatch and range error.
    """
    types_by_key = field_types()
    errors: list[str] = []
    updates: dict[str, dict[str, Any]] = {}
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides must be a list of KEY=VALUE strings or a mapping, got {overrides!r}")
    text = not isinstance(overrides, Mapping)
    items = [split_override(o) for o in overrides] if text else list(overrides.items())
    for key, raw in items:
        if key not in types_by_key:
            errors.append(unknown_key_message(key))
            continue
        try:
            value = parse_value(raw, types_by_key[key], key) if text else coerce(raw, types_by_key[key], key)
        except ConfigError as err:
            errors.append(str(err))
            continue
        section, name = key.split(".", 1)
        updates.setdefault(section, {})[name] = value
    sections = {}
    for section, changes in updates.items():
        try:
            sections[section] = dataclasses.replace(getattr(cfg, section), **changes)
        except ConfigError as err:
            errors.append(str(err))
    if errors:
        raise ConfigError("invalid config overrides:\n  - " + "\n  - ".join(errors))
    return dataclasses.replace(cfg, **sections)


def split_override(text: str) -> tuple[str, str]:
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override must look like KEY=VALUE (e.g. budget.keep_ratio=0.27), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def config_hash(cfg: RunConfig, *, exclude: Sequence[str] = ("log",)) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of ``cfg`` without the ``exclude`` sections."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in exclude}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (for ``--dry-run`` and logs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
