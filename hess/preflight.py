"""Preflight: what a run will need, checked before any GPU minute is spent (``--dry-run``).

    problems = preflight(cfg)            # [] when the run can start; one line per problem otherwise
    lines = preflight_lines(cfgs)        # deduplicated problems of several configs + the memory estimate
    estimate_peak_memory_bytes(cfg)      # {"eval": bytes, "calibration": bytes, "weights": bytes}

Checks: the weights (a local file / folder, the Hugging Face cache, or an embedded checkpoint; never a
download), ``model.config``, the data roots and their layout (CO3Dv2: category folders with annotations and
set lists; DTU: the requested ``scan{N}`` folders with images / cams / depths / binary_masks and enough
views), the calibration split (a dataset that has one, enough sequences in it, or ``calib.artifact``), and an
estimate of peak memory against the device.  Nothing is loaded beyond annotation files.

The memory estimate is deliberately simple (``estimate_peak_memory_bytes``): weights (parameter count of the
architecture built on the meta device × dtype bytes) plus transformer activations per block from
Korthikanti et al. (2022), ``34·s·h`` bytes at 16-bit for a full backward (``s`` tokens, ``h`` width; their
``5·a·s²`` attention term is dropped: SDPA is memory-efficient), with only block inputs kept under
checkpointing, plus the two dense heads' full-resolution feature maps (~400 channels per pixel stored for the
backward; inference runs them 8 frames at a time, ~160 channels live).  The cost model of
``hess.costmodel`` can replace it behind the same function.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from hess.config import RunConfig

GIB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_ARCH_BY_NAME = {"vggt": "vggt-1b", "vggt-1b": "vggt-1b", "pi3": "pi3"}
_ENV = {"co3d": "HESS_CO3D_ROOT", "dtu": "HESS_DTU_ROOT"}


# ------------------------------------------------------------------------------------------ weights
def _weights_problem(cfg: RunConfig) -> Optional[str]:
    from hess.models.load import _REPO_ID, CONFIG_FILE, EMBEDDED_CHECKPOINTS, WEIGHT_FILES

    source = cfg.model.checkpoint
    if source is None:
        if cfg.model.name in EMBEDDED_CHECKPOINTS or cfg.model.name not in _ARCH_BY_NAME:
            return None
        hint = "yyfz233/Pi3" if cfg.model.name.startswith("pi3") else "facebook/VGGT-1B"
        return f"weights: model.name={cfg.model.name} needs model.checkpoint (e.g. {hint} or a local file)"
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            return f"weights: folder {path} holds none of {', '.join(WEIGHT_FILES)}"
        if cfg.model.config is None and not (path / CONFIG_FILE).is_file():
            return f"weights: folder {path} has no {CONFIG_FILE}: set model.config=<config.json or preset>"
        return None
    if path.is_file() or source in EMBEDDED_CHECKPOINTS:
        return None
    if _REPO_ID.match(source) and not source.startswith((".", "/", "~")):
        from huggingface_hub import constants, try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(source, f), str) for f in WEIGHT_FILES):
            return None
        if constants.HF_HUB_OFFLINE:
            where = "offline (HF_HUB_OFFLINE) and not in the Hugging Face cache"
        else:
            where = "not in the Hugging Face cache (the run would download it)"
        return (f"weights: {source} is {where} ({constants.HF_HUB_CACHE}); get them with "
                f"`hf download {source} model.safetensors` or pass model.checkpoint=<local file>")
    return f"weights: model.checkpoint={source!r} is neither a file, a folder, an embedded checkpoint nor an HF repo id"


def _config_problem(cfg: RunConfig) -> Optional[str]:
    from hess.models import PI3_PRESETS, VGGT_PRESETS

    c = cfg.model.config
    if c is None or c in VGGT_PRESETS or c in PI3_PRESETS or Path(c).expanduser().is_file():
        return None
    return f"model.config={c!r}: no such file and not a preset ({', '.join(sorted({*VGGT_PRESETS, *PI3_PRESETS}))})"


# --------------------------------------------------------------------------------------------- data
def _root(dataset: str, root: Optional[str], key: str) -> tuple[Optional[Path], Optional[str]]:
    value = root if root is not None else os.environ.get(_ENV[dataset], "")
    if not value:
        return None, f"{key}: {dataset} needs a root: set {key}=<folder> (or ${_ENV[dataset]})"
    path = Path(value).expanduser()
    if not path.is_dir():
        return None, f"{key}: {dataset} root {path} does not exist"
    return path, None


def co3d_problems(root: Path, categories: Iterable[str], subset: str, needed: int, frames: int,
                  key: str) -> list[str]:
    """CO3Dv2 layout under ``root``: per category the annotations and the fewview_dev set list; at least
    ``needed`` sequences with ``frames`` frames in ``subset`` (train / test) over all categories."""
    from hess.data.co3d import SEEN_CATEGORIES

    cats = list(categories) or [c for c in SEEN_CATEGORIES if (root / c).is_dir()]
    if not cats:
        return [f"{key}: no CO3Dv2 category folder under {root} (expected e.g. {root}/apple/frame_annotations.jgz)"]
    problems, sequences = [], 0
    for cat in cats:
        d = root / cat
        missing = [p for p in ("frame_annotations.jgz", "sequence_annotations.jgz",
                               "set_lists/set_lists_fewview_dev.json") if not (d / p).is_file()]
        if missing:
            problems.append(f"{key}: CO3Dv2 category {d} lacks {', '.join(missing)}")
            continue
        try:
            lists = json.loads((d / "set_lists" / "set_lists_fewview_dev.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            problems.append(f"{key}: unreadable set list in {d}: {err}")
            continue
        counts: dict[str, int] = {}
        for entry in lists.get(subset, []):
            counts[entry[0]] = counts.get(entry[0], 0) + 1
        sequences += sum(n >= frames for n in counts.values())
    if not problems and sequences < needed:
        problems.append(f"{key}: CO3Dv2 {subset} subset under {root} has {sequences} sequences with >= {frames} "
                        f"frames, the run needs {needed}")
    return problems


def dtu_problems(root: Path, scans: Iterable[int], frames: int, key: str) -> list[str]:
    """The DTU scans of the run (``scan{N}`` with images, cams, depths, binary_masks) and enough stride-5 views."""
    problems = []
    for scan in scans:
        d = root / f"scan{scan}"
        missing = [s for s in ("images", "cams", "depths", "binary_masks") if not (d / s).is_dir()]
        if missing:
            problems.append(f"{key}: DTU scan {d} lacks {', '.join(missing)} (set data.scans=[...] to choose scans)")
            continue
        views = len([p for p in (d / "images").iterdir() if p.suffix in (".png", ".jpg")])
        if math.ceil(views / 5) < frames:
            problems.append(f"{key}: DTU scan {d} has {views} images ({math.ceil(views / 5)} stride-5 views), "
                            f"the run needs {frames} frames")
    return problems


def _data_problems(cfg: RunConfig) -> list[str]:
    from hess.data.dtu import DTU_TEST_SCANS

    d = cfg.data
    if d.dataset not in _ENV:
        return []
    root, problem = _root(d.dataset, d.root, "data.root")
    if problem:
        return [problem]
    if d.dataset == "co3d":
        return co3d_problems(root, d.categories, "test", d.num_scenes, d.num_frames, "data.root")
    return dtu_problems(root, list(d.scans or DTU_TEST_SCANS)[: d.num_scenes], d.num_frames, "data.root")


def _needs_calibration(cfg: RunConfig) -> tuple[bool, bool]:
    """(needs calibration scenes, needs traces) of the run's scorer."""
    if cfg.sparse.method == "dense":
        return False, False
    traces = cfg.score.scorer in ("hess", "inverted-hess")
    scenes = cfg.score.scorer in ("head-importance", "attention-entropy", "oracle") or (traces and not cfg.calib.artifact)
    return scenes, traces


