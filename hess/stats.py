"""Uncertainty of comparisons: paired bootstrap over scenes, pooled-AUC bootstrap, rank permutation test.

Pure functions on numpy arrays (a leaf: no other hess module is imported)::

    ci = paired_bootstrap(method_per_scene, baseline_per_scene)            # mean paired Δ, 95% CI
    ci = pooled_auc_bootstrap(auc_a, auc_b, pairs)                          # Δ of pose AUC pooled over pairs
    ci.excludes_zero                                                        # the "significant" marker
    test = spearman_permutation_test(scores, oracle, n_perm=1000)          # per-layer ρ and its p-value

Conventions: every resampling draws scenes with replacement (the scene is the unit of replication: the
methods of one comparison ran on the same scenes and frame orders); the CI is the percentile interval of
``n_resamples`` bootstrap statistics drawn from ``numpy.random.default_rng(seed)``; a stochastic method
(several seeds of the random allocation) is passed as a ``[n_seeds, n_scenes]`` array, and seeds are
resampled too (two-stage bootstrap), so the CI covers both the scene and the seed variation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

N_RESAMPLES = 2000   # the minimum; callers may pass more
N_PERMUTATIONS = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class BootstrapCI:
    """A paired difference with its percentile bootstrap interval.

    Attributes:
        mean_diff: the statistic on the observed sample (mean paired Δ, or Δ of the pooled metric).
        ci_low, ci_high: percentile interval at ``level``; NaN when fewer than two scenes.
        n_scenes: scenes in the comparison.  n_reps: seeds of a stochastic method (1 otherwise).
    """

    mean_diff: float
    ci_low: float
    ci_high: float
    n_scenes: int
    n_reps: int = 1
    level: float = LEVEL
    n_resamples: int = N_RESAMPLES

    @property
    def half_width(self) -> float:
        """(ci_high − ci_low) / 2."""
        return 0.5 * (self.ci_high - self.ci_low)

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (NaN intervals never do)."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_level(level: float, n_resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")


def _as_reps(x: Any, name: str) -> np.ndarray:
    """[n] or [R, n] → [R, n] float64; non-finite values are an error (drop scenes explicitly)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be [n_scenes] or [n_seeds, n_scenes] with n_scenes >= 1, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has {int((~np.isfinite(arr)).sum())} non-finite value(s); drop those scenes first")
    return arr


