"""hess.budget: known answers (method.md §4.3) and hypothesis properties of ``allocate``."""
from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hess.budget import ALLOCATORS, allocate, base_blocks, budget_report, exact_waterfill

WORKED_W = torch.tensor([[0.30, 0.20, 0.10] + [0.4 / 13] * 13], dtype=torch.float64)


# --------------------------------------------------------------------------- known answers
def test_worked_example_method_4_3():
    """VGGT, S=20: n_k = 324, rho = 0.73 → c_base = 87, layer budget 1392 → (324, 305, 152, 13 × 47)."""
    blocks = allocate(WORKED_W, keep_ratio=1 - 0.73, num_key_blocks=324)
    assert blocks.dtype == torch.int64
    assert blocks[0].tolist() == [324, 305, 152] + [47] * 13
    assert int(blocks.sum()) == 16 * 87 == 1392
    real = exact_waterfill(WORKED_W, 1 - 0.73, 324)[0]
    # hand: 1068 remaining blocks over weights 0.2, 0.1, 0.4/13 (sum 0.7)
    assert real[0] == 324
    assert real[1].item() == pytest.approx(1068 * 0.2 / 0.7, abs=1e-9)  # 305.142857
    assert real[2].item() == pytest.approx(1068 * 0.1 / 0.7, abs=1e-9)  # 152.571429
    assert real[3:].tolist() == pytest.approx([1068 * (0.4 / 13) / 0.7] * 13, abs=1e-9)  # 46.945


def test_worked_example_clip_wastes_the_excess():
    """Clip once: ideal shares 1392·w = (417.6, 278.4, 139.2, 13 × 42.83) → LR rounding
    (417, 278, 139, 12 × 43, 42) sums to 1392, then the first head is clamped to 324: 93 blocks wasted."""
    blocks = allocate(WORKED_W, 0.27, 324, capping="clip")
    assert blocks[0].tolist() == [324, 278, 139] + [43] * 12 + [42]
    report = budget_report(blocks, 0.27, 324)
    assert report["budget_per_layer"] == 1392
    assert report["realized_total"] == 1392 - 93
    assert report["wasted_per_layer"].tolist() == [93]
    # the iterative allocation wastes nothing
    assert budget_report(allocate(WORKED_W, 0.27, 324), 0.27, 324)["wasted_per_layer"].tolist() == [0]


def test_base_blocks_matches_sparsevggt_and_floors():
    assert base_blocks(1 - 0.73, 324) == 87
    assert base_blocks(0.29, 100) == 29  # 100 * 0.29 = 28.999999999999996 in floats
    assert base_blocks(0.01, 10) == 1  # floor 0 → min_blocks
    assert base_blocks(0.01, 10, min_blocks=2) == 2
    assert base_blocks(1.0, 7) == 7


def test_zero_score_heads_take_the_rest_when_others_saturate():
    # budget 4 * 5 = 20; the only positive head caps at 10; the zero heads share 10 → 3.33 each → (4, 3, 3)
    real = exact_waterfill(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 0.5, 10)
    assert real[0].tolist() == pytest.approx([10, 10 / 3, 10 / 3, 10 / 3])
    assert allocate(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 0.5, 10)[0].tolist() == [10, 4, 3, 3]
    # the floor binds: scores (1, 1, 0.01) with budget 3 * 4 = 12, floor 3 → the small head sits at 3
    assert allocate(torch.tensor([[1.0, 1.0, 0.01]]), 0.4, 10, min_blocks=3)[0].tolist() == [5, 4, 3]


def test_global_scope_moves_budget_across_layers():
    scores = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert allocate(scores, 0.5, 10).tolist() == [[5, 5], [5, 5]]  # per layer: uniform
    glob = allocate(scores, 0.5, 10, scope="global")
    # 20 blocks ∝ (1,1,3,3) = (2.5, 2.5, 7.5, 7.5): floors sum to 18, all remainders tie at 0.5,
    # so the 2 spare blocks go to the higher scores
    assert glob.tolist() == [[2, 2], [8, 8]]
    assert int(glob.sum()) == 20