def _calib_problems(cfg: RunConfig, rq1: bool = False) -> list[str]:
    from hess.rq.resources import calib_source

    scenes, traces = _needs_calibration(cfg)
    if traces and cfg.calib.artifact and not Path(cfg.calib.artifact).is_file():
        return [f"calib.artifact={cfg.calib.artifact}: no such file"]
    if not (scenes or rq1):
        return []
    dataset, root = calib_source(cfg.data, cfg.calib)
    if dataset == "dtu":
        return ["calibration: DTU has no calibration split: set calib.dataset=co3d calib.root=<CO3Dv2 root> "
                "(the paper calibrates on CO3Dv2) or calib.artifact=<score artifact>"]
    if dataset not in _ENV:
        return []
    path, problem = _root(dataset, root, "calib.root")
    if problem:
        return [problem]
    cats = cfg.data.categories if dataset == cfg.data.dataset else ()
    return co3d_problems(path, cats, "train", cfg.calib.num_scenes, cfg.calib.num_frames, "calib.root")


# ------------------------------------------------------------------------------------------- memory
def _arch(cfg: RunConfig) -> Any:
    """The architecture (preset name or config path) a run builds, or None when unknown."""
    from hess.models.load import CONFIG_FILE, EMBEDDED_CHECKPOINTS

    if cfg.model.config:
        return cfg.model.config
    if cfg.model.checkpoint:
        path = Path(cfg.model.checkpoint).expanduser()
        folder = path if path.is_dir() else path.parent
        if (folder / CONFIG_FILE).is_file():
            return str(folder / CONFIG_FILE)
    if cfg.model.name in EMBEDDED_CHECKPOINTS:
        return EMBEDDED_CHECKPOINTS.get(cfg.model.name).config
    return _ARCH_BY_NAME.get(cfg.model.name, cfg.model.name)


