"""Checkpoint loading for VGGT: the one place in hess that reads model weights (style rule 8).

``load_vggt(source)`` accepts

* a local ``.safetensors`` / ``.pt`` / ``.pth`` file (a plain state_dict, or ``{"model": sd}`` /
  ``{"state_dict": sd}`` as official training checkpoints store it);
* a local directory holding ``model.safetensors`` or ``model.pt`` and optionally ``config.json`` (also
  found beside a ``model.safetensors`` / ``model.pt`` file given directly);
* a Hugging Face repo id such as ``"facebook/VGGT-1B"`` (through ``huggingface_hub``, which reuses its
  cache; offline and not cached → ``CheckpointUnavailableError`` saying how to obtain the file);
* the name of an embedded checkpoint (``EMBEDDED_CHECKPOINTS``, files under ``hess/assets/``).

Loading is strict: missing, unexpected and wrongly-shaped keys are listed by name.  The model is built on
the meta device and the checkpoint tensors are assigned into it, so no random initialisation is paid for.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from hess.config import ConfigError
from hess.models.vggt import VGGT, build_vggt
from hess.registry import Registry

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
WEIGHT_FILES = ("model.safetensors", "model.pt")
CONFIG_FILE = "config.json"  # the architecture beside the weights: read here, written by ``hess train``'s export
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedCheckpoint:
    """A checkpoint shipped inside the package.

    Attributes:
        path: file or directory relative to ``hess/assets``.
        config: preset name or config dict (None: the directory's ``config.json``, else ``"vggt-1b"``).
        description: one line for listings.
    """

    path: str
    config: Union[str, dict, None] = None
    description: str = ""


EMBEDDED_CHECKPOINTS: Registry[EmbeddedCheckpoint] = Registry("embedded checkpoint")


class CheckpointUnavailableError(FileNotFoundError):
    """The checkpoint is neither local nor in the Hugging Face cache, and cannot be downloaded."""


class StateDictMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model."""


def _name_list(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def read_state_dict(path: Union[str, Path]) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or torch-pickled checkpoint into a flat ``{key: tensor}`` dict on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _finite(load_file(str(path), device="cpu"), path)
        except Exception as err:  # SafetensorError names neither the file nor the fix
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"could not read checkpoint {path} ({type(err).__name__}: {err}): truncated or not a "
                              "safetensors file; re-download or re-export it") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ConfigError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors, or {{'model': state_dict}})")
    return _finite(dict(obj), path)


