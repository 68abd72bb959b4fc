"""Head score tables: raw Fisher traces → HeSS (method.md §3.4, §3.7), the SCORERS registry, artifacts.

``HeadScores`` holds the raw per-scene traces ``T[error ∈ {cam, pc}, proj ∈ {q, k, v}, scene, L, H]``;
normalisation per layer, the λ mix and the choice of projection are computed when scores are read, so a
λ / projection / normalisation sweep never recalibrates::

    scores = HeadScores.load("runs/calib/head_scores.safetensors")
    scores.hess(lam=0.5)                 # [L, H], each layer sums to 1
    scores.hess(lam=1.0, proj="k")       # the W_K ablation, same artifact
    SCORERS.get("inverted-hess")(ScoreContext(head_scores=scores))

Every scorer has one signature, ``scorer(ctx: ScoreContext) -> Tensor [L, H]`` (float, non-negative, fit
for ``hess.budget.allocate``).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hess import __version__
from hess import scorers as model_scorers
from hess.registry import Registry

ERRORS = ("cam", "pc")
PROJS = ("q", "k", "v")
ARTIFACT_FORMAT = "hess-head-scores/1"


def config_hash(config: dict) -> str:
    """Stable 16-hex-digit hash of a JSON-able dict (keys sorted; non-JSON values by ``str``)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a score artifact: ``x.safetensors`` → ``x.json``."""
    return Path(path).with_suffix(".json")


@dataclass
class HeadScores:
    """Raw per-head Fisher traces of one calibration run, plus what produced them.

    Attributes:
        traces: [2, 3, S, L, H] float64, ``||∂e(s)/∂W_proj^{l,h}||_F²`` for error (cam, pc), proj (q, k, v),
            calibration scene s, global layer l, head h.
        scene_ids: S scene ids, in trace order.
        config: the calibration config (JSON-able).
        model_id, model_hash: which weights were calibrated.
        meta: anything else recorded (per-scene inlier counts, flags, cache key).
        version: hess version that wrote the traces.
    """

    traces: Tensor
    scene_ids: list[str]
    config: dict = field(default_factory=dict)
    model_id: str = ""
    model_hash: str = ""
    meta: dict = field(default_factory=dict)
    version: str = __version__

    def __post_init__(self) -> None:
        t = self.traces
        if not isinstance(t, Tensor) or t.ndim != 5 or tuple(t.shape[:2]) != (len(ERRORS), len(PROJS)):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"traces must be [2 (cam, pc), 3 (q, k, v), S, L, H], got {shape}")
        if t.shape[2] != len(self.scene_ids):
            raise ValueError(f"traces hold {t.shape[2]} scenes but {len(self.scene_ids)} scene ids were given")
        self.traces = t.detach().to("cpu", torch.float64)
        if not torch.isfinite(self.traces).all() or (self.traces < 0).any():
            raise ValueError("traces must be finite and non-negative (squared gradient norms)")
        self.scene_ids = [str(s) for s in self.scene_ids]

    @property
    def num_scenes(self) -> int:
        return self.traces.shape[2]

    @property
    def num_layers(self) -> int:
        return self.traces.shape[3]

    @property
    def num_heads(self) -> int:
        return self.traces.shape[4]

    def trace(self, error: str, proj: str = "q", scenes: Optional[Sequence[int]] = None) -> Tensor:
        """Mean trace over scenes, ``T_error(l, h)``: [L, H] float64.

        Args:
            error: "cam" or "pc".  proj: "q", "k" or "v".
            scenes: scene indices to average (repeats allowed, for bootstraps); all scenes when None.
        """
        if error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
        if proj not in PROJS:
            raise ValueError(f"proj must be one of {PROJS}, got {proj!r}")
        t = self.traces[ERRORS.index(error), PROJS.index(proj)]  # [S, L, H]
        if scenes is not None:
            t = t[torch.as_tensor(list(scenes), dtype=torch.long)]
        return t.mean(dim=0)

    def normalized(self, error: str, proj: str = "q", scenes: Optional[Sequence[int]] = None) -> Tensor:
        """``HeSS_error(l, h) = T(l, h) / Σ_h' T(l, h')``: [L, H], rows sum to 1 (0 for an all-zero layer)."""
        t = self.trace(error, proj, scenes)
        total = t.sum(dim=1, keepdim=True)
        return torch.where(total > 0, t / total.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))

    def hess(self, lam: float = 0.5, proj: str = "q", normalize: bool = True,
             scenes: Optional[Sequence[int]] = None) -> Tensor:
        """HeSS scores ``λ·cam + (1-λ)·pc`` (method.md §3.4): [L, H] float64.

        Args:
            lam: λ in [0, 1]; 1 = camera error only, 0 = point-cloud error only.
            proj: which projection's rows the traces were taken w.r.t. ("q" is the paper's default).
            normalize: normalise each error's traces per layer before mixing (the default); False mixes
                raw traces (the "Linear" ablation).
            scenes: subset of scene indices (bootstrap); all when None.
        """
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        get = self.normalized if normalize else self.trace
        return lam * get("cam", proj, scenes) + (1.0 - lam) * get("pc", proj, scenes)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: ``traces``) and its JSON sidecar; returns ``path``."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"score artifacts are .safetensors files, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        chash = config_hash(self.config)
        sidecar = {
            "format": ARTIFACT_FORMAT, "hess_version": self.version, "model_id": self.model_id,
            "model_hash": self.model_hash, "config": self.config, "config_hash": chash,
            "scene_ids": self.scene_ids, "meta": self.meta, "errors": list(ERRORS), "projs": list(PROJS),
            "shape": list(self.traces.shape),
        }
        save_file({"traces": self.traces.contiguous()}, str(path),
                  metadata={"format": ARTIFACT_FORMAT, "config_hash": chash})
        sidecar_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        """Read an artifact written by :meth:`save`; a missing file or a mismatched pair raises."""
        path, side = Path(path), sidecar_path(path)
        for p, what in ((path, "score artifact"), (side, "score sidecar (JSON)")):
            if not p.is_file():
                raise FileNotFoundError(f"{what} {p} not found")
        try:
            meta = json.loads(side.read_text())
        except ValueError as err:
            raise ValueError(f"score sidecar {side} is not valid JSON ({err}); recompute it with hess calibrate") from None
        if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{side} is not a {ARTIFACT_FORMAT} sidecar (format={found!r})")
        try:
            tensors = load_file(str(path))
        except Exception as err:  # SafetensorError names neither the file nor the fix
            raise ValueError(f"could not read score artifact {path} ({type(err).__name__}: {err}): truncated or "
                             "not a safetensors file; recompute it with hess calibrate") from None
        if set(tensors) != {"traces"}:
            raise KeyError(f"{path} must hold exactly the key 'traces', found {sorted(tensors)}")
        if config_hash(meta["config"]) != meta["config_hash"]:
            raise ValueError(f"{side}: config does not match its recorded config_hash")
        with safe_open(str(path), framework="pt") as f:
            file_hash = (f.metadata() or {}).get("config_hash")
        if file_hash != meta["config_hash"]:
            raise ValueError(f"{path} (config_hash {file_hash}) and {side} ({meta['config_hash']}) are not a pair")
        return cls(traces=tensors["traces"], scene_ids=meta["scene_ids"], config=meta["config"],
                   model_id=meta["model_id"], model_hash=meta["model_hash"], meta=meta["meta"],
                   version=meta["hess_version"])


def cached_calibration(cache_dir: str | Path, key: dict, compute: Callable[[], HeadScores]) -> HeadScores:
    """Load ``<cache_dir>/head_scores-<config_hash(key)>.safetensors`` or compute, save and return it.

    Args:
        cache_dir: folder of cached artifacts.
        key: everything that determines the traces (calibration config, scene ids, model hash).
        compute: called only on a cache miss.
    """
    path = Path(cache_dir) / f"head_scores-{config_hash(key)}.safetensors"
    if path.is_file():
        scores = HeadScores.load(path)
        if config_hash(scores.meta.get("cache_key", {})) != config_hash(key):
            raise ValueError(f"cached artifact {path} was written for a different key")
        return scores
    scores = compute()
    scores.meta["cache_key"] = json.loads(json.dumps(key, default=str))
    scores.save(path)
    return scores


# --------------------------------------------------------------------------- scorers
@dataclass
class ScoreContext:
    """What a scorer may read; each scorer checks that the fields it needs are set.

    Attributes:
        head_scores: calibrated traces (``hess``, ``inverted-hess``).
        shape: (L, H) when neither head_scores nor model gives it (``uniform``, ``random``).
        model, scenes: for the model-based scorers.
        error_fn: ``(model, scene) -> []`` calibration error (``head-importance``, ``oracle``).
        lam, proj, normalize: HeSS read-out options.
        seed: for ``random``.  keep_ratio, min_blocks, q_block, k_block: the sparsity the ``oracle`` probes
            and ``sparsity-taylor`` estimates.
        calib: the ``hess.calibrate.CalibConfig`` of the errors (``sparsity-taylor``; defaults when None).
        cache_dir: where ``sparsity-taylor`` caches its artifacts (None: not cached on disk).
    """

    head_scores: Optional[HeadScores] = None
    shape: Optional[tuple[int, int]] = None
    model: Optional[nn.Module] = None
    scenes: Sequence[Any] = ()
    error_fn: Optional[model_scorers.ErrorFn] = None
    lam: float = 0.5
    proj: str = "q"
    normalize: bool = True
    seed: int = 0
    keep_ratio: float = 0.25
    min_blocks: int = 1
    q_block: int = 128
    k_block: int = 64
    calib: Any = None
    cache_dir: Optional[str | Path] = None

    def need(self, scorer: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None or (n == "scenes" and len(self.scenes) == 0)]
        if missing:
            raise ValueError(f"scorer {scorer!r} needs ScoreContext fields {missing}")

    def layers_heads(self) -> tuple[int, int]:
        if self.head_scores is not None:
            return self.head_scores.num_layers, self.head_scores.num_heads
        if self.shape is not None:
            return int(self.shape[0]), int(self.shape[1])
        if self.model is not None:
            layers = self.model.global_attention_layers()
            return len(layers), layers[0].num_heads
        raise ValueError("ScoreContext needs head_scores, shape or model to know [L, H]")


SCORERS: Registry[Callable[[ScoreContext], Tensor]] = Registry("scorer")


@SCORERS.register("hess")
def hess_scores(ctx: ScoreContext) -> Tensor:
    """HeSS from the calibrated traces: ``ctx.head_scores.hess(ctx.lam, ctx.proj, ctx.normalize)``."""
    ctx.need("hess", "head_scores")
    if ctx.head_scores.meta.get("kind", "hess") != "hess":
        raise ValueError(f"scorer 'hess' got a {ctx.head_scores.meta['kind']!r} artifact, not HeSS traces")
    return ctx.head_scores.hess(lam=ctx.lam, proj=ctx.proj, normalize=ctx.normalize)


@SCORERS.register("uniform")
def uniform_scores(ctx: ScoreContext) -> Tensor:
    """Equal scores: the allocator then reproduces SparseVGGT's uniform budget.  [L, H] ones."""
    return torch.ones(ctx.layers_heads(), dtype=torch.float64)


