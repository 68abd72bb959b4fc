"""What an evaluation run loads, each cached by exactly what determines it.

    res = Resources(cache_dir="ablations/outputs/cache")
    model, info = res.model(cfg.model)                   # info["weights"]: checkpoint | embedded | random-init
    scenes = res.eval_scenes(cfg.data)                   # synthetic: the embedded model's distribution
    scores = res.head_scores(cfg, model)                 # calibration artifact, cached on disk by config hash
    table = res.scores(cfg, model)                       # [L, H] for cfg.score.scorer

Synthetic scenes use the embedded model's training distribution (``hess.train.SCENE_OPTIONS``: 25–90°
orbit arcs, 84×84 by default) with ``data.num_frames``/``height``/``width`` from the config; the
evaluation split ``eval`` is the held-out ``test`` split (frame order shuffled per scene) and the
calibration scenes come from the disjoint ``calib`` split.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn

from hess.config import CalibSection, DataSection, ModelSection, RunConfig
from hess.registry import Registry
from hess.runtime import resolve_device, resolve_dtype, seed_everything

if TYPE_CHECKING:
    from hess.calibrate import CalibConfig
    from hess.rq.measure import Layout
    from hess.scoring import HeadScores

DEFAULT_MODEL = "hess-tiny"  # the embedded default of every command (hess.models.EMBEDDED_CHECKPOINTS)
FULL_SIZE = {"vggt", "vggt-1b", "pi3"}  # never built with random weights: they need a checkpoint
SYNTHETIC_SPLITS = {"eval": "test", "test": "test", "val": "val", "calib": "calib", "train": "train"}


class ModelUnavailableError(FileNotFoundError):
    """No trained weights for the requested model (e.g. π³ without a checkpoint)."""


def model_family(name: str) -> str:
    """``pi3*`` → ``pi3``; everything else (vggt, hess-tiny, vggt-parity-a) → ``vggt``."""
    return "pi3" if name.lower().startswith("pi3") else "vggt"


def _embedded_fallback(name: str) -> Optional[dict]:
    """Architecture of an embedded model whose checkpoint is not shipped yet (random-init stand-in)."""
    if name == "hess-tiny":
        from hess.train import TINY_MODEL_CONFIG

        return json.loads(json.dumps(TINY_MODEL_CONFIG))
    return None


def load_run_model(section: ModelSection, *, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``cfg.model`` and how its weights were obtained.

    Order: ``model.checkpoint`` (file, directory or HF id) → embedded checkpoint ``model.name`` →
    small presets (``vggt-parity-a``, ``pi3-parity-a``, an embedded model not shipped yet) with seeded
    random weights, flagged ``weights="random-init"``.  Full-size models never get random weights.

    Returns:
        (model in eval mode on its device, {"weights", "source", "family"}).
    Raises:
        ModelUnavailableError: a full-size model without a checkpoint, or a checkpoint that cannot be found.
    """
    from hess.models import EMBEDDED_CHECKPOINTS, CheckpointUnavailableError, build_model, load_model

    device, dtype = resolve_device(section.device), resolve_dtype(section.dtype)
    family = model_family(section.name)
    if section.checkpoint:
        try:
            model = load_model(section.checkpoint, family=family, dtype=dtype, device=device, config=section.config)
        except (CheckpointUnavailableError, FileNotFoundError) as err:
            raise ModelUnavailableError(f"model.checkpoint={section.checkpoint!r} is not available: {err}") from err
        return model.eval(), {"weights": "checkpoint", "source": section.checkpoint, "family": family}
    if section.name in EMBEDDED_CHECKPOINTS:
        model = load_model(section.name, family=family, dtype=dtype, device=device)
        return model.eval(), {"weights": "embedded", "source": section.name, "family": family}
    if section.name in FULL_SIZE:
        hint = "yyfz233/Pi3" if family == "pi3" else "facebook/VGGT-1B"
        raise ModelUnavailableError(
            f"model.name={section.name!r} has no trained weights here: set model.checkpoint (e.g. {hint}, a local "
            "safetensors file or directory); random weights of a full-size model would give meaningless numbers")
    arch = _embedded_fallback(section.name) or section.name
    if arch is not section.name:
        warnings.warn(f"embedded checkpoint {section.name!r} is not registered yet; using its architecture with "
                      "RANDOM weights (numbers are pipeline checks, not results)", stacklevel=2)
    seed_everything(seed)
    try:
        model = build_model(arch, family=family, device=device, dtype=dtype)
    except KeyError as err:
        raise ModelUnavailableError(f"unknown model.name {section.name!r}: {err}") from None
    model.model_id = f"{section.name}(random-init, seed {seed})"
    return model.eval(), {"weights": "random-init", "source": section.name, "family": family}