def _finite(state_dict: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """``state_dict`` unchanged; ConfigError naming the first tensor holding NaN/Inf (corrupt weights)."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise ConfigError(f"checkpoint {path}: tensor {key!r} {tuple(value.shape)} holds {count} NaN/Inf "
                              "value(s); the weights are corrupt: re-download or re-export them")
    return state_dict


def compare_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, "key: checkpoint shape vs model shape") of ``state_dict`` against ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    return missing, unexpected, mismatched


def _mismatch_report(source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    parts = [f"checkpoint {source} does not match the model:"]
    for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
        if names:
            parts.append(f"  {len(names)} {label}: {_name_list(names)}")
    parts.append("  (pass config= to build a matching architecture, or strict=False to load what matches; "
                 "from a config or the CLI: model.config=<config.json or preset>)")
    return "\n".join(parts)


def _hf_instructions(repo_id: str, filename: str) -> str:
    from huggingface_hub import constants

    return (
        f"To obtain it: on a machine with internet access run `hf download {repo_id} {filename}` "
        f"(stores it in the Hugging Face cache, HF_HOME={constants.HF_HOME}; copy that cache here or set "
        f"HF_HOME to it), or download https://huggingface.co/{repo_id}/resolve/main/{filename} and pass its "
        f"local path: load_vggt('/path/to/{filename}') (or a directory holding {filename} and config.json)."
    )


def _hf_file(repo_id: str, filename: str) -> Optional[Path]:
    """A repo file from the Hugging Face cache, else downloaded; None if the repo lacks it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:  # offline / unreachable, and not cached
        raise
    except EntryNotFoundError:
        return None


def _download_hf(repo_id: str) -> tuple[Path, Optional[Path]]:
    """(weights, config.json or None) for a Hugging Face repo: the cache first, then the Hub (one try)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    cached = [f for f in WEIGHT_FILES if isinstance(try_to_load_from_cache(repo_id, f), str)]
    weights = None
    try:
        for filename in cached or WEIGHT_FILES:
            weights = _hf_file(repo_id, filename)
            if weights is not None:
                break
    except LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the Hub is unreachable ({err.__class__.__name__})")
        raise CheckpointUnavailableError(
            f"could not obtain the weights of {repo_id!r}: {', '.join(WEIGHT_FILES)} are not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) and {why}. " + _hf_instructions(repo_id, WEIGHT_FILES[0])
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointUnavailableError(f"Hugging Face repo {repo_id!r} not found or not accessible: {err}") from err
    if weights is None:
        raise CheckpointUnavailableError(f"Hugging Face repo {repo_id!r} holds none of {', '.join(WEIGHT_FILES)}")
    try:
        config = _hf_file(repo_id, "config.json")
    except OSError:
        config = None
    return weights, config


def resolve_source(source: Union[str, os.PathLike]) -> tuple[Path, Union[str, dict, None]]:
    """Locate a checkpoint: (weights file, config found beside it or registered with it, or None)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for filename in WEIGHT_FILES:
            if (path / filename).is_file():
                config = path / CONFIG_FILE
                return path / filename, str(config) if config.is_file() else None
        raise FileNotFoundError(f"directory {path} holds none of {', '.join(WEIGHT_FILES)}")
    if path.is_file():  # a weights file exported with its config (model.safetensors + config.json) keeps it
        config = path.parent / CONFIG_FILE
        return path, str(config) if path.name in WEIGHT_FILES and config.is_file() else None
    name = str(source)
    if name in EMBEDDED_CHECKPOINTS:
        entry = EMBEDDED_CHECKPOINTS.get(name)
        weights, found_config = resolve_source(ASSETS_DIR / entry.path)
        return weights, entry.config if entry.config is not None else found_config
    looks_like_path = path.suffix in (".pt", ".pth", ".safetensors", ".bin") or name.startswith((".", "/", "~"))
    if _REPO_ID.match(name) and not looks_like_path:
        weights, config = _download_hf(name)
        return weights, str(config) if config is not None else None
    known = ", ".join(EMBEDDED_CHECKPOINTS.names()) or "(none)"
    raise FileNotFoundError(
        f"checkpoint {name!r} not found: no such file or directory, not a Hugging Face repo id (owner/name), "
        f"and not an embedded checkpoint (known: {known})"
    )


def _parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def _materialize(model: nn.Module, device: torch.device) -> bool:
    """Re-create non-persistent buffers left on the meta device; True if nothing is left on meta."""
    for module in model.modules():
        if hasattr(module, "init_buffers") and any(b.is_meta for b in module.buffers(recurse=False)):
            module.init_buffers(device)
    return not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def load_checkpoint(
    build: Callable[..., nn.Module],
    source: Union[str, os.PathLike],
    *,
    default_config: Union[dict, str],
    config: Union[dict, str, None] = None,
    dtype: Union[str, torch.dtype] = "fp32",
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Model-family-agnostic loading: locate ``source``, build with ``build(config, device=..., dtype=...)``
    on the meta device, check keys, assign the checkpoint tensors (see ``load_vggt`` for the arguments).

    ``default_config`` is used when neither ``config`` nor a ``config.json`` beside the weights is given.
    Modules holding non-persistent buffers expose ``init_buffers(device)`` so that a meta build can be
    completed; otherwise the model is rebuilt for real and loaded normally.
    """
    torch_dtype, device = _parse_dtype(dtype), torch.device(device)
    weights, found_config = resolve_source(source)
    state_dict = read_state_dict(weights)
    arch = config if config is not None else (found_config if found_config is not None else default_config)
    try:
        model = build(arch, device="meta")
    except (ValueError, KeyError, TypeError) as err:
        if config is not None or found_config is None:
            raise
        raise ValueError(f"cannot build the model from the config found with the weights ({found_config}): {err}; "
                         f"pass config= (e.g. {default_config!r}) to override it") from err
    missing, unexpected, mismatched = compare_state_dict(model, state_dict)
    if missing or unexpected or mismatched:
        report = _mismatch_report(str(weights), missing, unexpected, mismatched)
        if strict:
            raise StateDictMismatchError(report)
        warnings.warn(report, stacklevel=3)
        bad = {m.split(":")[0] for m in mismatched}
        state_dict = {k: v for k, v in state_dict.items() if k not in bad and k not in unexpected}
    state_dict = {k: v.to(device=device, dtype=torch_dtype if v.is_floating_point() else v.dtype)
                  for k, v in state_dict.items()}
    loaded = False
    if not missing and not mismatched:  # every tensor comes from the checkpoint: no initialisation needed
        model.load_state_dict(state_dict, strict=True, assign=True)
        loaded = _materialize(model, device)
    if not loaded:  # something stays initialised (or a buffer cannot be re-created): a real build
        model = build(arch, device=device, dtype=torch_dtype)
        model.load_state_dict(state_dict, strict=False)
    model.model_id = str(source)
    return model.eval()


def load_vggt(
    source: Union[str, os.PathLike],
    *,
    config: Union[dict, str, None] = None,
    dtype: Union[str, torch.dtype] = "fp32",
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> VGGT:
    """Build a VGGT and load a checkpoint into it.

    Args:
        source: file, directory, Hugging Face repo id or embedded checkpoint name (module docstring).
        config: architecture (preset name / dict / config.json path); default: the ``config.json`` next
            to the weights, else ``"vggt-1b"``.
        dtype: ``"fp32" | "bf16" | "fp16"`` or a torch floating dtype for the parameters.
        device: where the parameters live.
        strict: raise ``StateDictMismatchError`` listing missing / unexpected / wrongly-shaped keys;
            ``False`` warns, loads the matching keys and keeps the others randomly initialised.
    Returns:
        The model in ``eval()`` mode with ``model_id`` set to ``str(source)``.
    """
    return load_checkpoint(build_vggt, source, default_config="vggt-1b", config=config, dtype=dtype,
                           device=device, strict=strict)


EMBEDDED_CHECKPOINTS.register("hess-tiny")(EmbeddedCheckpoint(
    path="hess_tiny.safetensors",
    config=str(ASSETS_DIR / "hess_tiny.json"),
    description="small VGGT trained by hess on synthetic orbits (84x84, 4 frames); see hess/assets/MODEL_CARD.md",
))