@SCORERS.register("random")
def random_scores(ctx: ScoreContext) -> Tensor:
    """Uniform(0, 1) scores from a generator seeded with ``ctx.seed``.  [L, H] float64."""
    gen = torch.Generator().manual_seed(int(ctx.seed))
    return torch.rand(ctx.layers_heads(), generator=gen, dtype=torch.float64)


def invert_ranking(scores: Tensor) -> Tensor:
    """Reverse the ranking within each layer: the head of rank r (ascending) gets the value of rank H-1-r.

    scores: [L, H] → [L, H], the same multiset of values per layer.  Ties keep head order (stable sort).
    """
    order = torch.sort(scores, dim=1, stable=True).indices  # ascending
    values = torch.gather(scores, 1, order)
    out = torch.empty_like(scores)
    out.scatter_(1, order, values.flip(1))
    return out


@SCORERS.register("inverted-hess")
def inverted_hess_scores(ctx: ScoreContext) -> Tensor:
    """HeSS with the ranking reversed within each layer (the paper's sanity check, method.md §5)."""
    return invert_ranking(hess_scores(ctx))


@SCORERS.register("head-importance")
def head_importance_scores(ctx: ScoreContext) -> Tensor:
    """Michel et al. (2019): ``mean |∂e/∂ξ_h|`` of a per-head output gate.  See ``scorers.head_importance``."""
    ctx.need("head-importance", "model", "scenes", "error_fn")
    return model_scorers.head_importance(ctx.model, ctx.scenes, ctx.error_fn)


