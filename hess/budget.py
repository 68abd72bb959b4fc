"""Budget redistribution: per-head key-block counts from head scores (method.md §4).

A pure function on score tensors (style rule 6): it imports torch and the registry, never a model.

The uniform (SparseVGGT) baseline keeps ``c_base = max(min_blocks, floor(n_k * keep_ratio))`` patch key
blocks per query-block row in every head.  HeSS keeps each layer's total ``H * c_base`` and splits it in
proportion to the scores, with water-filling at the cap ``n_k`` and a floor ``min_blocks``::

    c*_h = clamp(alpha * w_h, min_blocks, n_k),   alpha such that sum_h c*_h = H * c_base

then integerises by largest remainder.  Example (method.md §4.3)::

    allocate(torch.tensor([[0.3, 0.2, 0.1] + [0.4 / 13] * 13]), keep_ratio=0.27, num_key_blocks=324)
    # -> [[324, 305, 152, 47, 47, ..., 47]]   (sums to 16 * 87 = 1392)
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from hess.registry import Registry

ALLOCATORS: Registry[Callable[..., Tensor]] = Registry("allocator")

CAPPINGS = {"iterative": "waterfill", "clip": "clip"}
SCOPES = ("layer", "global")
_FLOOR_EPS = 1e-9  # floor(n_k * keep_ratio) is taken with this slack so 100 * 0.29 floors to 29, not 28
_TIE_DECIMALS = 9  # remainders equal to 9 decimals are ties (resolved by score, then head index)


def base_blocks(keep_ratio: float, num_key_blocks: int, min_blocks: int = 1) -> int:
    """The uniform budget ``c_base = max(min_blocks, floor(n_k * keep_ratio))`` after validating inputs.

    Args:
        keep_ratio: fraction of patch key blocks kept, in (0, 1]; ``1 - sparsity``.
        num_key_blocks: n_k >= 1, the number of patch key blocks (the per-head cap).
        min_blocks: the per-head floor, 1 <= min_blocks <= n_k.
    Returns:
        c_base, an int in [min_blocks, n_k].
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or math.isnan(keep_ratio):
        raise TypeError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if int(num_key_blocks) != num_key_blocks or num_key_blocks < 1:
        raise ValueError(f"num_key_blocks must be a positive integer, got {num_key_blocks!r}")
    if int(min_blocks) != min_blocks or not 1 <= min_blocks <= num_key_blocks:
        raise ValueError(f"min_blocks must be an integer in [1, num_key_blocks={num_key_blocks}], got {min_blocks!r}")
    return max(int(min_blocks), math.floor(num_key_blocks * keep_ratio + _FLOOR_EPS))


def _check_scores(scores: Tensor) -> Tensor:
    """scores: [L, H] finite, non-negative → the same values as float64."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor [L, H], got {type(scores).__name__}")
    if scores.ndim != 2 or scores.numel() == 0:
        raise ValueError(f"scores must have shape [L, H] with L, H >= 1, got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        scores = scores.to(torch.float64)
    scores = scores.detach().to("cpu", torch.float64)
    if torch.isnan(scores).any():
        raise ValueError(f"scores contain NaN at (layer, head) {torch.nonzero(torch.isnan(scores)).tolist()}")
    if torch.isinf(scores).any():
        raise ValueError("scores contain inf")
    if (scores < 0).any():
        raise ValueError(f"scores must be non-negative; negative at (layer, head) {torch.nonzero(scores < 0).tolist()}")
    return scores


def _groups(scores: Tensor, scope: str) -> Tensor:
    """[L, H] → [G, n]: one row per group that shares a budget (a layer, or everything)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scores if scope == "layer" else scores.reshape(1, -1)


