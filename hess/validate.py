"""Resolve-time checks of a run config: names, sizes and files, before anything expensive runs.

    cfg = validate_config(cfg)        # raises ConfigError naming every problem and its fix
    check_finite({"depth": t}, "model output of scene s0")   # NaN/Inf -> NonFiniteError naming the tensor

``hess evaluate``/``calibrate``/``sweep``/``train`` call ``validate_config`` when the config is resolved,
so ``--dry-run`` catches an unknown scorer, backend, dataset or model, image sizes that are not a
multiple of the patch size, a key block larger than the sequence (a silently dense "sparse" run), fewer
than 2 frames (no frame pair: every pose metric undefined), unknown ``eval.metrics``, and missing,
truncated or non-safetensors checkpoint / score-artifact files.  Each check is one entry of ``CHECKS``
(``config -> list of messages``); a message names the key, the value, what is wrong and the fix.

Runtime guards that need loaded tensors live here too: ``check_finite`` (model outputs, weights) and
``check_artifact_model`` (a score artifact calibrated on other weights).
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from hess.config import ConfigError, RunConfig
from hess.registry import Registry

PATCH_SIZE = 14  # every model family here (VGGT, π³, hess-tiny) patchifies with DINOv2's 14-pixel patches


def eval_metric_names() -> tuple[str, ...]:
    """What ``eval.metrics`` may name: the groups of ``hess.rq.measure.METRIC_GROUPS`` and their metrics
    (the one list ``scene_metrics`` selects from)."""
    from hess.rq.measure import METRIC_GROUPS

    return tuple(dict.fromkeys([*METRIC_GROUPS, *(k for keys in METRIC_GROUPS.values() for k in keys)]))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_HEADER = 100 * 2**20

Check = Callable[[RunConfig], list[str]]
CHECKS: Registry[Check] = Registry("config check")


class NonFiniteError(ValueError):
    """A tensor (model output or weight) holds NaN or Inf."""


class ArtifactMismatchError(ConfigError):
    """A score artifact was calibrated on other weights than the evaluated model."""


def validate_config(cfg: RunConfig) -> RunConfig:
    """Run every check of ``CHECKS`` on ``cfg``; return it unchanged or raise one ConfigError.

    Raises:
        ConfigError: ``"<key>=<value>: <problem>; <fix>"``, several problems joined by ``"; also "``
            (one line).
    """
    problems = [msg for name in CHECKS for msg in CHECKS.get(name)(cfg)]
    if problems:
        raise ConfigError("; also ".join(problems))
    return cfg


def _unknown(key: str, value: str, known: Iterable[str]) -> list[str]:
    import difflib

    known = sorted(known)
    if value in known:
        return []
    close = difflib.get_close_matches(value, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return [f"{key}={value!r} is unknown; {hint}known: {', '.join(known)}"]


# --------------------------------------------------------------------------------------------- names
@CHECKS.register("names")
def _names(cfg: RunConfig) -> list[str]:
    """Registry names: scorer, attention backend, dataset, model (without a checkpoint)."""
    from hess.attention.core import BACKENDS
    from hess.rq.resources import FULL_SIZE, SCENE_SOURCES
    from hess.scoring import SCORERS

    out = _unknown("score.scorer", cfg.score.scorer, SCORERS.names())
    out += _unknown("sparse.backend", cfg.sparse.backend, BACKENDS.names())
    out += _unknown("data.dataset", cfg.data.dataset, SCENE_SOURCES.names())
    if not cfg.model.checkpoint:
        out += _unknown("model.name", cfg.model.name, known_models() | FULL_SIZE)
    known = eval_metric_names()
    bad = [m for m in cfg.eval.metrics if m not in known]
    if bad:
        out.append(f"eval.metrics: unknown metric(s) {', '.join(map(repr, bad))}; known: {', '.join(known)}")
    return out


def known_models() -> set[str]:
    """Model names buildable or loadable without a checkpoint: presets and embedded checkpoints."""
    from hess.models import EMBEDDED_CHECKPOINTS, PI3_PRESETS, VGGT_PRESETS

    return set(VGGT_PRESETS) | set(PI3_PRESETS) | set(EMBEDDED_CHECKPOINTS.names())


# --------------------------------------------------------------------------------------------- sizes
def num_patches(cfg: RunConfig, patch_size: int = PATCH_SIZE) -> int:
    """N_p = S · (H / p) · (W / p): patch tokens of one evaluation sequence."""
    return cfg.data.num_frames * (cfg.data.height // patch_size) * (cfg.data.width // patch_size)


@CHECKS.register("sizes")
def _sizes(cfg: RunConfig) -> list[str]:
    """Image sizes a multiple of the patch size; >= 2 frames; a key block smaller than the sequence."""
    out = []
    for key in ("height", "width"):
        value = getattr(cfg.data, key)
        if value % PATCH_SIZE:
            lo = max(PATCH_SIZE, value // PATCH_SIZE * PATCH_SIZE)
            out.append(f"data.{key}={value} is not a multiple of the {PATCH_SIZE}-pixel patch size; "
                       f"use {lo} or {lo + PATCH_SIZE}")
    if cfg.data.num_frames < 2:
        out.append(f"data.num_frames={cfg.data.num_frames}: pose metrics need at least one frame pair; "
                   "use data.num_frames >= 2")
    if out or cfg.sparse.method == "dense":
        return out
    n_p = num_patches(cfg)
    n_k = math.ceil(n_p / cfg.sparse.k_block)
    if n_k < 2:
        out.append(f"sparse.k_block={cfg.sparse.k_block} covers all {n_p} patch tokens of a sequence "
                   f"({cfg.data.num_frames} frames of {cfg.data.height}x{cfg.data.width}): one key block, so "
                   f"'sparse' attention would be dense; use sparse.k_block <= {max(1, n_p // 2)}")
    elif cfg.budget.min_blocks > n_k:
        out.append(f"budget.min_blocks={cfg.budget.min_blocks} exceeds the {n_k} key blocks of a sequence "
                   f"({n_p} patches / sparse.k_block={cfg.sparse.k_block}); use budget.min_blocks <= {n_k}")
    return out


# --------------------------------------------------------------------------------------------- files
def safetensors_problem(path: str | Path) -> Optional[str]:
    """Why ``path`` is not a complete .safetensors file (None if its header and size agree).

    Reads the 8-byte header length and the JSON header only; the tensor data must end exactly at the
    end of the file (a truncated download fails here, not after the model is built).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is not a .safetensors file ({size} bytes, no header)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                return f"{path} is not a .safetensors file (header length {n} > file size {size}): corrupt or another format"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"{path} is not a readable .safetensors file ({type(err).__name__}: {err})"
    if not isinstance(header, dict):
        return f"{path} is not a .safetensors file (header is not a JSON object)"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{path} is truncated or padded: its header describes {expected} bytes, the file has {size}"
    return None