def test_exact_remainder_ties_survive_float_noise():
    """Budget 30 over (0, 0, 0, 9.74, 1, 3) with n_k = 17: zeros at 1, 9.74 capped at 17, and the last 10
    blocks split 2.5 / 7.5; the tie at .5 goes to the higher score, whatever the scale of the scores."""
    scores = torch.tensor([[0.0, 0.0, 0.0, 9.7421, 1.0, 3.0]], dtype=torch.float64)
    for scale in (1.0, 7.0, 1e-3, 3.3):
        assert allocate(scores * scale, 0.3125, 17)[0].tolist() == [1, 1, 1, 17, 2, 8]


def test_keep_ratio_one_keeps_everything():
    scores = torch.rand(3, 5)
    scores[0, 0] = 0.0
    assert (allocate(scores, 1.0, 9) == 9).all()


def test_all_zero_layer_warns_and_is_uniform():
    scores = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    with pytest.warns(UserWarning, match=r"all zero in layers \[0\]"):
        blocks = allocate(scores, 0.5, 8)
    assert blocks[0].tolist() == [4, 4, 4]
    assert blocks[1].tolist() == [2, 4, 6]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(scores=torch.tensor([[1.0, float("nan")]])), ValueError, "NaN"),
        (dict(scores=torch.tensor([[1.0, -0.1]])), ValueError, "non-negative"),
        (dict(scores=torch.tensor([[1.0, float("inf")]])), ValueError, "inf"),
        (dict(scores=torch.ones(4)), ValueError, r"\[L, H\]"),
        (dict(keep_ratio=0.0), ValueError, "keep_ratio"),
        (dict(keep_ratio=1.5), ValueError, "keep_ratio"),
        (dict(keep_ratio=float("nan")), TypeError, "keep_ratio"),
        (dict(min_blocks=11), ValueError, "min_blocks"),
        (dict(min_blocks=0), ValueError, "min_blocks"),
        (dict(num_key_blocks=0), ValueError, "num_key_blocks"),
        (dict(capping="none"), ValueError, "capping"),
        (dict(scope="model"), ValueError, "scope"),
    ],
)
def test_bad_input_raises(kwargs, exc, match):
    args = dict(scores=torch.ones(2, 3), keep_ratio=0.5, num_key_blocks=10) | kwargs
    with pytest.raises(exc, match=match):
        allocate(args.pop("scores"), args.pop("keep_ratio"), args.pop("num_key_blocks"), **args)


def test_registry_has_one_signature():
    assert {"uniform", "hess", "waterfill", "clip"} <= set(ALLOCATORS)
    scores = torch.tensor([[1.0, 2.0, 5.0]])
    for name in ALLOCATORS:
        out = ALLOCATORS.get(name)(scores, 0.5, 8, min_blocks=1, scope="layer")
        assert out.shape == (1, 3) and out.dtype == torch.int64
    assert ALLOCATORS.get("uniform")(scores, 0.5, 8).tolist() == [[4, 4, 4]]
    with pytest.raises(KeyError, match="known: clip, hess, uniform, waterfill"):
        ALLOCATORS.get("nope")