# ------------------------------------------------------------------------------------------- scenes
def _synthetic(split: str, num_scenes: int, num_frames: int, height: int, width: int, seed: int,
               root: Optional[str], **_: Any) -> list:
    from hess.data import build_scenes
    from hess.train import SCENE_OPTIONS

    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; known: {', '.join(SYNTHETIC_SPLITS)}")
    options = {**SCENE_OPTIONS, "num_frames": num_frames, "height": height, "width": width}
    return build_scenes("synthetic", split=SYNTHETIC_SPLITS[split], num_scenes=num_scenes, seed=seed, **options)


def _co3d(split: str, num_scenes: int, num_frames: int, height: int, width: int, seed: int,
          root: Optional[str], categories: tuple = (), **_: Any) -> list:
    """CO3Dv2 (VGGT protocol): ``num_frames`` per sequence drawn on VGGT's RNG path with ``seed``, frames
    ``width`` wide (height by aspect ratio, centre-cropped to at most ``height``), ``num_scenes`` sequences
    spread round-robin over the categories, only those loaded.  split eval/test: the set lists' test
    subset; calib/train: their train subset (calib checks it is disjoint from test)."""
    from hess.data import build_scenes

    co3d_split = {"eval": "test", "dev": "test"}.get(split, split)
    return build_scenes("co3d", root=root, split=co3d_split, categories=list(categories) or None,
                        num_frames=num_frames, seed=seed, image_width=width, max_height=height,
                        max_scenes=num_scenes, spread=True)


def _dtu(split: str, num_scenes: int, num_frames: int, height: int, width: int, seed: int,
         root: Optional[str], scans: tuple = (), **_: Any) -> list:
    """DTU (π³ protocol, stride-5 views): the first ``num_scenes`` of ``scans`` (default the 22 test
    scans), ``num_frames`` of their views (seeded subset; 10 = all), ``width`` wide, height ≤ ``height``."""
    from hess.data import build_scenes
    from hess.data.dtu import DTU_TEST_SCANS

    if split not in ("eval", "test"):
        raise ValueError(f"DTU has only its test scans (split eval/test), not {split!r}: the paper calibrates on "
                         "CO3Dv2 (calib.dataset=co3d calib.root=<CO3Dv2 root>) or pass calib.artifact=<score artifact>")
    chosen = list(scans or DTU_TEST_SCANS)[:num_scenes]
    return build_scenes("dtu", root=root, scans=chosen, num_frames=num_frames, seed=seed, image_width=width,
                        max_height=height)


SCENE_SOURCES: Registry[Callable[..., list]] = Registry("dataset")
SCENE_SOURCES.register("synthetic")(_synthetic)
SCENE_SOURCES.register("co3d")(_co3d)
SCENE_SOURCES.register("dtu")(_dtu)


def _check_root(dataset: str, root: Optional[str], key: str) -> None:
    import os

    env = {"co3d": "HESS_CO3D_ROOT", "dtu": "HESS_DTU_ROOT"}.get(dataset)
    if env and root is None and not os.environ.get(env):
        raise FileNotFoundError(f"{key}={dataset} needs a dataset folder: set {key.rsplit('.', 1)[0]}.root=<folder> "
                                f"(or ${env})")


def eval_scenes(data: DataSection) -> list:
    """Evaluation scenes of ``cfg.data``: exactly ``num_scenes`` × ``num_frames`` at the configured size."""
    _check_root(data.dataset, data.root, "data.dataset")
    return SCENE_SOURCES.get(data.dataset)(data.split, data.num_scenes, data.num_frames, data.height, data.width,
                                           data.seed, data.root, scans=data.scans, categories=data.categories)


