"""hess.stats: bootstrap and permutation known answers (analytic binomial quantiles, brute-force enumeration)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hess.stats import (half_width_for, paired_bootstrap, per_layer_spearman, pooled_auc_bootstrap,
                        spearman_permutation_test, weighted_paired_bootstrap)


def _binom_quantile(n: int, p: float, q: float) -> int:
    """Smallest k with P(Bin(n, p) <= k) >= q."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf >= q:
            return k
    return n


def test_paired_bootstrap_matches_the_binomial_quantiles():
    """Paired Δ of 10 ones and 10 zeros: a resampled mean is Bin(20, 1/2)/20, so the 95% percentile
    interval is [6/20, 14/20] exactly (P(X ≤ 5) = 0.021 and P(X ≤ 13) = 0.942 leave margin for sampling)."""
    baseline = np.linspace(0.2, 0.8, 20)
    method = baseline + np.r_[np.ones(10), np.zeros(10)]
    ci = paired_bootstrap(method, baseline, n_resamples=20000, seed=1)
    assert ci.mean_diff == pytest.approx(0.5)
    assert (ci.ci_low, ci.ci_high) == pytest.approx((_binom_quantile(20, 0.5, 0.025) / 20,
                                                     _binom_quantile(20, 0.5, 0.975) / 20))
    assert (ci.ci_low, ci.ci_high) == pytest.approx((0.30, 0.70)) and ci.excludes_zero and ci.n_scenes == 20


def test_bootstrap_matches_brute_force_enumeration():
    """Four scenes: all 4⁴ = 256 equally likely resamples enumerated give the exact bootstrap distribution
    of the pair-weighted Δ; the Monte Carlo CI lands within the exact distribution's 1.5%/3.5% quantiles."""
    d, w = np.array([0.3, -0.1, 0.05, 0.2]), np.array([6.0, 3.0, 6.0, 1.0])
    exact = np.array([(d[list(i)] * w[list(i)]).sum() / w[list(i)].sum() for i in itertools.product(range(4), repeat=4)])
    ci = weighted_paired_bootstrap(d, w, n_resamples=40000, seed=3)
    assert ci.mean_diff == pytest.approx((d * w).sum() / w.sum())
    assert np.quantile(exact, 0.015) <= ci.ci_low <= np.quantile(exact, 0.035)
    assert np.quantile(exact, 0.965) <= ci.ci_high <= np.quantile(exact, 0.985)


def test_pooled_auc_is_the_pair_weighted_mean_and_constant_differences_have_a_point_interval():
    a, b, pairs = np.array([0.9, 0.5, 0.7]), np.array([0.8, 0.5, 0.4]), np.array([6, 6, 28])
    ci = pooled_auc_bootstrap(a, b, pairs)
    assert ci.mean_diff == pytest.approx(((a - b) * pairs).sum() / pairs.sum())
    flat = paired_bootstrap(np.full(5, 0.7), np.full(5, 0.6))
    assert (flat.ci_low, flat.ci_high) == pytest.approx((0.1, 0.1)) and flat.excludes_zero
    assert paired_bootstrap(np.array([1.0, 0.0]), np.array([0.0, 1.0]), seed=0).excludes_zero is False
    one = paired_bootstrap([0.3], [0.1])
    assert math.isnan(one.ci_low) and not one.excludes_zero and one.mean_diff == pytest.approx(0.2)


def test_seeded_and_stochastic_methods_resample_seeds_too():
    base = np.zeros(30)
    rng = np.random.default_rng(0)
    reps = rng.normal(0.0, 0.01, size=(5, 30)) + np.array([[-0.2], [0.0], [0.1], [0.05], [0.3]])  # seeds differ a lot
    two_stage = paired_bootstrap(reps, base, seed=4)
    scenes_only = paired_bootstrap(reps.mean(axis=0), base, seed=4)
    assert two_stage.mean_diff == pytest.approx(scenes_only.mean_diff) and two_stage.n_reps == 5
    assert two_stage.half_width > 5 * scenes_only.half_width  # the seed spread is in the interval
    assert paired_bootstrap(reps, base, seed=4) == two_stage  # seeded: reproducible
    with pytest.raises(ValueError, match="same scenes"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap(np.array([0.1, np.nan]), np.zeros(2))


def test_half_width_shrinks_like_one_over_root_n():
    d = np.random.default_rng(2).normal(0.0, 0.1, size=64)
    h16, h64 = half_width_for(d, 16, n_resamples=4000), half_width_for(d, 64, n_resamples=4000)
    assert h16 / h64 == pytest.approx(2.0, rel=0.15)
    assert h64 == pytest.approx(1.96 * d.std() / 8, rel=0.15)


def test_permutation_p_value_of_identical_rankings_is_the_minimum():
    """Identical rankings of 8 heads in 6 layers: no within-layer shuffle reaches ρ = 1 (P = 6·(1/8!)),
    so p = 1/(n_perm + 1)."""
    table = np.random.default_rng(0).random((6, 8))
    test = spearman_permutation_test(table, 2 * table + 1, n_perm=1000, seed=0)
    assert test.rho == pytest.approx(1.0) and test.p_value == pytest.approx(1 / 1001) and test.layers == 6
    assert abs(test.null_mean) < 0.05 and test.null_sd == pytest.approx(1 / math.sqrt(7) / math.sqrt(6), rel=0.15)


def test_permutation_p_values_of_unrelated_tables_are_roughly_uniform():
    rng = np.random.default_rng(5)
    p = np.array([spearman_permutation_test(rng.random((4, 6)), rng.random((4, 6)), n_perm=200, seed=i).p_value
                  for i in range(150)])
    assert 0.4 < p.mean() < 0.6
    assert 0.03 < (p <= 0.1).mean() < 0.2 and 0.3 < (p <= 0.5).mean() < 0.7


def test_per_layer_spearman_skips_constant_layers():
    a = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    rho = per_layer_spearman(a, np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]))
    assert math.isnan(rho[0]) and rho[1] == pytest.approx(-1.0)
    test = spearman_permutation_test(a, a[:, ::-1], n_perm=100)
    assert test.layers == 1 and test.rho == pytest.approx(-1.0) and test.p_value == pytest.approx(1.0)
