"""ablations/bench_attention.py: the budgets it compares and the table it writes (a one-round smoke run)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from hess.runtime import load_object

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "ablations" / "bench_attention.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def bench(name: str):
    return load_object(f"{BENCH}:{name}")


def test_heterogeneous_budgets_keep_the_uniform_total():
    uniform, hetero = bench("uniform_budgets"), bench("heterogeneous_budgets")
    c = hetero(0.5, 255)  # 16 heads: 127 · linspace(0.25, 1.75) → 31.75 … 222.25, total 16 · 127
    assert uniform(0.5, 255).tolist() == [127] * 16
    assert int(c.sum()) == 16 * 127 and int(c[0]) == 32 and int(c[-1]) == 222
    assert torch.all(c[1:] >= c[:-1])
    c = hetero(0.9, 10)  # 9 · 1.75 > 10: the heaviest heads clamp at n_k, the total is kept
    assert int(c.sum()) == 16 * 9 and int(c.max()) == 10 and int(c.min()) >= 1


def test_quick_run_writes_the_paired_table(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    bench("main")(["--quick", "--backends", "gather", "--threads", "1", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [(r["kept"], r["budgets"]) for r in rows] == [
        ("0.5", "uniform"), ("0.5", "heterogeneous"), ("0.1", "uniform"), ("0.1", "heterogeneous")]
    for r in rows:
        assert float(r["ratio"]) == pytest.approx(float(r["speedup"]) / float(r["ideal"]), abs=2e-3)
        assert float(r["ideal"]) == pytest.approx(1 / float(r["density"]), rel=1e-3)
        assert float(r["time_s"]) > 0 and 0 < float(r["select_share"])
        assert float(r["vs_uniform"]) == 1.0 if r["budgets"] == "uniform" else float(r["vs_uniform"]) > 0
    assert 0.45 < float(rows[0]["density"]) < 0.55  # c = 16 of n_k = 32 blocks, the last one partial
    assert "| het / uniform |" in capsys.readouterr().out