def estimate_peak_memory_bytes(cfg: RunConfig) -> dict[str, int]:
    """Simple peak-memory estimate of a run (module docstring): {"weights", "eval", "calibration"} bytes.

    eval: weights + one block's forward activations; calibration: weights + gradients of the global qkv
    weights + stored activations of every block (block inputs only with ``calib.checkpointing``).
    """
    import torch

    from hess.models import build_model
    from hess.rq.resources import calib_size, model_family

    family = model_family(cfg.model.name)
    model = build_model(_arch(cfg), family=family, device="meta")
    params = sum(p.numel() for p in model.parameters())
    layers = model.global_attention_layers()
    width, heads = layers[0].qkv.in_features, layers[0].num_heads
    blocks = 2 * len(layers)                                                  # frame + global (VGGT); π³ alike
    cuda = cfg.model.device == "cuda" or (cfg.model.device == "auto" and torch.cuda.is_available())
    wbytes = _DTYPE_BYTES.get(cfg.model.dtype, 4)

    def tokens(frames: int, h: int, w: int) -> int:
        return frames * (math.ceil(h / 14) * math.ceil(w / 14) + 5)

    def block_activation(s: int, bytes_per: float) -> float:            # Korthikanti et al.: per block, 16-bit,
        return s * width * 34 * bytes_per / 2                            # no s² term (SDPA is memory-efficient)

    weights = params * wbytes
    s_eval = tokens(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    chunk = min(cfg.data.num_frames, 8)                                  # the DPT heads run 8 frames at a time
    eval_peak = (weights + 16 * s_eval * width * wbytes
                 + 2 * chunk * cfg.data.height * cfg.data.width * 160 * wbytes)
    h, w = calib_size(cfg.data, cfg.calib)
    frames = min(cfg.calib.num_frames, cfg.calib.max_frames or cfg.calib.num_frames)
    act_bytes = 2 if (cfg.calib.autocast and cuda) else max(wbytes, 4)
    s_cal = tokens(frames, h, w)
    per_block = block_activation(s_cal, act_bytes)
    stored = blocks * s_cal * width * act_bytes + per_block if cfg.calib.checkpointing else blocks * per_block
    grads = sum(a.qkv.weight.numel() for a in layers) * 4
    heads_maps = 2 * frames * h * w * 400 * act_bytes                    # two DPT heads' full-resolution maps
    calib_peak = weights + grads + stored + heads_maps
    return {"weights": int(weights), "eval": int(eval_peak), "calibration": int(calib_peak)}


def _available_bytes(cfg: RunConfig) -> tuple[Optional[int], str]:
    import torch

    if cfg.model.device == "cuda" or (cfg.model.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None, "CUDA (not available on this machine)"
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system RAM"
    except (ValueError, OSError):
        return None, "system RAM"


def memory_line(cfg: RunConfig) -> tuple[str, Optional[str]]:
    """(the estimate as one line, a problem line when it exceeds the device's memory or None)."""
    try:
        est = estimate_peak_memory_bytes(cfg)
    except Exception as err:  # noqa: BLE001 - an unknown architecture is itself reported, not raised
        return f"memory: no estimate ({type(err).__name__}: {err})", None
    total, where = _available_bytes(cfg)
    need_calib = any(_needs_calibration(cfg))
    peak = max(est["eval"], est["calibration"] if need_calib else 0)
    line = (f"memory: estimated peak {peak / GIB:.1f} GiB (weights {est['weights'] / GIB:.1f}, evaluation "
            f"{est['eval'] / GIB:.1f}, calibration {est['calibration'] / GIB:.1f}"
            f"{' with' if cfg.calib.checkpointing else ' without'} checkpointing) on {where}"
            + (f" of {total / GIB:.0f} GiB" if total else ""))
    problem = None
    if total and peak > total:
        fixes = ([] if cfg.calib.checkpointing else ["calib.checkpointing=true"])
        fixes += [] if (cfg.calib.autocast and "CUDA" not in where and where != "system RAM") else (
            ["calib.autocast=bfloat16 on a CUDA device"] if where == "system RAM" or not cfg.calib.autocast else [])
        fixes.append("fewer calib.num_frames / calib.max_frames")
        problem = (f"memory: the estimated peak {peak / GIB:.1f} GiB exceeds the {total / GIB:.0f} GiB of {where}; "
                   f"try {', '.join(fixes)}")
    return line, problem


# ------------------------------------------------------------------------------------------- report
def preflight(cfg: RunConfig, *, rq1: bool = False) -> list[str]:
    """Problems of ``cfg``, one line each ([] = ready).  ``rq1``: the run calibrates (RQ1's tables)."""
    problems = [p for p in (_weights_problem(cfg), _config_problem(cfg)) if p]
    problems += _data_problems(cfg)
    problems += _calib_problems(cfg, rq1)
    _, memory = memory_line(cfg)
    return problems + ([memory] if memory else [])


def preflight_lines(cfgs: Iterable[RunConfig], *, rq1: bool = False) -> tuple[list[str], list[str]]:
    """(distinct problems over ``cfgs``, info lines: the largest memory estimate)."""
    problems: dict[str, None] = {}
    worst: tuple[int, str] = (-1, "")
    for cfg in cfgs:
        for p in preflight(cfg, rq1=rq1):
            problems[p] = None
        try:
            est = estimate_peak_memory_bytes(cfg)
            peak = max(est["eval"], est["calibration"] if any(_needs_calibration(cfg)) or rq1 else 0)
        except Exception:  # noqa: BLE001
            peak = 0
        if peak > worst[0]:
            worst = (peak, memory_line(cfg)[0])
    return list(problems), [worst[1]] if worst[1] else []
