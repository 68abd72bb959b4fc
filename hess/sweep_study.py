"""What keeps a sweep one study across kills, resumes and many workers (used by :mod:`hess.sweep`).

    check_identity(study, identity, created)   # targets, directions, space, objective: refuse a mismatch
    reap_stale_trials(study)                   # dead workers' RUNNING trials -> FAIL (+ one retry), run dirs marked
    run_trials(study, objective, n_trials)     # exactly n_trials finished trials, however many workers

- Identity: the creating worker stores ``IDENTITY_ATTR`` (targets, directions, search space, objective,
  base-config hash) in the study's user attrs; every later worker compares its own and refuses a
  different one, saying how to start a new study.  A study holding no finished trial yet may be
  re-targeted (nothing to mislabel); the directions are fixed by Optuna at creation.
- Stale trials: a trial's worker is tagged (``WORKER_ATTR``: machine, pid, trial number).  A RUNNING trial
  is failed when its heartbeat is older than the grace period (Optuna's ``fail_stale_trials``), when its
  worker ran on this machine and that process is gone, or when it was never tagged for longer than the
  grace period (its worker died right after creating it); then the storage's
  ``RetryHeartbeatStaleTrialCallback`` queues its parameters again (``max_retry`` times) and its run
  directory's meta.json is marked failed.
- Exact count: a worker takes a new trial only while finished + running < n_trials; a trial created in
  a race (``n_trials`` trials with a smaller number are finished or running) is not run: a queued one
  goes back to WAITING, a fresh one is failed with ``SURPLUS_ATTR`` (no parameters, left out of
  ``trials.csv``); idle workers wait for the running ones (and reap them if their worker dies).
- Seeds: the sampler is re-seeded for every trial from ``(seed, trial number, worker)``, so workers given
  the same ``--seed`` never propose the same parameters, and a single seeded worker is reproducible.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import optuna
from optuna.trial import TrialState

from hess.config import ConfigError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
IDENTITY_ATTR = "hess.identity"
WORKER_ATTR = "hess.worker"
SURPLUS_ATTR = "hess.surplus"  # a trial created in a race for the last slot, never run
SamplerFactory = Callable[[int], optuna.samplers.BaseSampler]


class TargetMissingError(ConfigError):
    """The objective returned no value for a ``--target`` metric (a sweep setting, not a trial failure)."""


# ------------------------------------------------------------------------------------------ identity
def check_identity(study: optuna.Study, identity: Mapping[str, Any], created: bool, *, storage_url: str = "") -> None:
    """Store ``identity`` in a new study; compare it with the stored one of an existing study.

    Raises:
        ConfigError: the study was started with other targets, search space or objective (after its
            first finished trial), naming what differs and how to start a new study.
    """
    identity = json.loads(json.dumps(dict(identity)))
    if created:
        study.set_user_attr(IDENTITY_ATTR, identity)
        return
    stored = None
    for _ in range(50):  # the creating worker stores it right after creating the study
        stored = study.user_attrs.get(IDENTITY_ATTR)
        if stored is not None:
            break
        time.sleep(0.1)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if stored is None or stored == identity:
        if stored is None:
            study.set_user_attr(IDENTITY_ATTR, identity)
        return
    differ = [k for k in sorted(set(stored) | set(identity)) if stored.get(k) != identity.get(k)]
    if finished == 0 and stored.get("directions") == identity.get("directions"):
        study.set_user_attr(IDENTITY_ATTR, identity)  # nothing finished yet: nothing to mislabel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(identity["targets"]))
        return
    if differ == ["base_config"]:
        warnings.warn(f"study {study.study_name!r}: the base config (KEY=VALUE overrides, --config) differs from the "
                      "one it was started with; trials of both are mixed", stacklevel=2)
        return
    shown = "; ".join(f"{k}: stored {_short(stored.get(k))}, given {_short(identity.get(k))}" for k in differ)
    where = f" --storage {storage_url}" if storage_url else ""
    raise ConfigError(f"study {study.study_name!r} holds {finished} finished trial(s) of another sweep ({shown}); "
                      "resume it with its own settings, or start a new study with another --name (or delete this one: "
                      f"optuna delete-study --study-name {study.study_name}{where})")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def config_digest(data: Mapping[str, Any]) -> str:
    """12 hex digits of a JSON-able mapping (the base config of a sweep, device excluded)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -------------------------------------------------------------------------------------- worker tags
