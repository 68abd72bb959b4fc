"""hess.plots: numeric helpers against hand-computed values; every figure on small synthetic inputs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from hess import plots
from hess.results import Record, records_frame

# ---------------------------------------------------------------------------------------------- numbers


def test_coefficient_of_variation_by_hand() -> None:
    cv = plots.coefficient_of_variation([[1, 1, 1, 1], [1, 2, 3, 4], [0, 0, 0, 0]])
    # row 1: mean 2.5, population std sqrt(1.25)
    np.testing.assert_allclose(cv[:2], [0.0, np.sqrt(1.25) / 2.5])
    assert np.isnan(cv[2])


def test_gini_by_hand() -> None:
    g = plots.gini([[1, 1, 1, 1], [0, 0, 0, 4], [1, 2, 3, 4]])
    # [1,2,3,4]: sum over ordered pairs of |xi-xj| = 20, / n² = 1.25, / (2·mean = 5) = 0.25
    np.testing.assert_allclose(g, [0.0, 0.75, 0.25])
    with pytest.raises(ValueError, match="non-negative"):
        plots.gini([[1.0, -1.0]])


def test_average_ranks_and_spearman_by_hand() -> None:
    np.testing.assert_allclose(plots.average_ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    a, b = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    # ranks(b) = [1, 2, 3.5, 5, 3.5]; Σ da·db = 8, Σ da² = 10, Σ db² = 9.5
    assert plots.spearman(a, b) == pytest.approx(8 / np.sqrt(95))
    assert np.isnan(plots.spearman(a, [3, 3, 3, 3, 3]))


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)
    assert plots.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_rank_correlations_pooled_and_per_layer() -> None:
    a = [[1, 2, 3], [4, 5, 6]]
    b = [[3, 2, 1], [6, 5, 4]]  # reversed within every layer, but layer 1 still above layer 0
    out = plots.rank_correlations({"a": a, "b": b, "uniform": np.ones((2, 3))})
    assert out["per_layer"].loc["a", "b"] == pytest.approx(-1.0)
    assert out["pooled"].loc["a", "b"] == pytest.approx(9.5 / 17.5)  # hand-computed on ranks 1..6
    assert out["pooled"].loc["a", "a"] == pytest.approx(1.0)
    assert np.isnan(out["pooled"].loc["a", "uniform"]) and np.isnan(out["per_layer"].loc["uniform", "b"])
    with pytest.raises(ValueError, match="shape"):
        plots.rank_correlations({"a": a, "c": np.ones((3, 2))})


def test_extreme_heads_table_labels_and_ties() -> None:
    table = plots.extreme_heads_table([[1.0, 1.0], [0.0, 2.0]], k=2)
    most = table[table.group == "most"]
    least = table[table.group == "least"]
    assert list(most.head_label) == ["GA1-H1", "GA0-H0"]  # tie 1.0 vs 1.0 goes to the lower index
    assert list(least.head_label) == ["GA1-H0", "GA0-H0"]
    assert list(most["rank"]) == [1, 2] and list(most.score) == [2.0, 1.0]
    assert list(least.global_layer) == [1, 0] and list(least["head"]) == [0, 0]
    with pytest.raises(ValueError, match="k must be"):
        plots.extreme_heads_table([[1.0, 2.0]], k=3)


def test_pareto_mask_by_hand() -> None:
    pts = [[1, 1], [2, 2], [2, 1], [3, 3], [1, 0], [3, 3]]  # minimise x, maximise y
    mask = plots.pareto_mask(pts, ["minimize", "maximize"])
    assert mask.tolist() == [True, True, False, True, False, True]  # duplicates do not dominate each other
    three = plots.pareto_mask([[1, 1, 1], [1, 1, 2], [0, 5, 5]], ["min", "min", "min"])
    assert three.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="unknown direction"):
        plots.pareto_mask(pts, ["minimize", "up"])
    with pytest.raises(ValueError, match="directions"):
        plots.pareto_mask(pts, ["minimize"])
    with pytest.raises(ValueError, match="non-finite"):
        plots.pareto_mask([[1, np.nan], [2, 2]], ["min", "max"])


# ------------------------------------------------------------------------------------- per-head figures


def _tick_texts(ax, axis: str) -> list[str]:
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


def test_head_heatmap_small_grid_is_fully_labelled() -> None:
    scores = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    fig = plots.head_heatmap(scores, title="camera HeSS", cbar_label="share")
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # heatmap + colour bar
    ax = fig.axes[0]
    assert ax.get_title() == "camera HeSS"
    assert ax.get_xlabel() == "head (0-based)" and ax.get_ylabel() == "global layer (0-based)"
    assert _tick_texts(ax, "x") == ["0", "1", "2", "3", "4"]
    assert _tick_texts(ax, "y") == ["0", "1", "2"]
    assert ax.images[0].colorbar.ax.get_ylabel() == "share"
    np.testing.assert_array_equal(ax.images[0].get_array(), scores.numpy())
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2g}" for v in range(15))


def test_head_heatmap_large_grid_thins_ticks_without_annotation() -> None:
    fig = plots.head_heatmap(np.random.default_rng(0).random((48, 16)), title="t", cbar_label="c")
    ax = fig.axes[0]
    assert _tick_texts(ax, "x") == [str(h) for h in range(16)]  # ≤ 32: every head
    assert _tick_texts(ax, "y") == [str(l) for l in range(0, 48, 2)]
    assert not ax.texts


@pytest.mark.parametrize("bad, match", [
    (np.ones(4), "rank 2"), (np.ones((2, 2, 2)), "rank 2"), (np.zeros((0, 4)), "empty"),
    (np.array([[1.0, np.nan]]), "non-finite"), ([["a", "b"]], "numeric"),
])
def test_head_heatmap_rejects_bad_input(bad, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        plots.head_heatmap(bad, title="t", cbar_label="c")


def test_hess_heatmaps_three_panels_shared_scale() -> None:
    rng = np.random.default_rng(0)
    cam, pc = rng.random((4, 3)), rng.random((4, 3))
    fig = plots.hess_heatmaps(cam, pc, 0.5 * cam + 0.5 * pc, lam=0.5)
    assert len(fig.axes) == 4
    panels = fig.axes[:3]
    assert [ax.get_title() for ax in panels][2] == "mixed HeSS, λ = 0.5"
    assert len({ax.images[0].get_clim() for ax in panels}) == 1
    assert panels[2].images[0].colorbar.ax.get_ylabel()
    assert "GA{l}-H{h}" in fig.get_suptitle() and "0-based" in fig.get_suptitle()
    with pytest.raises(ValueError, match="shape"):
        plots.hess_heatmaps(cam, pc[:2], cam, lam=0.5)


def test_allocation_heatmaps_show_keep_ratio_per_head() -> None:
    blocks = {0.5: [[2, 2], [1, 3]], 0.25: [[1, 1], [1, 1]], 1.0: [[4, 4], [4, 4]]}
    fig = plots.allocation_heatmaps(blocks, num_key_blocks=4)
    assert len(fig.axes) == 4
    ax_half = fig.axes[1]  # panels sorted by decreasing keep ratio: 1.0, 0.5, 0.25
    assert ax_half.get_title().startswith("target keep ratio 0.5")
    np.testing.assert_allclose(ax_half.images[0].get_array(), [[0.5, 0.5], [0.25, 0.75]])
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in fig.axes[:3])
    with pytest.raises(ValueError, match="integers"):
        plots.allocation_heatmaps({0.5: [[1.5, 2]]}, num_key_blocks=4)
    with pytest.raises(ValueError, match="integers in"):
        plots.allocation_heatmaps({0.5: [[5, 2]]}, num_key_blocks=4)


def test_dispersion_bars_heights_are_cv_and_gini() -> None:
    scores = np.array([[1, 1, 1, 1], [1, 2, 3, 4], [0, 0, 0, 4]], dtype=float)
    fig = plots.dispersion_bars(scores)
    cv_ax, gini_ax = fig.axes
    np.testing.assert_allclose([p.get_height() for p in gini_ax.patches], [0.0, 0.25, 0.75])
    np.testing.assert_allclose([p.get_height() for p in cv_ax.patches], plots.coefficient_of_variation(scores))
    assert _tick_texts(gini_ax, "x") == ["0", "1", "2"]
    assert all(ax.get_legend() is not None and ax.get_title() for ax in (cv_ax, gini_ax))


def test_rank_correlation_matrix_marks_undefined() -> None:
    a = np.arange(6.0).reshape(2, 3)
    fig = plots.rank_correlation_matrix({"hess": a, "oracle": a ** 2, "uniform": np.ones((2, 3))})
    assert len(fig.axes) == 3
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("1.00") == 4 and texts.count("n/a") == 5
    assert _tick_texts(fig.axes[0], "x") == ["hess", "oracle", "uniform"]
    assert fig.axes[0].images[0].colorbar.ax.get_ylabel() == "Spearman ρ"


# ---------------------------------------------------------------------------------- tidy-row figures


def _tidy() -> pd.DataFrame:
    """Two methods × two keep ratios × 3 scenes, plus dense; values chosen so means are exact."""
    records = []
    for method, ratios in [("uniform", [0.5, 0.25]), ("hess", [0.5, 0.25]), ("dense", [None])]:
        for kr in ratios:
            for s in range(3):
                base = 0.9 if kr is None else (0.6 if method == "uniform" else 0.7) - (0.5 - kr)
                density = 1.0 if kr is None else kr + 0.01 * s
                cfg = {"score.lam": 0.5, "method.name": method}
                for metric, value in [("synthetic/auc30", base + 0.1 * (s - 1)),
                                      ("perf/latency_ms", 10 + 20 * density + s),
                                      ("perf/global_attn_ms", 15 * density + s)]:
                    records.append(Record(f"{method}-{kr}", f"s{s}", metric, value, keep_ratio=kr,
                                          realized_density=density, latency_ms=10 + 20 * density, config=cfg))
    return records_frame(records).assign(method=lambda d: d["method.name"])


def test_tradeoff_curve_points_are_scene_means() -> None:
    fig = plots.tradeoff_curve(_tidy(), "synthetic/auc30")
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and ax.get_title() and ax.get_legend() is not None
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"dense", "hess", "uniform"}
    assert "realised density" in ax.get_xlabel() and "AUC@30" in ax.get_ylabel()
    series = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers: data line first
    np.testing.assert_allclose(series["hess"].get_xdata(), [0.26, 0.51])  # mean realised density over scenes
    np.testing.assert_allclose(series["hess"].get_ydata(), [0.45, 0.7])    # mean metric over scenes
    np.testing.assert_allclose(series["uniform"].get_ydata(), [0.35, 0.6])
    np.testing.assert_allclose(series["dense"].get_xdata(), [1.0])


def test_tradeoff_curve_dense_is_a_reference_line_on_keep_ratio() -> None:
    fig = plots.tradeoff_curve(_tidy(), "synthetic/auc30", x="keep_ratio", err="sem")
    ax = fig.axes[0]
    ref = [l for l in ax.get_lines() if l.get_label() == "dense (no sparsity)"]
    assert ref and np.allclose(ref[0].get_ydata(), 0.9)
    assert "keep ratio" in ax.get_xlabel() and "sem" in ax.get_title()


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda d: d.drop(columns="method"), KeyError, "'method'"),
    (lambda d: d.drop(columns="realized_density"), KeyError, "'realized_density'"),
    (lambda d: d.iloc[:0], ValueError, "empty"),
    (lambda d: d.assign(value=np.nan), ValueError, "NaN"),
    (lambda d: d[d.metric != "synthetic/auc30"], ValueError, "available"),
])
def test_tradeoff_curve_rejects_bad_frames(mutate, exc, match) -> None:
    with pytest.raises(exc, match=match):
        plots.tradeoff_curve(mutate(_tidy()), "synthetic/auc30")
    with pytest.raises(ValueError, match="unknown error bar"):
        plots.tradeoff_curve(_tidy(), "synthetic/auc30", err="ci")


def test_lambda_grid_heatmap_and_lines() -> None:
    rows = [{"metric": "co3d/auc30", "value": lam + kr + 0.01 * s, "score.lam": lam, "keep_ratio": kr}
            for lam in (0.0, 0.5, 1.0) for kr in (0.2, 0.4) for s in range(3)]
    df = pd.DataFrame(rows)
    fig = plots.lambda_grid(df, "co3d/auc30")
    ax = fig.axes[0]
    assert len(fig.axes) == 2 and ax.images[0].colorbar is not None
    expected = np.array([[lam + kr + 0.01 for kr in (0.2, 0.4)] for lam in (0.0, 0.5, 1.0)])
    np.testing.assert_allclose(ax.images[0].get_array(), expected)
    assert _tick_texts(ax, "y") == ["0", "0.5", "1"] and "λ" in ax.get_ylabel()
    lines = plots.lambda_grid(df, "co3d/auc30", kind="lines").axes[0]
    assert [t.get_text() for t in lines.get_legend().get_texts()] == ["λ = 0", "λ = 0.5", "λ = 1"]
    with pytest.raises(KeyError, match="score.lam"):
        plots.lambda_grid(df.drop(columns="score.lam"), "co3d/auc30")
    with pytest.raises(ValueError, match="unknown kind"):
        plots.lambda_grid(df, "co3d/auc30", kind="surface")


def test_pareto_front_highlights_the_front() -> None:
    trials = pd.DataFrame({"number": range(5), "values_0": [0.2, 0.5, 0.5, 0.9, 0.3],
                           "values_1": [0.4, 0.7, 0.6, 0.8, 0.3]})
    fig = plots.pareto_front(trials, ("values_0", "values_1"), ("minimize", "maximize"),
                             labels=("realised density", "auc30"), annotate="number")
    ax = fig.axes[0]
    front = [l for l in ax.get_lines() if l.get_label() == "Pareto-optimal"][0]
    np.testing.assert_allclose(front.get_xdata(), [0.2, 0.5, 0.9])
    np.testing.assert_allclose(front.get_ydata(), [0.4, 0.7, 0.8])
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "3"]
    assert "lower is better" in ax.get_xlabel() and "higher is better" in ax.get_ylabel()
    assert "3 of 5" in ax.get_title()
    arr_fig = plots.pareto_front(torch.tensor([[1.0, 1.0], [2.0, 0.5]]), ("a", "b"), ("max", "max"))
    assert isinstance(arr_fig, Figure)
    with pytest.raises(KeyError, match="values_2"):
        plots.pareto_front(trials, ("values_0", "values_2"), ("min", "max"))


def test_latency_bars_panels_per_timing() -> None:
    fig = plots.latency_bars(_tidy())
    assert len(fig.axes) == 2
    e2e, attn = fig.axes
    assert "perf/latency_ms" in e2e.get_title() and "global_attn" in attn.get_title()
    assert _tick_texts(e2e, "x") == ["dense", "0.5", "0.25"]
    assert e2e.get_ylabel() == "time (ms)" and e2e.get_legend() is not None
    # global attention = 15·density + scene index; mean over scenes 0..2 is 15·(keep_ratio + 0.01) + 1
    bars = sorted((round(p.get_x() + p.get_width() / 2), round(p.get_height(), 9)) for p in attn.patches)
    expected = [(0, 16.0)] + [(1, round(15 * 0.51 + 1, 9))] * 2 + [(2, round(15 * 0.26 + 1, 9))] * 2
    assert bars == expected
    with pytest.raises(ValueError, match="perf/gpu_ms"):
        plots.latency_bars(_tidy(), metrics={"perf/gpu_ms": "gpu"})


def test_save_figure_writes_png_at_dpi(tmp_path) -> None:
    pil = pytest.importorskip("PIL.Image")
    fig = plots.head_heatmap(np.eye(3), title="t", cbar_label="c")
    path = plots.save_figure(fig, tmp_path / "sub" / "heat", dpi=100)
    assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pil.open(path) as img:
        width, _ = img.size
    assert 0.6 * fig.get_figwidth() * 100 < width < 1.2 * fig.get_figwidth() * 100  # tight bbox trims a little
    with pytest.raises(TypeError, match="Figure"):
        plots.save_figure("not a figure", tmp_path / "x.png")


def test_metric_labels_carry_units() -> None:
    assert plots.metric_label("co3d/auc30").endswith("(fraction, ↑)")
    assert "mm" in plots.metric_label("dtu/chamfer")
    assert plots.metric_label("custom/thing") == "custom/thing"
    assert plots.head_label(19, 5) == "GA19-H5"