def test_budget_module_is_pure():
    """style rule 6: budget imports torch (and the registry leaf) only."""
    tree = ast.parse(Path(__file__).parents[1].joinpath("hess", "budget.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in mods} <= {"__future__", "math", "warnings", "typing", "torch", "hess"}
    assert {m for m in mods if m.startswith("hess")} == {"hess.registry"}


# --------------------------------------------------------------------------- properties
def _bisect_waterfill(s: torch.Tensor, total: float, lo: float, hi: float) -> torch.Tensor:
    """Independent reference: bisection on alpha for sum clamp(alpha s, lo, hi) = total (positive s only)."""
    a, b = 0.0, 1.0
    while (b * s).clamp(lo, hi).sum() < total:
        b *= 2
    for _ in range(200):
        m = 0.5 * (a + b)
        a, b = (m, b) if (m * s).clamp(lo, hi).sum() < total else (a, m)
    return (b * s).clamp(lo, hi)


@st.composite
def problems(draw):
    L = draw(st.integers(1, 3))
    H = draw(st.integers(1, 16))
    n_k = draw(st.integers(1, 400))
    keep = draw(st.floats(1e-3, 1.0, allow_nan=False))
    min_blocks = draw(st.integers(1, min(3, n_k)))
    value = st.one_of(st.just(0.0), st.floats(1e-6, 1e3, allow_nan=False), st.integers(1, 4).map(float))
    scores = torch.tensor(draw(st.lists(value, min_size=L * H, max_size=L * H)), dtype=torch.float64).reshape(L, H)
    scope = draw(st.sampled_from(["layer", "global"]))
    return scores, keep, n_k, min_blocks, scope


def _groups(t, scope):
    return t if scope == "layer" else t.reshape(1, -1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_allocate_properties(problem):
    scores, keep, n_k, min_blocks, scope = problem
    c_base = max(min_blocks, math.floor(n_k * keep + 1e-9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the documented all-zero-layer fallback
        blocks = allocate(scores, keep, n_k, min_blocks=min_blocks, scope=scope)
        real = exact_waterfill(scores, keep, n_k, min_blocks=min_blocks, scope=scope)
    assert blocks.shape == scores.shape and blocks.dtype == torch.int64
    # bounds
    assert (blocks >= min_blocks).all() and (blocks <= n_k).all()
    # conservation, exact
    for b, s, r in zip(_groups(blocks, scope), _groups(scores, scope), _groups(real, scope)):
        assert int(b.sum()) == b.numel() * c_base
        assert float(r.sum()) == pytest.approx(b.numel() * c_base, rel=1e-9, abs=1e-9)
        # within one block of the real-valued water-filling
        assert ((b.double() - r).abs() < 1 + 1e-9).all()
        # monotone: a strictly higher score never gets fewer blocks
        higher = s[:, None] > s[None, :]
        assert not (higher & (b[:, None] < b[None, :])).any()
        # the real solution agrees with an independent bisection when some score is positive
        if (s > 0).all():
            ref = _bisect_waterfill(s / s.max(), float(b.numel() * c_base), float(min_blocks), float(n_k))
            assert torch.allclose(r, ref, atol=1e-6, rtol=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.floats(1e-3, 1e3))
def test_equal_scores_give_uniform(problem, value):
    scores, keep, n_k, min_blocks, scope = problem
    c_base = max(min_blocks, math.floor(n_k * keep + 1e-9))
    equal = torch.full_like(scores, value)
    blocks = allocate(equal, keep, n_k, min_blocks=min_blocks, scope=scope)
    assert (blocks == c_base).all()
    # scale invariance: multiplying all scores by a constant changes nothing
    if (scores > 0).any(dim=1).all():
        assert torch.equal(allocate(scores, keep, n_k, min_blocks=min_blocks, scope=scope),
                           allocate(scores * 7.0, keep, n_k, min_blocks=min_blocks, scope=scope))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_clip_equals_waterfill_when_nothing_binds_and_wastes_otherwise(problem):
    scores, keep, n_k, min_blocks, scope = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        blocks = allocate(scores, keep, n_k, min_blocks=min_blocks, capping="clip", scope=scope)
        fill = allocate(scores, keep, n_k, min_blocks=min_blocks, scope=scope)
    assert (blocks >= min_blocks).all() and (blocks <= n_k).all()
    c_base = max(min_blocks, math.floor(n_k * keep + 1e-9))
    for b, f, s in zip(_groups(blocks, scope), _groups(fill, scope), _groups(scores, scope)):
        if s.sum() == 0:
            continue
        budget = b.numel() * c_base
        ideal = budget * s / s.sum()
        if ((ideal >= min_blocks) & (ideal <= n_k)).all():
            assert torch.equal(b, f)  # no clamp → identical to water-filling
        elif (ideal >= min_blocks).all():
            # only the cap binds: the excess above n_k is wasted, up to the integer rounding of each share
            wasted = budget - int(b.sum())
            assert (ideal.floor() - n_k).clamp_min(0).sum() <= wasted <= (ideal.ceil() - n_k).clamp_min(0).sum()