def machine_id() -> str:
    """Host name + boot id + pid namespace: two processes with the same id can see each other's pids."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            parts.append(Path(path).read_text().strip())
        except OSError:
            pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "|".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tag(trial: optuna.Trial) -> None:
    trial.set_user_attr(WORKER_ATTR, {"machine": machine_id(), "pid": os.getpid(), "number": trial.number})


# ------------------------------------------------------------------------------------ stale trials
def _grace(storage: Any) -> Optional[float]:
    interval = getattr(storage, "heartbeat_interval", None)
    if interval is None:
        return None
    return float(getattr(storage, "grace_period", None) or 2 * interval)


def reap_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker is gone; retry them per the storage's callback; mark run dirs.

    Returns the numbers of the trials this call failed.
    """
    storage = study._storage
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat-based, with the retry callback
    grace, here, now = _grace(storage), machine_id(), datetime.now()
    dead = []
    for t in running.values():
        worker = t.user_attrs.get(WORKER_ATTR)
        tagged = isinstance(worker, dict) and worker.get("number") == t.number
        if tagged and worker.get("machine") == here and not _alive(int(worker["pid"])):
            dead.append(t)
        elif not tagged and grace is not None and t.datetime_start and now - t.datetime_start > timedelta(seconds=grace):
            dead.append(t)
    callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    for t in dead:
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # failed meanwhile by another worker (or by the heartbeat check above)
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    failed = [n for n in running if storage.get_trial(running[n]._trial_id).state == TrialState.FAIL]
    for n in failed:
        _mark_run_dir(running[n].user_attrs.get("run_dir"))
    return failed


def _mark_run_dir(path: Optional[str]) -> None:
    """meta.json of a dead worker's trial: status failed (when that run directory is on this machine)."""
    meta = Path(path) / "meta.json" if path else None
    if meta is None or not meta.is_file():
        return
    from hess.results import write_json

    try:
        data = json.loads(meta.read_text())
    except ValueError:
        return
    if data.get("status") == "running":
        write_json(meta, {**data, "status": "failed", "error": "worker died (killed or lost): trial failed and retried",
                          "finished": datetime.now().isoformat(timespec="seconds")})


# ---------------------------------------------------------------------------------------- the loop
def _counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
    finished = sum(t.state in FINISHED for t in trials)
    return finished, len(trials) - finished


def _surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """More than ``n_trials`` finished or running trials with a smaller number: this one is not needed."""
    before = [t for t in study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,)) if t.number < number]
    return len(before) >= n_trials


def _give_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """A queued trial (baseline, retry) goes back to WAITING for whoever needs it; a fresh one (no
    parameters yet) is failed with ``hess.surplus`` (so that it is never popped before a queued one)."""
    frozen = study._storage.get_trial(trial._trial_id)
    trial.set_user_attr(WORKER_ATTR, None)
    if frozen.params or "fixed_params" in frozen.system_attrs:
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.WAITING)
    else:
        trial.set_user_attr(SURPLUS_ATTR, True)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], Any], n_trials: int, *,
               catch: tuple[type[Exception], ...] = (), sampler_for: Optional[SamplerFactory] = None,
               on_trial: Optional[Callable[[optuna.trial.FrozenTrial], None]] = None, poll: float = 1.0) -> int:
    """Run trials until the study holds exactly ``n_trials`` finished (complete or pruned) trials.

    This call makes at most as many attempts as trials were missing when it started, so an objective
    that keeps failing (with ``catch``) ends the call instead of looping.

    Args:
        objective: ``trial -> value(s)``; may raise ``optuna.TrialPruned``.
        catch: exceptions of the objective that fail the trial and continue (others fail it and propagate).
        sampler_for: ``trial number -> sampler`` used for that trial's suggestions (per-trial seeds).
        on_trial: called with every trial this worker finished.
        poll: seconds between checks while other workers' trials run.
    Returns:
        the number of trials this call finished (complete, pruned or failed).
    """
    from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled

    ran, budget = 0, None
    while True:
        reap_stale_trials(study)
        finished, running = _counts(study)
        budget = n_trials - finished if budget is None else budget  # attempts of this call: failures end it
        if finished >= n_trials or ran >= budget:
            return ran
        if finished + running >= n_trials:
            if not is_heartbeat_enabled(study._storage) and running == 0:
                return ran
            time.sleep(poll)  # the last trials run elsewhere; wait in case their worker dies
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()  # the heartbeat thread is started below, as Study.optimize does
        tag(trial)
        if _surplus(study, trial.number, n_trials):
            _give_back(study, trial)
            time.sleep(poll * 0.1)
            continue
        if sampler_for is not None:
            study.sampler = sampler_for(trial.number)
        with get_heartbeat_thread(trial._trial_id, study._storage):
            state, values, error = _evaluate(objective, trial)
        if isinstance(error, TargetMissingError):
            _requeue(study, trial)
        frozen = study.tell(trial, values, state=state, skip_if_finished=True)
        ran += 1
        if on_trial is not None:
            on_trial(frozen)
        if error is not None and not isinstance(error, catch):
            raise error


def _evaluate(objective: Callable[[optuna.Trial], Any], trial: optuna.Trial) -> tuple[TrialState, Any, Optional[BaseException]]:
    try:
        values = objective(trial)
    except optuna.TrialPruned:
        return TrialState.PRUNED, None, None
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - failed in the storage, then re-raised
        return TrialState.FAIL, None, err
    return TrialState.COMPLETE, values, None


def _requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue a trial's parameters again (its failure was the sweep's settings, not the parameters)."""
    attrs = {k: v for k, v in study._storage.get_trial(trial._trial_id).user_attrs.items()
             if k in ("baseline",)}
    study.enqueue_trial(dict(trial.params), user_attrs=attrs, skip_if_exists=False)