def calib_source(data: DataSection, calib: CalibSection) -> tuple[str, Optional[str]]:
    """(dataset, root) of the calibration scenes: ``calib.dataset`` / ``calib.root``, else ``data.*``."""
    dataset = calib.dataset or data.dataset
    root = calib.root if calib.root is not None else (data.root if dataset == data.dataset else None)
    return dataset, root


def calib_scenes(data: DataSection, calib: CalibSection) -> list:
    """Calibration scenes: ``calib.split`` of ``calib.dataset`` (default: data.dataset), disjoint from the
    evaluation scenes; frames at the evaluation width / height limit (``data.width``, ``data.height``)."""
    dataset, root = calib_source(data, calib)
    if dataset == "dtu":
        raise ValueError("DTU has no calibration split (the paper calibrates on CO3Dv2 dev): set calib.dataset=co3d "
                         "calib.root=<CO3Dv2 root>, or pass calib.artifact=<score artifact> computed on CO3Dv2")
    _check_root(dataset, root, "calib.dataset")
    categories = data.categories if dataset == data.dataset else ()
    height, width = calib_size(data, calib)
    return SCENE_SOURCES.get(dataset)(calib.split, calib.num_scenes, calib.num_frames, height, width,
                                      calib.seed, root, categories=categories)


def calib_size(data: DataSection, calib: CalibSection) -> tuple[int, int]:
    """(height, width) of the calibration frames: calib.height / calib.width, else data.height / data.width."""
    return (calib.height or data.height, calib.width or data.width)


#: CalibSection field -> CalibConfig field (every CalibConfig option but device / progress is in the config)
CALIB_OPTIONS = ("seed", "inlier_eps", "use_icp", "icp_max_distance", "icp_iterations", "icp_max_points",
                 "points_source", "max_frames", "max_points", "autocast", "checkpointing", "include_bias")


def calib_config(calib: CalibSection, progress: bool = True, device: Optional[str] = None) -> "CalibConfig":
    """``hess.calibrate.CalibConfig`` of ``cfg.calib`` (every option of ``CALIB_OPTIONS``).

    ``device``: the model's device type; ``calib.autocast`` applies on CUDA only (None: as configured).
    """
    from hess.calibrate import CalibConfig

    options = {name: getattr(calib, name) for name in CALIB_OPTIONS}
    if device is not None and device != "cuda":
        options["autocast"] = None
    return CalibConfig(**options, progress=progress)


# ------------------------------------------------------------------------------------------ the cache
def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


