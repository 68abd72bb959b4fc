"""Tracked runs: a run directory plus a W&B run, opened and closed together.

    with track_run(cfg, experiment="rq2") as run:          # creates <out>/rq2/<ts>-<hash>/
        run.log_metrics({"synthetic/auc30": 0.61})
        run.log_records(records)                            # records.parquet + .csv
        run.log_table("per_scene", frame); run.log_figure("tradeoff", fig)

W&B mode (``cfg.log.wandb_mode``): ``auto`` is ``WANDB_MODE`` when set, else ``online`` when an API
key is configured (``WANDB_API_KEY`` or a netrc entry for the W&B host) and ``offline`` otherwise;
``disabled`` (``--no-wandb``) skips W&B entirely (not even imported).  W&B files go inside the run
directory and its console output is silenced.  Whatever happens inside the block, the W&B run is
finished when it exits: exit code 0 on success, 1 on an exception (re-raised), 0 with status
``pruned`` for exceptions listed in ``ok_exceptions`` (e.g. ``optuna.TrialPruned``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import netrc
import numbers
import os
import platform
import socket
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence
from urllib.parse import urlparse

import hess
from hess.config import RunConfig, config_hash, flatten, to_dict
from hess.results import Record, RunDir, finite_or_none
from hess.runtime import git_dirty, git_sha

_LOG = logging.getLogger("hess")
MODES = ("online", "offline", "disabled")


def has_wandb_key(env: Mapping[str, str] = os.environ) -> bool:
    """True when W&B credentials exist: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(env.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str = "auto", env: Mapping[str, str] = os.environ) -> str:
    """``auto`` -> ``$WANDB_MODE`` if set, else online with credentials / offline without them.

    Explicit ``online`` / ``offline`` / ``disabled`` are returned as given.
    """
    if mode == "auto":
        mode = env.get("WANDB_MODE") or ("online" if has_wandb_key(env) else "offline")
        mode = "offline" if mode == "dryrun" else mode
    if mode not in MODES:
        raise ValueError(f"unknown W&B mode {mode!r}; known: auto, {', '.join(MODES)}")
    return mode


def _init_wandb(cfg: RunConfig, run_dir: RunDir, mode: str, *, name: str, group: Optional[str],
                job_type: str, extra_config: Mapping[str, Any]) -> Any:
    """Start a W&B run writing under ``run_dir``; online failures fall back to offline with a warning."""
    import wandb

    settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False,
                              x_disable_stats=True, x_disable_machine_info=True)
    kwargs = dict(project=cfg.log.wandb_project, entity=cfg.log.wandb_entity, name=name, group=group,
                  job_type=job_type, tags=list(cfg.log.tags), dir=str(run_dir.path),
                  config={**flatten(cfg), **extra_config}, settings=settings)
    try:
        return wandb.init(mode=mode, **kwargs)
    except Exception as err:  # noqa: BLE001 - W&B must never cost a run
        if mode != "online":
            raise
        warnings.warn(f"W&B online init failed ({err}); logging this run offline instead", stacklevel=3)
        return wandb.init(mode="offline", **kwargs)