@SCORERS.register("attention-entropy")
def attention_entropy_scores(ctx: ScoreContext) -> Tensor:
    """Mean attention entropy per head, no gradients.  See ``scorers.attention_entropy``."""
    ctx.need("attention-entropy", "model", "scenes")
    return model_scorers.attention_entropy(ctx.model, ctx.scenes)


@SCORERS.register("oracle")
def oracle_scores(ctx: ScoreContext) -> Tensor:
    """Measured error increase with one head sparsified at ``ctx.keep_ratio``, clamped at 0 for allocation.

    Use ``scorers.oracle_sensitivity`` directly for the signed values (rank correlations, RQ1).
    """
    ctx.need("oracle", "model", "scenes", "error_fn")
    delta = model_scorers.oracle_sensitivity(ctx.model, ctx.scenes, ctx.error_fn, ctx.keep_ratio,
                                             min_blocks=ctx.min_blocks, q_block=ctx.q_block, k_block=ctx.k_block)
    if (delta < 0).any():
        warnings.warn(f"oracle: {int((delta < 0).sum())} heads lower the error when sparsified; clamped to 0")
    return delta.clamp_min(0.0)


def _sparsity_taylor(ctx: ScoreContext, variant: str) -> Tensor:
    from hess.calibrate import CalibConfig
    from hess.taylor import cached_taylor, taylor_readout

    ctx.need("sparsity-taylor", "model", "scenes")
    config = ctx.calib if ctx.calib is not None else CalibConfig(progress=False)
    cache = Path(ctx.cache_dir) if ctx.cache_dir is not None else None
    art = cached_taylor(cache, ctx.model, ctx.scenes, config, keep_ratio=ctx.keep_ratio, min_blocks=ctx.min_blocks,
                        q_block=ctx.q_block, k_block=ctx.k_block)
    return taylor_readout(art, variant, lam=ctx.lam, normalize=ctx.normalize)


@SCORERS.register("sparsity-taylor")
def sparsity_taylor_scores(ctx: ScoreContext) -> Tensor:
    """``E_scenes |⟨∂e/∂O_h, O_h^sparse − O_h^dense⟩|`` per error at ``ctx.keep_ratio``, normalised per layer and
    λ-mixed as HeSS (``hess.taylor``; artifact cached in ``ctx.cache_dir`` with the budget in its key)."""
    return _sparsity_taylor(ctx, "abs")


@SCORERS.register("sparsity-taylor-sq")
def sparsity_taylor_sq_scores(ctx: ScoreContext) -> Tensor:
    """The squared variant of ``sparsity-taylor``: ``E_scenes ⟨∂e/∂O_h, ΔO_h⟩²``."""
    return _sparsity_taylor(ctx, "squared")
