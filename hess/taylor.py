"""``sparsity-taylor``: a first-order estimate of how much sparsifying one head changes each calibration error.

HeSS scores a head by how strongly the errors react to its W_Q rows.  This scorer scores the
sparsification itself (MoA, arXiv 2406.14909; Michel et al. 2019 for whole-head removal): for global
layer l, head h and error e ∈ {cam, pc} of one calibration scene,

    Δe(l, h) ≈ ⟨∂e/∂O_h, O_h^sparse − O_h^dense⟩

where ``O_h^sparse`` is ``head_sparse_attention`` of the *same* (dense-model) q, k, v at the uniform
base budget ``c_base = hess.budget.base_blocks(keep_ratio, n_k, min_blocks)`` with the same selection
(mean-pooled block scores, top-c), and the errors are HeSS's (same alignment ``sg(H)``, inliers and NN
targets held fixed, method.md §3.2).  One dense forward per scene computes ``ΔO = O^sparse − O^dense``
(no grad) in every global layer; each core returns ``O^dense + ε_l[h]·ΔO_h`` with a zero probe
``ε_l: [H]`` that requires grad, so one backward per error gives ``∂e/∂ε_l[h] = ⟨∂e/∂O_h, ΔO_h⟩`` for
every head of every layer at once::

    art = calibrate_taylor(model, scenes, CalibConfig(), keep_ratio=0.27, q_block=12, k_block=6)
    art.hess(lam=0.5, proj=TAYLOR_SLOTS["abs"])      # [L, H]: E_s |Δe|, per-layer normalised, λ-mixed
    signed_estimate(art, "cam")                      # [S, L, H] signed first-order Δe_cam

The artifact is a :class:`hess.scoring.HeadScores` (format ``hess-head-scores/1``): its three
"projection" slots hold, per error and scene, ``|Δe|`` (q), ``Δe²`` (k) and ``max(Δe, 0)`` (v), so the
HeSS read-out (per-layer normalisation, λ mix) applies unchanged and the signed value is
``2·max(Δe, 0) − |Δe|``.  ``meta["kind"] == "sparsity-taylor"`` and the budget are recorded, and the
budget is part of the config (hence of the cache key).

:func:`measured_change` is the ground truth of the linearisation check: the measured change of the
same fixed-alignment errors when one head alone is sparsified (``L·H`` extra forwards per scene).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from hess.attention import head_sparse_attention
from hess.budget import base_blocks
from hess.calibrate import (CalibConfig, _checkpointing, _device, calibration_errors, error_targets,
                            model_fingerprint, predict_geometry, prepare_scene)
from hess.data.scene import Scene
from hess.scorers import global_layers, grad_only_for, wrapped_cores
from hess.scoring import ERRORS, HeadScores, cached_calibration

KIND = "sparsity-taylor"
#: read-out variant -> the HeadScores slot ("projection") that holds it
TAYLOR_SLOTS = {"abs": "q", "squared": "k", "positive": "v"}


def _num_key_blocks(q: Tensor, tokens_per_frame: int, num_special: int, k_block: int) -> int:
    return math.ceil((q.shape[2] // tokens_per_frame) * (tokens_per_frame - num_special) / k_block)


class TaylorProbeCore(nn.Module):
    """``inner(q, k, v) + ε[h]·ΔO_h``: dense output plus a zero-valued probe along the sparsification change.

    ``ΔO = head_sparse_attention(q, k, v; c_base per head) − inner(q, k, v)`` is computed once (no
    grad) and kept, so a checkpointed block's recompute reuses it; :meth:`reset` clears it between
    scenes.  ``probe`` ([H], zeros, requires grad) is a plain tensor, never a Parameter.
    Args (forward): q, k, v: [B, H, N, D], ``tokens_per_frame``, ``num_special`` → [B, H, N, D].
    """

    def __init__(self, inner: nn.Module, keep_ratio: float, min_blocks: int = 1, q_block: int = 128,
                 k_block: int = 64, backend: str = "auto") -> None:
        super().__init__()
        self.inner, self.keep_ratio, self.min_blocks = inner, keep_ratio, min_blocks
        self.q_block, self.k_block, self.backend = q_block, k_block, backend
        self.reset()

    def reset(self) -> None:
        self.delta: Optional[Tensor] = None
        self.probe: Optional[Tensor] = None
        self.blocks: Optional[int] = None
        self.num_key_blocks: Optional[int] = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        out = self.inner(q, k, v, **core_kwargs)
        if self.delta is None:
            P, n_s = int(core_kwargs["tokens_per_frame"]), int(core_kwargs["num_special"])
            n_k = _num_key_blocks(q, P, n_s, self.k_block)
            c = base_blocks(self.keep_ratio, n_k, self.min_blocks)
            with torch.no_grad():
                budget = torch.full((q.shape[1],), c, dtype=torch.int64, device=q.device)
                sparse = head_sparse_attention(q.detach(), k.detach(), v.detach(), tokens_per_frame=P,
                                               num_special=n_s, blocks_per_head=budget, q_block=self.q_block,
                                               k_block=self.k_block, backend=self.backend)
                self.delta = (sparse - out.detach()).to(out.dtype)
            self.probe = torch.zeros(q.shape[1], dtype=out.dtype, device=out.device, requires_grad=True)
            self.blocks, self.num_key_blocks = c, n_k
        return out + self.probe[None, :, None, None] * self.delta


def taylor_scene(model: nn.Module, scene: Scene, config: CalibConfig, keep_ratio: float, *, min_blocks: int = 1,
                 q_block: int = 128, k_block: int = 64, backend: str = "auto") -> tuple[Tensor, dict]:
    """Signed first-order ``Δe`` of one prepared scene: ([2 (cam, pc), L, H] float64, info).

    One dense forward (with the sparse outputs of every global layer computed alongside) and one
    backward per error.  The caller freezes the parameters (``grad_only_for(model)``).
    """
    layers = global_layers(model)
    H = layers[0].num_heads
    out = torch.zeros(len(ERRORS), len(layers), H, dtype=torch.float64)
    make = lambda _, core: TaylorProbeCore(core, keep_ratio, min_blocks, q_block, k_block, backend)  # noqa: E731
    with wrapped_cores(layers, make) as cores:
        pred = predict_geometry(model, scene, config)
        targets = error_targets(pred, scene, config)
        errors = calibration_errors(pred, targets)
        probes = [c.probe for c in cores]
        for j, name in enumerate(ERRORS):
            if errors[name].requires_grad:
                grads = torch.autograd.grad(errors[name], probes, retain_graph=j + 1 < len(ERRORS), allow_unused=True)
                out[j] = torch.stack([(g if g is not None else torch.zeros(H)).double().cpu() for g in grads])
        info = {"e_cam": errors["cam"].item(), "e_pc": errors["pc"].item(), "num_inliers": int(targets.inlier.numel()),
                "blocks": cores[0].blocks, "num_key_blocks": cores[0].num_key_blocks}
    return out, info


def budget_config(keep_ratio: float, min_blocks: int = 1, q_block: int = 128, k_block: int = 64) -> dict:
    """The sparsity a Taylor artifact was computed for (part of its config and cache key)."""
    if not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return {"keep_ratio": float(keep_ratio), "min_blocks": int(min_blocks), "q_block": int(q_block),
            "k_block": int(k_block)}


def encode(signed: Tensor) -> Tensor:
    """Signed ``[2, S, L, H]`` → HeadScores traces ``[2, 3 (abs, squared, positive), S, L, H]``."""
    return torch.stack([signed.abs(), signed.pow(2), signed.clamp_min(0.0)], dim=1)


def signed_estimate(scores: HeadScores, error: str) -> Tensor:
    """The signed first-order ``Δe`` per scene of a Taylor artifact: [S, L, H] float64."""
    if scores.meta.get("kind") != KIND:
        raise ValueError(f"not a {KIND} artifact (meta kind {scores.meta.get('kind')!r})")
    if error not in ERRORS:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
    e = ERRORS.index(error)
    return 2.0 * scores.traces[e, 2] - scores.traces[e, 0]


def calibrate_taylor(model: nn.Module, scenes: Sequence[Scene], config: Optional[CalibConfig] = None, *,
                     keep_ratio: float, min_blocks: int = 1, q_block: int = 128, k_block: int = 64,
                     backend: str = "auto") -> HeadScores:
    """``sparsity-taylor`` over calibration scenes → a Taylor :class:`HeadScores` artifact (module docstring).

    Args:
        model: a hess model (``global_attention_layers()``, ``geometry()``), dense; parameters frozen and
            eval mode during the run, restored afterwards.
        scenes: calibration scenes with GT (as for :func:`hess.calibrate.calibrate`).
        config: the HeSS calibration settings (errors, alignment, subsampling, autocast, checkpointing).
        keep_ratio, min_blocks, q_block, k_block: the sparsity whose output change is estimated; use the
            block sizes the sparsified model will run with.
    Returns:
        traces [2, 3 (abs, squared, positive), S, L, H]; ``meta["kind"] = "sparsity-taylor"``.
    """
    from tqdm.auto import tqdm

    config = config or CalibConfig()
    budget = budget_config(keep_ratio, min_blocks, q_block, k_block)
    if len(scenes) == 0:
        raise ValueError("sparsity-taylor needs at least one calibration scene")
    ids = [s.scene_id for s in scenes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"calibration scene ids must be unique, got {ids}")
    device = _device(model, config)
    model.to(device)
    per_scene, infos = [], []
    with grad_only_for(model), _checkpointing(model, config.checkpointing):
        for scene in tqdm(scenes, desc="sparsity-taylor", disable=not config.progress):
            signed, info = taylor_scene(model, prepare_scene(scene, config, device), config, keep_ratio,
                                        min_blocks=min_blocks, q_block=q_block, k_block=k_block, backend=backend)
            per_scene.append(signed)
            infos.append(info)
    signed = torch.stack(per_scene, dim=1)  # [2, S, L, H]
    return HeadScores(
        traces=encode(signed), scene_ids=ids, config={**asdict(config), "taylor": budget},
        model_id=str(getattr(model, "model_id", type(model).__name__)), model_hash=model_fingerprint(model),
        meta={"kind": KIND, "slots": {v: s for v, s in TAYLOR_SLOTS.items()}, "budget": budget,
              "scenes": dict(zip(ids, infos))},
    )


def taylor_key(model: nn.Module, scenes: Sequence[Any], config: CalibConfig, budget: dict) -> dict:
    """Everything that determines a Taylor artifact: calibration config, scenes, weights, and the budget."""
    return {"kind": KIND, "calib": config.key(), "scenes": [s.scene_id for s in scenes],
            "model": model_fingerprint(model), "budget": budget}


def cached_taylor(cache_dir: Optional[str | Path], model: nn.Module, scenes: Sequence[Scene], config: CalibConfig,
                  **budget: Any) -> HeadScores:
    """:func:`calibrate_taylor`, cached as ``<cache_dir>/head_scores-<hash>.safetensors`` (budget in the key).

    ``budget``: keep_ratio, min_blocks, q_block, k_block (and optionally backend, not part of the key).
    """
    backend = budget.pop("backend", "auto")
    key_budget = budget_config(**budget)

    def compute() -> HeadScores:
        return calibrate_taylor(model, scenes, config, backend=backend, **key_budget)

    if cache_dir is None:
        return compute()
    return cached_calibration(cache_dir, taylor_key(model, scenes, config, key_budget), compute)


def taylor_readout(scores: HeadScores, variant: str = "abs", lam: float = 0.5, normalize: bool = True) -> Tensor:
    """``λ·norm(E|Δe_cam|) + (1−λ)·norm(E|Δe_pc|)`` (or ``Δe²`` for ``variant="squared"``): [L, H] float64."""
    if scores.meta.get("kind") != KIND:
        raise ValueError(f"not a {KIND} artifact (meta kind {scores.meta.get('kind')!r}): calibrate it with "
                         "hess.taylor.calibrate_taylor")
    if variant not in ("abs", "squared"):
        raise ValueError(f"variant must be 'abs' or 'squared', got {variant!r}")
    return scores.hess(lam=lam, proj=TAYLOR_SLOTS[variant], normalize=normalize)


# ------------------------------------------------------------------------------ linearisation check
class OneHeadDeltaCore(nn.Module):
    """Dense attention except head ``head``: ``O_h^dense + scale·(O_h^sparse − O_h^dense)``.

    ``scale = 1`` is the head sparsified alone (as ``hess.scorers.OneHeadSparseCore``); smaller scales
    move along the same direction (the limit in which the first-order estimate is exact).
    """

    def __init__(self, inner: nn.Module, head: int, keep_ratio: float, min_blocks: int = 1, q_block: int = 128,
                 k_block: int = 64, scale: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.inner, self.head, self.keep_ratio, self.min_blocks = inner, head, keep_ratio, min_blocks
        self.q_block, self.k_block, self.scale, self.backend = q_block, k_block, scale, backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, **core_kwargs) -> Tensor:
        P, n_s = int(core_kwargs["tokens_per_frame"]), int(core_kwargs["num_special"])
        c = base_blocks(self.keep_ratio, _num_key_blocks(q, P, n_s, self.k_block), self.min_blocks)
        out = self.inner(q, k, v, **core_kwargs).clone()
        h = slice(self.head, self.head + 1)
        sparse = head_sparse_attention(q[:, h], k[:, h], v[:, h], tokens_per_frame=P, num_special=n_s,
                                       blocks_per_head=torch.full((1,), c, dtype=torch.int64, device=q.device),
                                       q_block=self.q_block, k_block=self.k_block, backend=self.backend)
        out[:, h] = out[:, h] + self.scale * (sparse - out[:, h])
        return out


def measured_change(model: nn.Module, scenes: Sequence[Scene], config: CalibConfig, keep_ratio: float, *,
                    min_blocks: int = 1, q_block: int = 128, k_block: int = 64, scale: float = 1.0,
                    backend: str = "auto", progress: bool = False) -> Tensor:
    """Measured change of the fixed-alignment errors with one head alone sparsified: [2, S, L, H] float64.

    Per scene the alignment ``sg(H)``, inliers and NN targets come from the *dense* prediction and stay
    fixed (the errors the Taylor estimate linearises); ``Δe = e(head (l, h) at keep_ratio) − e(dense)``.
    ``scale`` < 1 moves head (l, h)'s output only that fraction of the way to its sparse output.
    Costs ``L·H + 1`` forwards per scene, no gradients.
    """
    from tqdm.auto import tqdm

    layers = global_layers(model)
    L, H = len(layers), layers[0].num_heads
    device = _device(model, config)
    out = torch.zeros(len(ERRORS), len(scenes), L, H, dtype=torch.float64)
    with grad_only_for(model), torch.no_grad():
        for s, scene in enumerate(scenes):
            scene = prepare_scene(scene, config, device)
            pred = predict_geometry(model, scene, config)
            targets = error_targets(pred, scene, config)
            base = calibration_errors(pred, targets)
            for l, h in tqdm([(l, h) for l in range(L) for h in range(H)], desc="one head sparse", disable=not progress):
                make = lambda _, core: OneHeadDeltaCore(core, h, keep_ratio, min_blocks, q_block, k_block,  # noqa: E731
                                                        scale, backend)
                with wrapped_cores([layers[l]], make):
                    errs = calibration_errors(predict_geometry(model, scene, config), targets)
                for j, name in enumerate(ERRORS):
                    out[j, s, l, h] = float(errs[name]) - float(base[name])
    return out