class TrackedRun:
    """A live run: its directory, its W&B run (None when disabled) and the metrics logged so far."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, wandb_run: Any) -> None:
        self.cfg = cfg
        self.dir = run_dir
        self.wandb_run = wandb_run
        self.metrics: dict[str, Any] = {}

    @property
    def run_id(self) -> str:
        return self.dir.run_id

    @property
    def wandb_id(self) -> Optional[str]:
        return None if self.wandb_run is None else self.wandb_run.id

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Merge into metrics.json and the W&B history/summary."""
        bad = [k for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad:
            raise TypeError(f"metrics must be real numbers; not numeric: {bad}")
        metrics = {k: float(v) for k, v in metrics.items()}
        self.metrics.update(metrics)
        self.dir.write_metrics(metrics)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)
            self.wandb_run.summary.update(finite_or_none(dict(metrics)))

    def log_records(self, records: Sequence[Record]) -> Path:
        """Append tidy rows to records.parquet/.csv (and a W&B table ``records``)."""
        path = self.dir.append_records(records)
        if self.wandb_run is not None and records:
            import pandas as pd

            self.log_table("records", pd.read_parquet(path), save=False)
        return path

    def log_table(self, name: str, frame: Any, *, save: bool = True) -> None:
        """Save a DataFrame as ``tables/<name>.csv`` and log it as a W&B table."""
        if save:
            frame.to_csv(self.dir.file("tables", f"{name}.csv"), index=False)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(dataframe=frame.reset_index(drop=True))})

    def log_figure(self, name: str, figure: Any, *, dpi: int = 120) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` and log it as a W&B image."""
        path = self.dir.file("figures", f"{name}.png")
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Image(str(path))})
        return path


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = _LOG.level
    _LOG.addHandler(handler)
    if _LOG.level == logging.NOTSET or _LOG.level > logging.INFO:
        _LOG.setLevel(logging.INFO)
    try:
        yield
    finally:
        _LOG.removeHandler(handler)
        _LOG.setLevel(previous)
        handler.close()


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str, Optional[bool]]:
    return git_sha(), git_dirty()  # once per process: a sweep runs many trials


def _provenance() -> dict[str, Any]:
    sha, dirty = _git_state()
    return {"git_sha": sha, "git_dirty": dirty, "hess_version": hess.__version__,
            "python": platform.python_version(), "host": socket.gethostname(), "argv": list(sys.argv)}


@contextlib.contextmanager
def track_run(cfg: RunConfig, *, experiment: Optional[str] = None, root: Optional[str | Path] = None,
              group: Optional[str] = None, job_type: str = "evaluate", ok_exceptions: tuple[type, ...] = (),
              extra_config: Optional[Mapping[str, Any]] = None, wandb_run: Any = None) -> Iterator[TrackedRun]:
    """Open a run directory and a W&B run for ``cfg``; close both whatever happens.

    Args:
        cfg: the resolved config (written to config.json, flattened into the W&B config).
        experiment: folder under ``root`` (default ``cfg.log.experiment``).
        root: output root (default ``cfg.log.out_dir``).
        group, job_type: W&B grouping (a sweep uses its study name and ``"trial"``).
        ok_exceptions: exceptions that end the run as ``pruned`` (exit code 0), re-raised.
        extra_config: extra flat entries for the W&B config (e.g. ``{"trial.number": 3}``).
        wandb_run: an already started W&B run to log into (a W&B sweep agent's run); it is still
            finished on exit.
    Yields:
        the TrackedRun.
    """
    experiment = experiment or cfg.log.experiment
    run_dir = RunDir.create(root if root is not None else cfg.log.out_dir, experiment, to_dict(cfg),
                            config_hash=config_hash(cfg), meta=_provenance())
    mode = "given" if wandb_run is not None else resolve_wandb_mode(cfg.log.wandb_mode)
    status, exit_code, error = "finished", 0, None
    with _log_to(run_dir.log_path):
        _LOG.info("run %s (%s), W&B %s", run_dir.path, experiment, mode)
        try:
            if wandb_run is None and mode != "disabled":
                wandb_run = _init_wandb(cfg, run_dir, mode, name=cfg.log.run_name or run_dir.run_id, group=group,
                                        job_type=job_type, extra_config=dict(extra_config or {}))
            elif wandb_run is not None:
                wandb_run.config.update({**flatten(cfg), **dict(extra_config or {})}, allow_val_change=True)
            if wandb_run is not None:
                run_dir.update_meta(wandb_id=wandb_run.id, wandb_mode=mode)
            yield TrackedRun(cfg, run_dir, wandb_run)
        except ok_exceptions as err:
            status, error = "pruned", f"{type(err).__name__}: {err}"
            raise
        except BaseException as err:
            status, exit_code, error = "failed", 1, f"{type(err).__name__}: {err}"
            _LOG.error("run failed:\n%s", traceback.format_exc())
            raise
        finally:
            _LOG.info("run %s %s", run_dir.run_id, status)
            run_dir.update_meta(status=status, error=error, finished=_now())
            if wandb_run is not None:
                wandb_run.summary.update({"status": status})
                wandb_run.finish(exit_code=exit_code)


def _now() -> str:
    import datetime

    return datetime.datetime.now().isoformat(timespec="seconds")