class Resources:
    """Models, scenes, score artifacts and score tables, loaded once per process.

    Args:
        cache_dir: folder of calibration artifacts (``head_scores-<hash>.safetensors``); None: no disk cache.
        progress: tqdm bars in calibration and scorers.
    """

    def __init__(self, cache_dir: Optional[str | Path] = None, progress: bool = True) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self._memo: dict[str, Any] = {}
        self.calibrations_computed = 0  # calibrations actually run (not read from cache)
        self.notes: list[str] = []  # warnings to record with the run (e.g. an artifact of other weights)

    def _get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def model(self, section: ModelSection) -> tuple[nn.Module, dict[str, Any]]:
        """``load_run_model(section)``, once per section."""
        return self._get(_key("model", section), lambda: load_run_model(section))

    def device_type(self, section: ModelSection) -> str:
        """"cuda" / "cpu" / ...: where the model of ``section`` lives."""
        return next(self.model(section)[0].parameters()).device.type

    def fingerprint(self, section: ModelSection) -> str:
        """Hash of the model's weights (part of every calibration cache key)."""
        from hess.calibrate import model_fingerprint

        return self._get(_key("fingerprint", section), lambda: model_fingerprint(self.model(section)[0]))

    def eval_scenes(self, data: DataSection) -> list:
        """Evaluation scenes of ``data``, once per section."""
        return self._get(_key("eval", data), lambda: eval_scenes(data))

    def layout(self, section: ModelSection, data: DataSection) -> "Layout":
        """Global-attention layout (``hess.rq.measure.Layout``) of the first evaluation scene."""
        from hess.rq.measure import sequence_layout

        def probe():
            scenes = self.eval_scenes(data)
            if not scenes:
                raise ValueError(f"no evaluation scenes for {data}")
            return sequence_layout(self.model(section)[0], scenes[0])

        return self._get(_key("layout", section, data), probe)

    def scene_layout(self, section: ModelSection, scene: Any) -> "Layout":
        """Global-attention layout of ``scene`` (one probe forward per model × frame count × image size)."""
        from hess.rq.measure import sequence_layout

        return self._get(_key("scene-layout", section, scene.num_frames, scene.image_hw),
                         lambda: sequence_layout(self.model(section)[0], scene))

    def calib_scenes(self, data: DataSection, calib: CalibSection) -> list:
        """Calibration scenes (``calib.split`` of ``calib.dataset``), once per (data, calib) setting."""
        return self._get(_key("calib", calib_source(data, calib), calib_size(data, calib), data.categories, calib),
                         lambda: calib_scenes(data, calib))

    def head_scores(self, cfg: RunConfig) -> "HeadScores":
        """The HeSS calibration artifact of (model, calibration scenes, calibration settings).

        ``calib.artifact`` is read as given; otherwise the artifact is cached on disk by the hash of
        everything that determines the traces, so λ / keep-ratio / projection sweeps never recalibrate.
        """
        from hess.calibrate import calibrate
        from hess.scoring import HeadScores, cached_calibration

        if cfg.calib.artifact:
            scores = self._get(_key("artifact", cfg.calib.artifact), lambda: HeadScores.load(cfg.calib.artifact))
            from hess.validate import check_artifact_model

            note = check_artifact_model(cfg.calib.artifact, scores.model_hash, self.fingerprint(cfg.model),
                                        cfg.calib.allow_model_mismatch)
            if note:
                warnings.warn(note, stacklevel=2)
                self.notes.append(note)
            return scores
        scenes = self.calib_scenes(cfg.data, cfg.calib)
        config = calib_config(cfg.calib, self.progress, self.device_type(cfg.model))
        key = {"calib": config.key(), "scenes": [s.scene_id for s in scenes], "model": self.fingerprint(cfg.model),
               "frames": [list(map(str, s.frame_ids)) for s in scenes], "hw": [list(s.image_hw) for s in scenes]}

        def compute():
            self.calibrations_computed += 1
            return calibrate(self.model(cfg.model)[0], scenes, config)

        def load():
            if self.cache_dir is None:
                return compute()
            return cached_calibration(self.cache_dir / "head_scores", key, compute)

        return self._get(_key("head_scores", key), load)

    def scores(self, cfg: RunConfig) -> Tensor:
        """[L, H] float64 head scores of ``cfg.score.scorer`` (SCORERS), cached per what they depend on."""
        from hess.calibrate import score_heads

        name = cfg.score.scorer
        model, _ = self.model(cfg.model)
        needs_traces = name in ("hess", "inverted-hess")
        per_budget = name in ("oracle", "sparsity-taylor", "sparsity-taylor-sq")  # scores depend on the budget
        needs_scenes = name in ("head-importance", "attention-entropy") or per_budget
        key = _key("scores", name, cfg.model, cfg.score, cfg.calib.proj,
                   (cfg.budget.keep_ratio, cfg.budget.min_blocks, cfg.sparse.q_block, cfg.sparse.k_block)
                   if per_budget else None,
                   cfg.calib if needs_traces or needs_scenes else None)

        def make() -> Tensor:
            traces = self.head_scores(cfg) if needs_traces else None
            scenes = self.calib_scenes(cfg.data, cfg.calib) if needs_scenes else [None]
            return score_heads(name, model, scenes, calib_config(cfg.calib, self.progress, self.device_type(cfg.model)),
                               head_scores=traces,
                               lam=cfg.score.lam, proj=cfg.calib.proj, normalize=cfg.score.normalize,
                               seed=cfg.score.seed, keep_ratio=cfg.budget.keep_ratio,
                               min_blocks=cfg.budget.min_blocks, q_block=cfg.sparse.q_block,
                               k_block=cfg.sparse.k_block,
                               cache_dir=self.cache_dir / "sparsity_taylor" if self.cache_dir is not None else None,
                               ).detach().to("cpu", torch.float64)

        return self._get(key, make)