def _weights_file(source: str) -> Optional[Path]:
    """The local weights file of a ``model.checkpoint`` value (None for a hub id or an embedded name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "model.pt"):
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"model.checkpoint={source!r}: the folder holds no model.safetensors or model.pt; "
                          "point it at the weights file or a folder holding one")
    if path.is_file():
        return path
    if _REPO_ID.match(source) and not path.suffix:
        return None  # a Hugging Face repo id, resolved (cache, offline message) when loaded
    from hess.models import EMBEDDED_CHECKPOINTS

    if source in EMBEDDED_CHECKPOINTS:
        return None
    raise ConfigError(f"model.checkpoint={source!r} not found (neither a file, a folder, a Hugging Face repo id "
                      "nor an embedded checkpoint); check the path")


@CHECKS.register("files")
def _files(cfg: RunConfig) -> list[str]:
    """The checkpoint and score artifact exist and are complete safetensors files; dataset roots exist."""
    out = []
    if cfg.model.checkpoint:
        try:
            weights = _weights_file(cfg.model.checkpoint)
        except ConfigError as err:
            out.append(str(err))
            weights = None
        if weights is not None and weights.suffix == ".safetensors":
            problem = safetensors_problem(weights)
            if problem:
                out.append(f"model.checkpoint: {problem}; re-download or re-export the weights")
    if cfg.calib.artifact:
        out += _artifact_problems(Path(cfg.calib.artifact).expanduser())
    if cfg.data.dataset != "synthetic" and cfg.data.root and not Path(cfg.data.root).expanduser().is_dir():
        out.append(f"data.root={cfg.data.root!r} is not a folder; point it at the {cfg.data.dataset} dataset root")
    return out


def _artifact_problems(path: Path) -> list[str]:
    from hess.scoring import ARTIFACT_FORMAT, sidecar_path

    fix = "recompute it with `hess calibrate --output FILE.safetensors`"
    if not path.is_file():
        return [f"calib.artifact={str(path)!r} not found; {fix}"]
    if path.suffix != ".safetensors":
        return [f"calib.artifact={str(path)!r} must be a .safetensors score artifact; {fix}"]
    problem = safetensors_problem(path)
    if problem:
        return [f"calib.artifact: {problem}; {fix}"]
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        return [f"calib.artifact: its JSON sidecar {side} is missing (it records the model and scenes); {fix}"]
    except ValueError as err:
        return [f"calib.artifact: sidecar {side} is not valid JSON ({err}); {fix}"]
    if not isinstance(meta, Mapping) or meta.get("format") != ARTIFACT_FORMAT:
        found = meta.get("format") if isinstance(meta, Mapping) else type(meta).__name__
        return [f"calib.artifact: {side} is not a {ARTIFACT_FORMAT} sidecar (format={found!r}); {fix}"]
    return []


# ------------------------------------------------------------------------------------ runtime guards
def check_finite(tensors: Mapping[str, Any], where: str) -> None:
    """Raise NonFiniteError naming the first tensor of ``tensors`` (name -> tensor) holding NaN or Inf."""
    import torch

    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bad.any():
                count, total = int(bad.sum()), value.numel()
                raise NonFiniteError(f"{where}: tensor {name!r} {tuple(value.shape)} holds {count} of {total} "
                                     "NaN/Inf values; check the weights and model.dtype (float16 overflows), "
                                     "or rerun in float32")


def check_artifact_model(artifact: str, artifact_hash: str, model_hash: str, allow: bool) -> Optional[str]:
    """``None`` when the artifact was calibrated on the evaluated weights; otherwise raise
    ArtifactMismatchError, or, with ``allow`` (``calib.allow_model_mismatch=true``), return the warning
    text to record."""
    if not artifact_hash or artifact_hash == model_hash:
        return None
    text = (f"calib.artifact={artifact!r} was calibrated on model weights {artifact_hash}, not on the evaluated "
            f"model {model_hash}")
    if not allow:
        raise ArtifactMismatchError(f"{text}; recalibrate (`hess calibrate`) on this model, or pass "
                                    "calib.allow_model_mismatch=true to use it anyway (recorded in the run)")
    return text + " (used anyway: calib.allow_model_mismatch=true)"
