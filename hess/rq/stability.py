"""Calibration stability of HeSS: how much the table and its allocation depend on the calibration scenes.

    boot = bootstrap_tables(traces, lam=0.5, n_boot=500)            # [B, L, H] HeSS of resampled scenes
    summary = stability(boot, traces.hess(lam=0.5), keep_ratio=0.27, num_key_blocks=24)
    curve = scenes_needed(pool_traces, sizes=(1, 2, 4, 8, 16), keep_ratio=0.27, num_key_blocks=24)

Everything is read from the per-scene Fisher traces a ``HeadScores`` artifact stores (no recalibration):
a bootstrap draw of calibration scenes (with replacement) is averaged by ``HeadScores.hess(scenes=...)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from hess.stats import per_layer_spearman

N_BOOT = 500
RHO_STABLE = 0.9       # "stable": mean per-layer Spearman to the reference table at least this …
CHANGE_STABLE = 0.1    # … and at most this fraction of heads get another block count at the evaluated keep ratio


def bootstrap_tables(traces: Any, *, lam: float, proj: str = "q", normalize: bool = True, n_boot: int = N_BOOT,
                     size: int | None = None, seed: int = 0, replace: bool = True) -> np.ndarray:
    """HeSS tables of ``n_boot`` draws of ``size`` calibration scenes (default: all, with replacement).

    traces: a ``hess.scoring.HeadScores``.  Returns [n_boot, L, H] float64.
    """
    S = traces.num_scenes
    size = S if size is None else int(size)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, S, size) if replace else rng.choice(S, size, replace=False)
        out.append(traces.hess(lam=lam, proj=proj, normalize=normalize, scenes=pick.tolist()).numpy())
    return np.stack(out)


def _allocations(tables: np.ndarray, keep_ratio: float, num_key_blocks: int, min_blocks: int) -> np.ndarray:
    from hess.budget import allocate

    return np.stack([allocate(torch.as_tensor(t), keep_ratio, num_key_blocks, min_blocks=min_blocks).numpy()
                     for t in tables])


def stability(boot: np.ndarray, reference: Any, *, keep_ratio: float, num_key_blocks: int, min_blocks: int = 1,
              level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """CI of each head's share, rank stability and allocation changes of bootstrap tables ``boot``.

    Args:
        boot: [B, L, H] bootstrap HeSS tables.  reference: [L, H] the table in use (all scenes).
    Returns:
        {"share_low", "share_high": [L, H] percentile interval of each head's share;
         "rank_rho": mean per-layer Spearman between pairs of bootstrap tables (pairs drawn at random);
         "rank_rho_reference": mean per-layer Spearman of bootstrap tables with the reference;
         "alloc_changed": fraction of draws whose allocation at ``keep_ratio`` differs from the reference's;
         "heads_changed": mean fraction of heads whose block count differs}.
    """
    ref = np.asarray(reference, dtype=np.float64)
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    rng = np.random.default_rng(seed)
    B = boot.shape[0]
    a, b = rng.integers(0, B, B), rng.integers(0, B, B)
    pair_rho = [np.nanmean(per_layer_spearman(boot[i], boot[j])) for i, j in zip(a, b) if i != j]
    ref_rho = [np.nanmean(per_layer_spearman(t, ref)) for t in boot]
    alloc = _allocations(boot, keep_ratio, num_key_blocks, min_blocks)
    ref_alloc = _allocations(ref[None], keep_ratio, num_key_blocks, min_blocks)[0]
    differs = alloc != ref_alloc[None]
    return {"share_low": low, "share_high": high, "rank_rho": float(np.nanmean(pair_rho)) if pair_rho else np.nan,
            "rank_rho_reference": float(np.nanmean(ref_rho)), "alloc_changed": float(differs.any(axis=(1, 2)).mean()),
            "heads_changed": float(differs.mean())}


def scenes_needed(traces: Any, sizes: Sequence[int], *, lam: float, keep_ratio: float, num_key_blocks: int,
                  min_blocks: int = 1, proj: str = "q", normalize: bool = True, n_boot: int = 200,
                  seed: int = 0) -> pd.DataFrame:
    """Stability against the table of all ``traces`` scenes when only ``m`` scenes (a random subset) calibrate.

    Returns:
        one row per m in ``sizes`` (<= the pool): ``calib_scenes``, ``rank_rho`` (mean per-layer Spearman
        with the full-pool table), ``alloc_changed`` (fraction of subsets whose allocation differs from the
        full pool's), ``heads_changed``, ``stable`` (rank_rho >= RHO_STABLE and heads_changed <= CHANGE_STABLE).
    """
    reference = traces.hess(lam=lam, proj=proj, normalize=normalize).numpy()
    rows = []
    for m in sorted({int(s) for s in sizes if 1 <= int(s) <= traces.num_scenes}):
        boot = bootstrap_tables(traces, lam=lam, proj=proj, normalize=normalize, n_boot=n_boot, size=m, seed=seed,
                                replace=False)
        st = stability(boot, reference, keep_ratio=keep_ratio, num_key_blocks=num_key_blocks, min_blocks=min_blocks,
                       seed=seed)
        rows.append({"calib_scenes": m, "rank_rho": st["rank_rho_reference"], "alloc_changed": st["alloc_changed"],
                     "heads_changed": st["heads_changed"],
                     "stable": bool(st["rank_rho_reference"] >= RHO_STABLE and st["heads_changed"] <= CHANGE_STABLE)})
    return pd.DataFrame(rows)