def _warn_zero_groups(groups: Tensor, scope: str) -> None:
    zero = (groups.sum(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        where = f"layers {zero}" if scope == "layer" else "all layers"
        warnings.warn(f"head scores are all zero in {where}; using the uniform allocation there", stacklevel=3)


def _waterfill_row(s: Tensor, total: float, lo: float, hi: float) -> Tensor:
    """Real-valued two-sided water-filling of one group.

    Args:
        s: [n] non-negative float64 scores.
        total: the budget to conserve, with ``n*lo <= total <= n*hi``.
        lo, hi: per-head floor and cap.
    Returns:
        [n] float64 ``clamp(alpha * s, lo, hi)`` summing to ``total``.  Zero-score heads stay at ``lo``
        unless every positive head is capped, in which case they share the rest equally (the limit of
        giving them a vanishing positive score); an all-zero group is uniform.
    """
    n = s.numel()
    pos = s > 0
    out = torch.full_like(s, lo)
    if not pos.any():
        return torch.full_like(s, total / n)
    n_pos, n_zero = int(pos.sum()), n - int(pos.sum())
    saturated = n_pos * hi + n_zero * lo
    if total >= saturated:  # every positive head is capped; zero heads take the rest equally
        out[pos] = hi
        if n_zero:
            out[~pos] = lo + (total - saturated) / n_zero
        return out
    if total <= n * lo:
        return out
    # f(alpha) = sum_h clamp(alpha s_h, lo, hi) is piecewise linear and non-decreasing with breakpoints at
    # lo/s_h and hi/s_h; find the piece that contains `total` and solve it in closed form on that piece.
    s = s / s.max()  # scale-free; keeps the breakpoints finite for tiny scores
    sp = s[pos]
    breaks = torch.cat([lo / sp, hi / sp]).unique()  # sorted
    f = (breaks[:, None] * sp[None, :]).clamp(lo, hi).sum(dim=1) + n_zero * lo  # [n_breaks]
    k = int(torch.searchsorted(f, torch.tensor([total], dtype=f.dtype)).item())
    k = min(max(k, 1), breaks.numel() - 1)
    mid = 0.5 * (breaks[k - 1] + breaks[k])
    at_lo, at_hi = ~pos | (mid * s <= lo), pos & (mid * s >= hi)
    free = ~(at_lo | at_hi)
    alpha = (total - lo * int(at_lo.sum()) - hi * int(at_hi.sum())) / s[free].sum()
    return (alpha * s).clamp(lo, hi)


def exact_waterfill(
    scores: Tensor, keep_ratio: float, num_key_blocks: int, *, min_blocks: int = 1, scope: str = "layer"
) -> Tensor:
    """The real-valued allocation ``c*`` that :func:`allocate` rounds (method.md §4.2).

    Args:
        scores: [L, H] non-negative head scores (any scale; only ratios within a group matter).
        keep_ratio, num_key_blocks, min_blocks: as in :func:`allocate`.
        scope: "layer" (each layer conserves ``H * c_base``) or "global" (all ``L*H`` heads share ``L*H*c_base``).
    Returns:
        [L, H] float64, each in [min_blocks, n_k], each group summing to its budget.
    """
    scores = _check_scores(scores)
    c_base = base_blocks(keep_ratio, num_key_blocks, min_blocks)
    groups = _groups(scores, scope)
    total = float(groups.shape[1] * c_base)
    rows = [_waterfill_row(g, total, float(min_blocks), float(num_key_blocks)) for g in groups]
    return torch.stack(rows).reshape(scores.shape)


def _largest_remainder(real: Tensor, scores: Tensor, total: int, hi: int) -> Tensor:
    """Integerise one group: floor, then +1 to the largest fractional parts until ``total`` is reached.

    Ties go to the higher score, then to the lower head index; values and remainders are compared at
    ``_TIE_DECIMALS`` decimals, so float noise (e.g. from rescaling the scores) never breaks an exact tie.
    real, scores: [n] float64 → [n] int64.
    """
    real = torch.where((real - real.round()).abs() < 1e-9, real.round(), real)  # snap near-integers
    base = real.floor()
    frac = (real - base).round(decimals=_TIE_DECIMALS)
    base = base.to(torch.int64)
    missing = total - int(base.sum())
    if missing <= 0:
        return base
    order = torch.arange(real.numel())  # lexicographic (-frac, -score, index) via stable sorts, last key first
    order = order[torch.sort(-scores[order], stable=True).indices]
    order = order[torch.sort(-frac[order], stable=True).indices]
    order = order[base[order] < hi]  # never push a head past the cap
    base[order[:missing]] += 1
    return base


@ALLOCATORS.register("hess")
@ALLOCATORS.register("waterfill")
def waterfill_allocate(
    scores: Tensor, keep_ratio: float, num_key_blocks: int, *, min_blocks: int = 1, scope: str = "layer"
) -> Tensor:
    """HeSS allocation: water-filling at the cap, floor ``min_blocks``, largest-remainder rounding.

    Args/Returns: as :func:`allocate` with ``capping="iterative"``.
    """
    real = exact_waterfill(scores, keep_ratio, num_key_blocks, min_blocks=min_blocks, scope=scope)
    sgroups = _groups(_check_scores(scores), scope)
    _warn_zero_groups(sgroups, scope)
    total = sgroups.shape[1] * base_blocks(keep_ratio, num_key_blocks, min_blocks)
    rows = [_largest_remainder(r, s, total, num_key_blocks) for r, s in zip(_groups(real, scope), sgroups)]
    return torch.stack(rows).reshape(real.shape)


@ALLOCATORS.register("clip")
def clip_allocate(
    scores: Tensor, keep_ratio: float, num_key_blocks: int, *, min_blocks: int = 1, scope: str = "layer"
) -> Tensor:
    """The "no capping" ablation: proportional shares clamped to [min_blocks, n_k], excess not redistributed.

    The ideal shares ``budget * w_h`` are integerised by largest remainder (so they sum to the budget
    before clamping) and then clamped, so the realised total is usually *below* the budget (the wasted
    blocks of method.md §4.3); see :func:`budget_report`.

    Args/Returns: as :func:`allocate` with ``capping="clip"``.
    """
    scores = _check_scores(scores)
    c_base = base_blocks(keep_ratio, num_key_blocks, min_blocks)
    groups = _groups(scores, scope)
    _warn_zero_groups(groups, scope)
    n = groups.shape[1]
    total = n * c_base
    rows = []
    for s in groups:
        w = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1.0 / n)
        ideal = _largest_remainder(total * w, s, total, hi=total)
        rows.append(ideal.clamp(min_blocks, num_key_blocks))
    return torch.stack(rows).reshape(scores.shape)


@ALLOCATORS.register("uniform")
def uniform_allocate(
    scores: Tensor, keep_ratio: float, num_key_blocks: int, *, min_blocks: int = 1, scope: str = "layer"
) -> Tensor:
    """SparseVGGT's allocation: ``c_base`` for every head; scores only give the shape [L, H]."""
    scores = _check_scores(scores)
    _groups(scores, scope)  # validates scope
    c_base = base_blocks(keep_ratio, num_key_blocks, min_blocks)
    return torch.full(scores.shape, c_base, dtype=torch.int64)


def allocate(
    scores: Tensor,
    keep_ratio: float,
    num_key_blocks: int,
    *,
    min_blocks: int = 1,
    capping: str = "iterative",
    scope: str = "layer",
) -> Tensor:
    """Key blocks per head, ``c_h``, from head scores (method.md §4.2).

    Args:
        scores: [L, H] non-negative head scores, e.g. ``HeadScores.hess(lam=0.5)``. NaN, inf or negative
            values raise; an all-zero layer falls back to uniform with a warning.
        keep_ratio: the uniform keep ratio ``1 - rho`` in (0, 1].
        num_key_blocks: n_k, patch key blocks per query-block row (the per-head cap C_max).
        min_blocks: the per-head floor C_min (>= 1; ReSS uses 2).
        capping: "iterative" (water-filling, conserves every group's total exactly) or "clip" (clamp
            once, no redistribution; the realised total is reported by :func:`budget_report`).
        scope: "layer" (each layer keeps ``H * c_base``) or "global" (all heads share ``L*H*c_base``).
    Returns:
        [L, H] int64 block counts in [min_blocks, n_k]; with equal scores every head gets ``c_base``, and a
        head never gets fewer blocks than a head of the same group with a lower score.
    """
    if capping not in CAPPINGS:
        raise ValueError(f"capping must be one of {sorted(CAPPINGS)}, got {capping!r}")
    fn = ALLOCATORS.get(CAPPINGS[capping])
    return fn(scores, keep_ratio, num_key_blocks, min_blocks=min_blocks, scope=scope)


def budget_report(blocks: Tensor, keep_ratio: float, num_key_blocks: int, *, min_blocks: int = 1) -> dict:
    """Budget bookkeeping of an allocation, e.g. the blocks wasted by ``capping="clip"``.

    Args:
        blocks: [L, H] int block counts from an allocator.
        keep_ratio, num_key_blocks, min_blocks: the arguments the allocation was made with.
    Returns:
        dict with ``budget_per_layer`` (int, ``H * c_base``), ``realized_per_layer`` ([L] int64),
        ``wasted_per_layer`` ([L] int64, budget minus realised), ``realized_total``, ``budget_total``,
        ``keep_ratio`` ([L, H] float64, ``c_h / n_k``) and ``realized_keep_ratio`` (their mean).
    """
    if blocks.ndim != 2:
        raise ValueError(f"blocks must have shape [L, H], got {tuple(blocks.shape)}")
    c_base = base_blocks(keep_ratio, num_key_blocks, min_blocks)
    L, H = blocks.shape
    realized = blocks.to(torch.int64).sum(dim=1)
    ratio = blocks.to(torch.float64) / num_key_blocks
    return {
        "budget_per_layer": H * c_base,
        "realized_per_layer": realized,
        "wasted_per_layer": H * c_base - realized,
        "budget_total": L * H * c_base,
        "realized_total": int(realized.sum()),
        "keep_ratio": ratio,
        "realized_keep_ratio": float(ratio.mean()),
    }
