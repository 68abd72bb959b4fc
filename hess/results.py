"""Tidy result rows and run directories: the only way numbers reach tables, plots and notebooks.

One ``Record`` per (run, scene, metric) carries the value, the target keep ratio, the realised
density, the latency and the run's flattened config (style rule 11).  Every run owns a directory
(style rule 12)::

    <out>/<experiment>/<YYYYmmdd-HHMMSS>-<config hash>/
        config.json      resolved config (nested)       meta.json     git SHA, status, times, argv
        metrics.json     aggregate metrics              log.txt       the run's log
        records.parquet  tidy rows (+ records.csv)      tables/*.csv  figures/*.png

    df = load_results("ablations/outputs/rq2")   # every records.parquet below, one DataFrame

A leaf module: it takes plain dicts, never a RunConfig.
"""
from __future__ import annotations

import datetime as _dt
import glob as _glob
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import pandas as pd

DENSITY_KEY = "perf/realized_density"  # metric keys are <dataset>/<metric> (style rule 10)
LATENCY_KEY = "perf/latency_ms"
RECORD_COLUMNS = ("run_id", "scene_id", "metric", "value", "keep_ratio", "realized_density", "latency_ms")


def _cell(value: Any) -> Any:
    """A config value as a scalar table cell: lists/dicts become JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def _number(name: str, value: Any, *, optional: bool) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a number or None" if optional else "a number"
        raise TypeError(f"Record.{name} must be {expected}, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass
class Record:
    """One tidy row: the value of ``metric`` on ``scene_id`` in run ``run_id``.

    Attributes:
        value: the metric value (NaN allowed: an undefined metric is recorded, never invented).
        keep_ratio: target keep ratio (None for dense runs).
        realized_density: measured fraction of the patch-patch score matrix computed.
        latency_ms: latency of the forward pass the value comes from.
        config: flattened run config, dotted keys (``flatten(cfg)``).
    """

    run_id: str
    scene_id: str
    metric: str
    value: float
    keep_ratio: Optional[float] = None
    realized_density: Optional[float] = None
    latency_ms: Optional[float] = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("run_id", "scene_id", "metric"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"Record.{name} must be a non-empty string, got {getattr(self, name)!r}")
        self.value = _number("value", self.value, optional=False)
        for name in ("keep_ratio", "realized_density", "latency_ms"):
            setattr(self, name, _number(name, getattr(self, name), optional=True))
        clash = [k for k in self.config if k in RECORD_COLUMNS or "." not in k]
        if clash:
            raise ValueError(f"Record.config keys must be dotted config keys; got {clash}")

    def to_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in RECORD_COLUMNS}
        row.update({key: _cell(value) for key, value in self.config.items()})
        return row


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    """Records -> DataFrame with the record columns first, then config columns."""
    rows = [r.to_row() for r in records]
    frame = pd.DataFrame(rows)
    return frame if rows else pd.DataFrame(columns=list(RECORD_COLUMNS))


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".parquet", ".csv") else path
    return stem.with_suffix(".parquet"), stem.with_suffix(".csv")


def append_records(path: str | Path, records: Sequence[Record]) -> Path:
    """Append rows to ``<path>.parquet`` and mirror them to ``<path>.csv``; returns the parquet path.

    ``path`` may be given with or without a suffix.  New config columns are added (union of
    columns); the parquet file is the source of truth, the CSV is rewritten to match it.
    """
    parquet, csv = _paths(path)
    if not records:
        return parquet
    new = records_frame(records)
    frame = pd.concat([pd.read_parquet(parquet), new], ignore_index=True) if parquet.exists() else new
    parquet.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(parquet, lambda tmp: frame.to_parquet(tmp, index=False))
    write_atomic(csv, lambda tmp: frame.to_csv(tmp, index=False))
    return parquet


def write_atomic(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _result_files(source: str | Path) -> list[Path]:
    source = str(source)
    if any(ch in source for ch in "*?["):
        hits = [Path(p) for p in _glob.glob(source, recursive=True)]
    else:
        hits = [Path(source)]
    files: list[Path] = []
    for hit in hits:
        if hit.is_dir():
            parquet = list(hit.rglob("records.parquet"))
            have = {p.parent for p in parquet}
            files += parquet + [c for c in hit.rglob("records.csv") if c.parent not in have]
        elif hit.suffix in (".parquet", ".csv") and hit.is_file():
            files.append(hit)
    # prefer parquet over its CSV mirror when a glob matched both
    stems = {f.with_suffix("") for f in files if f.suffix == ".parquet"}
    return sorted({f for f in files if f.suffix == ".parquet" or f.with_suffix("") not in stems})


def load_results(source: str | Path) -> pd.DataFrame:
    """Every result row under ``source`` as one DataFrame (sorted by file path, then row order).

    Args:
        source: a run/experiment directory (searched recursively for ``records.parquet``, or
            ``records.csv`` where no parquet exists), a glob such as ``"out/**/records.parquet"``,
            or one ``.parquet``/``.csv`` file.
    Returns:
        the rows with an added ``run_dir`` column (the directory each row was read from).
    Raises:
        FileNotFoundError: nothing matched ``source``.
    """
    files = _result_files(source)
    if not files:
        raise FileNotFoundError(f"no result files (records.parquet / records.csv) found at {source!s}")
    frames = []
    for f in files:
        frame = pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f)
        frames.append(frame.assign(run_dir=str(f.parent)))
    return pd.concat(frames, ignore_index=True)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=_json_default)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def finite_or_none(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: store them as None (the CSV/parquet rows keep the NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


@dataclass(frozen=True)
class RunDir:
    """A run directory ``<root>/<experiment>/<timestamp>-<hash>/`` and its standard files."""

    path: Path

    @classmethod
    def create(cls, root: str | Path, experiment: str, config: Mapping[str, Any], *, config_hash: str,
               meta: Optional[Mapping[str, Any]] = None, now: Optional[_dt.datetime] = None) -> "RunDir":
        """Make a fresh directory (suffix ``-2``, ``-3``… on a clash) holding config.json and meta.json.

        Args:
            config: the resolved config as a nested JSON-ready dict.
            config_hash: short hash of the config, part of the directory name.
            meta: extra provenance (git SHA, argv, …) merged into meta.json.
        """
        if not experiment or Path(experiment).is_absolute() or ".." in Path(experiment).parts:
            raise ValueError(f"experiment must be a relative name, got {experiment!r}")
        now = now or _dt.datetime.now()
        base = Path(root) / experiment / f"{now:%Y%m%d-%H%M%S}-{config_hash}"
        path, n = base, 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        run = cls(path)
        write_json(run.config_path, dict(config))
        write_json(run.meta_path, {"run_id": run.run_id, "experiment": experiment, "config_hash": config_hash,
                                   "status": "running", "started": now.isoformat(timespec="seconds"), **(meta or {})})
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory (must hold config.json)."""
        run = cls(Path(path))
        if not run.config_path.is_file():
            raise FileNotFoundError(f"{path} is not a run directory (no config.json)")
        return run

    run_id = property(lambda self: self.path.name)
    config_path = property(lambda self: self.path / "config.json")
    meta_path = property(lambda self: self.path / "meta.json")
    metrics_path = property(lambda self: self.path / "metrics.json")
    records_path = property(lambda self: self.path / "records.parquet")
    log_path = property(lambda self: self.path / "log.txt")

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text())

    def update_meta(self, **fields: Any) -> None:
        write_json(self.meta_path, {**self.read_meta(), **fields})

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else {}

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Merge ``metrics`` into metrics.json (NaN/inf stored as null)."""
        write_json(self.metrics_path, {**self.read_metrics(), **finite_or_none(dict(metrics))})

    def append_records(self, records: Sequence[Record]) -> Path:
        return append_records(self.records_path, records)

    def records(self) -> pd.DataFrame:
        return load_results(self.records_path)

    def file(self, subdir: str, name: str) -> Path:
        """``<run>/<subdir>/<name>`` with the folder created (tables/, figures/, …)."""
        folder = self.path / subdir
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name