def _resample(values: np.ndarray, weights: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap distribution of ``Σ w·v̄ / Σ w`` (v̄ = mean over resampled reps) under scene resampling.

    values: [R, n]; weights: [n] → [n_resamples].
    """
    R, n = values.shape
    rng = np.random.default_rng(seed)
    scenes = rng.integers(0, n, size=(n_resamples, n))                       # [B, n]
    if R > 1:
        reps = rng.integers(0, R, size=(n_resamples, R))                     # [B, R]
        per_scene = np.stack([values[reps[b]].mean(axis=0) for b in range(n_resamples)])  # [B, n]
        per_scene = np.take_along_axis(per_scene, scenes, axis=1)
    else:
        per_scene = values[0][scenes]
    w = weights[scenes]
    return (per_scene * w).sum(axis=1) / w.sum(axis=1)


def _interval(stat: float, boot: np.ndarray, n: int, reps: int, level: float, n_resamples: int) -> BootstrapCI:
    if n < 2:
        return BootstrapCI(stat, math.nan, math.nan, n, reps, level, n_resamples)
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2, 1.0 - alpha / 2])
    return BootstrapCI(stat, float(low), float(high), n, reps, level, n_resamples)


def weighted_paired_bootstrap(diffs: Any, weights: Optional[Any] = None, *, n_resamples: int = N_RESAMPLES,
                              seed: int = 0, level: float = LEVEL) -> BootstrapCI:
    """CI of the weighted mean ``Σ w_i d_i / Σ w_i`` of per-scene paired differences, scenes resampled.

    Args:
        diffs: [n_scenes] or [n_seeds, n_scenes] per-scene differences (method − baseline).
        weights: [n_scenes] non-negative weights (None: equal), e.g. frame pairs per scene.
    """
    _check_level(level, n_resamples)
    d = _as_reps(diffs, "diffs")
    n = d.shape[1]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum, got {w!r}")
    stat = float((d.mean(axis=0) * w).sum() / w.sum())
    boot = _resample(d, w, n_resamples, seed) if n >= 2 else np.array([stat])
    return _interval(stat, boot, n, d.shape[0], level, n_resamples)


def paired_bootstrap(method: Any, baseline: Any, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> BootstrapCI:
    """Mean paired difference ``method − baseline`` over the same scenes and its percentile bootstrap CI.

    Args:
        method: [n_scenes], or [n_seeds, n_scenes] for a stochastic method (seeds resampled too).
        baseline: [n_scenes], the baseline on the same scenes in the same order.
        n_resamples: bootstrap resamples (>= 2000 for reported numbers).  seed: the resampling stream.
    Returns:
        BootstrapCI (NaN interval with a single scene).
    """
    m, b = _as_reps(method, "method"), _as_reps(baseline, "baseline")
    if b.shape[0] != 1 or m.shape[1] != b.shape[1]:
        raise ValueError(f"method {m.shape} and baseline {b.shape[1:]} must cover the same scenes")
    return weighted_paired_bootstrap(m - b, None, n_resamples=n_resamples, seed=seed, level=level)


def pooled_auc_bootstrap(auc_method: Any, auc_baseline: Any, pairs: Any, *, n_resamples: int = N_RESAMPLES,
                         seed: int = 0, level: float = LEVEL) -> BootstrapCI:
    """Δ of a pose AUC pooled over all frame pairs, scenes resampled and the pooled AUC recomputed.

    A pooled AUC is linear in the pairs (``hess.metrics.pose_auc`` averages an indicator over pairs), so
    the AUC of a pool of scenes is the pair-weighted mean of their per-scene AUCs; a resample of scenes
    is scored as ``Σ_i P_i·AUC_i / Σ_i P_i`` over the drawn scenes (a scene drawn twice counts twice).

    Args:
        auc_method: [n_scenes] (or [n_seeds, n_scenes]) per-scene AUC of the method.
        auc_baseline: [n_scenes] per-scene AUC of the baseline, same scenes.
        pairs: [n_scenes] frame pairs scored per scene, ``S(S−1)/2``.
    """
    m, b = _as_reps(auc_method, "auc_method"), _as_reps(auc_baseline, "auc_baseline")
    if b.shape[0] != 1 or m.shape[1] != b.shape[1]:
        raise ValueError(f"auc_method {m.shape} and auc_baseline {b.shape[1:]} must cover the same scenes")
    return weighted_paired_bootstrap(m - b, pairs, n_resamples=n_resamples, seed=seed, level=level)


def half_width_for(diffs: Any, n_scenes: int, *, weights: Optional[Any] = None, n_resamples: int = N_RESAMPLES,
                   seed: int = 0, level: float = LEVEL) -> float:
    """Expected CI half-width with ``n_scenes`` scenes, from a pilot sample of per-scene differences.

    Resamples ``n_scenes`` scenes (with replacement) from the pilot to form each bootstrap sample: the
    half-width a study of that size would report if scenes vary like the pilot's.  Used to size the demo.
    """
    _check_level(level, n_resamples)
    d = _as_reps(diffs, "diffs").mean(axis=0)
    w = np.ones(len(d)) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_resamples, int(n_scenes)))
    boot = (d[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(0.5 * (high - low))


# --------------------------------------------------------------------------------- rank statistics
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank). [..., n] → [..., n]."""
    order = np.argsort(x, axis=-1, kind="stable")
    sorted_x = np.take_along_axis(x, order, axis=-1)
    ranks = np.empty_like(x, dtype=np.float64)
    flat_x, flat_o, flat_r = sorted_x.reshape(-1, x.shape[-1]), order.reshape(-1, x.shape[-1]), ranks.reshape(-1, x.shape[-1])
    for row in range(flat_x.shape[0]):
        start, n = 0, x.shape[-1]
        for end in range(1, n + 1):
            if end == n or flat_x[row, end] != flat_x[row, start]:
                flat_r[row, flat_o[row, start:end]] = 0.5 * (start + 1 + end)
                start = end
    return flat_r.reshape(x.shape)


def per_layer_spearman(a: Any, b: Any) -> np.ndarray:
    """Spearman ρ between the heads of each layer. a, b: [L, H] → [L] (NaN where a layer is constant)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"a and b must share one [L, H] shape, got {x.shape} and {y.shape}")
    rx, ry = _ranks(x), _ranks(y)
    dx, dy = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (dx * dy).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


@dataclass(frozen=True)
class PermutationTest:
    """Mean per-layer Spearman ρ and its one-sided permutation p-value (H0: no agreement within layers).

    ``p_value = (1 + #{null ≥ observed}) / (n_perm + 1)``: identical rankings of many heads give the
    smallest possible value ``1 / (n_perm + 1)``.  ``null_mean`` / ``null_sd``: the null distribution's.
    """

    rho: float
    p_value: float
    n_perm: int
    null_mean: float
    null_sd: float
    layers: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spearman_permutation_test(a: Any, b: Any, *, n_perm: int = N_PERMUTATIONS, seed: int = 0) -> PermutationTest:
    """Mean over layers of per-layer Spearman ρ(a, b), with heads of ``b`` shuffled within each layer as null.

    Layers where either table is constant have no ρ and are left out of the mean (NaN when none has one).
    Args:
        a, b: [L, H] score tables (e.g. HeSS_cam and oracle_cam).
        n_perm: permutations (>= 1000 for reported numbers).  seed: the permutation stream.
    """
    if int(n_perm) != n_perm or n_perm < 1:
        raise ValueError(f"n_perm must be a positive integer, got {n_perm}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rho_l = per_layer_spearman(x, y)
    ok = np.isfinite(rho_l)
    if not ok.any():
        return PermutationTest(math.nan, math.nan, int(n_perm), math.nan, math.nan, 0)
    x, y = x[ok], y[ok]
    observed = float(rho_l[ok].mean())
    rng = np.random.default_rng(seed)
    L, H = y.shape
    perm = np.argsort(rng.random((n_perm, L, H)), axis=-1)                 # [P, L, H] within-layer shuffles
    rx = _ranks(x)
    ry = np.take_along_axis(np.broadcast_to(_ranks(y), (n_perm, L, H)), perm, axis=-1)  # ranks move with values
    dx = rx - rx.mean(axis=1, keepdims=True)
    dy = ry - ry.mean(axis=2, keepdims=True)
    null = ((dx[None] * dy).sum(axis=2) / np.sqrt((dx * dx).sum(axis=1)[None] * (dy * dy).sum(axis=2))).mean(axis=1)
    p = (1 + int((null >= observed - 1e-12).sum())) / (n_perm + 1)
    return PermutationTest(observed, p, int(n_perm), float(null.mean()), float(null.std(ddof=1)) if n_perm > 1 else 0.0,
                           int(ok.sum()))
