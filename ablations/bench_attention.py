"""Speed of head-wise block-sparse attention against dense SDPA (issue 3's benchmark).

What: for each shape (N ∈ {4096, 8192, 16384} with P = 1024, and the VGGT-1B global-attention shapes
16 heads × 64 dim × 1041 tokens/frame at 8 and 16 frames; B = 1, 5 special tokens per frame), kept
fraction f ∈ {1.0, 0.5, 0.25, 0.1} of key blocks, uniform budgets ``c = max(1, floor(f·n_k))`` and
heterogeneous budgets with the same total, it times dense SDPA, the block selection alone and every
available backend (``gather``, ``flex``; on CUDA also ``xformers``).  Timing rounds are interleaved
(dense, then per budget kind the selection and the backends, back to back) and the speed-up is the
median over rounds of the per-round ratio dense / backend, so a machine whose speed drifts (shared
cores) stays comparable; heterogeneous budgets are compared with uniform ones the same way
(``het / uniform``: median of the per-round time ratio).

How to run::

    python ablations/bench_attention.py                      # full table, CPU, 2 threads, ~18 min
    python ablations/bench_attention.py --quick              # smoke run: one small shape, 1 round
    python ablations/bench_attention.py --backends gather --shapes n8192 vggt-8f --rounds 5

Table (stdout, markdown) and CSV (``--out``): time, speed-up over dense SDPA, the ideal speed-up
1/realised density, their ratio, heterogeneous / uniform time, and the share of the op's time spent on
block selection.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hess import head_sparse_attention
from hess.attention import select_blocks  # not a top-level export (yet): the selection is timed alone

SHAPES = {  # name: (frames S, tokens per frame P)
    "n4096": (4, 1024),
    "n8192": (8, 1024),
    "n16384": (16, 1024),
    "vggt-8f": (8, 1041),
    "vggt-16f": (16, 1041),
}
NUM_SPECIAL, HEADS, HEAD_DIM = 5, 16, 64
FRACTIONS = (1.0, 0.5, 0.25, 0.1)


def uniform_budgets(fraction: float, n_k: int) -> torch.Tensor:
    return torch.full((HEADS,), max(1, int(fraction * n_k)), dtype=torch.long)


def heterogeneous_budgets(fraction: float, n_k: int) -> torch.Tensor:
    """Budgets ∝ linspace(0.25, 1.75) across heads, clamped to [1, n_k], with the uniform total."""
    total = int(uniform_budgets(fraction, n_k).sum())
    c = (torch.linspace(0.25, 1.75, HEADS) * total / HEADS).round().long().clamp(1, n_k)
    order = list(range(HEADS - 1, -1, -1))  # fix the total from the heaviest heads down
    while int(c.sum()) != total:
        step = 1 if int(c.sum()) < total else -1
        for h in order:
            if int(c.sum()) != total and 1 <= int(c[h]) + step <= n_k:
                c[h] += step
    return c


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def available_backends(device: str) -> list[str]:
    return ["gather", "flex", "xformers"] if device == "cuda" else ["gather", "flex"]


def bench_shape(name: str, backends: list[str], fractions, rounds: int, device: str, log) -> list[dict]:
    """All (fraction, budget kind, backend) rows of one shape.

    Per fraction, every round times dense SDPA, then for each budget kind the selection and every
    backend, back to back: uniform and heterogeneous budgets are paired round by round, and
    ``vs_uniform`` is the median of the per-round ratio heterogeneous / uniform time.
    """
    S, P = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, S * P, HEAD_DIM, generator=g).to(device) for _ in range(3))
    n_k = -(-S * (P - NUM_SPECIAL) // 64)
    dense = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    dense()
    rows = []
    for fraction in fractions:
        kinds = {"uniform": uniform_budgets(fraction, n_k)}
        if fraction < 1.0:
            kinds["heterogeneous"] = heterogeneous_budgets(fraction, n_k)
        ops, warm, sels = {}, {}, {}  # ops[kind]: "select" (the selection alone) and each available backend
        for kind, budgets in kinds.items():
            kw = dict(tokens_per_frame=P, num_special=NUM_SPECIAL, blocks_per_head=budgets.to(device))
            ops[kind] = {"select": lambda kw=kw: select_blocks(q, k, **kw)}  # noqa: E731
            _, sels[kind] = head_sparse_attention(q, k, v, backend="gather", return_selection=True, **kw)
            for backend in backends:
                op = lambda b=backend, kw=kw: head_sparse_attention(q, k, v, backend=b, **kw)  # noqa: E731
                try:
                    warm[kind, backend] = timed(op)  # flex: compilation happens here
                    ops[kind][backend] = op
                except Exception as err:  # noqa: BLE001  (an unavailable backend is reported, not fatal)
                    log(f"  {name} {kind} {backend}: unavailable ({type(err).__name__}: {str(err)[:100]})")
        dense_t: list[float] = []
        times = {kind: {op_name: [] for op_name in named} for kind, named in ops.items()}
        for _ in range(rounds):
            dense_t.append(timed(dense))
            for kind, named in ops.items():
                for op_name, op in named.items():
                    times[kind][op_name].append(timed(op))
        for kind, backend in warm:
            t = times[kind][backend]
            speedup = statistics.median(d / x for d, x in zip(dense_t, t))
            t_med, ideal = statistics.median(t), 1.0 / sels[kind].density_overall
            uni = times["uniform"].get(backend)
            rows.append(dict(
                shape=name, N=S * P, S=S, P=P, kept=fraction, budgets=kind, backend=backend,
                c_mean=float(kinds[kind].float().mean()), n_k=n_k, density=round(sels[kind].density_overall, 4),
                time_s=round(t_med, 4), dense_s=round(statistics.median(dense_t), 4),
                speedup=round(speedup, 3), ideal=round(ideal, 3), ratio=round(speedup / ideal, 3),
                vs_uniform=round(statistics.median(x / u for x, u in zip(t, uni)), 3) if uni else float("nan"),
                select_share=round(statistics.median(times[kind]["select"]) / t_med, 3),
                warmup_s=round(warm[kind, backend], 2),
            ))
            r = rows[-1]
            log(f"  {name} f={fraction} {kind:13s} {backend:8s} {r['time_s']:.3f}s dense {r['dense_s']:.3f}s "
                f"x{r['speedup']:.2f} / ideal x{r['ideal']:.2f} = {r['ratio']:.2f}  vs uniform {r['vs_uniform']:.2f}  "
                f"select {r['select_share']:.1%}")
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| shape | N | kept | budgets | backend | density | time (s) | dense (s) | speed-up | ideal | "
            "ratio | het / uniform | select share |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        vs_uniform = "" if r["budgets"] == "uniform" else f"{r['vs_uniform']:.2f}"
        lines.append(f"| {r['shape']} | {r['N']} | {r['kept']} | {r['budgets']} | {r['backend']} | {r['density']:.3f} | "
                     f"{r['time_s']:.3f} | {r['dense_s']:.3f} | {r['speedup']:.2f}× | {r['ideal']:.2f}× | "
                     f"{r['ratio']:.2f} | {vs_uniform} | "
                     f"{r['select_share']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small shape (N=2048), fractions 0.5/0.1, 1 round")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    ap.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    ap.add_argument("--backends", nargs="+", default=None, help="default: all available on the device")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path("ablations/outputs/bench_attention.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        SHAPES["n2048"] = (2, 1024)
        args.shapes, args.fractions, args.rounds = ["n2048"], [0.5, 0.1], 1
    backends = args.backends or available_backends(args.device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    log(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"load average {load_before[0]:.2f}")
    rows = []
    for name in args.shapes:
        log(f"[{len(rows)} rows] shape {name}")
        rows += bench_shape(name, backends, args.fractions, args.rounds, args.device, log)
    load_after = os.getloadavg()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    for r in rows:
        r.update(threads=args.threads, device=args.device, torch=torch.__version__, date=stamp,
                 load_before=round(load_before[0], 2), load_after=round(load_after[0], 2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows))
    print(f"\n{stamp}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; CSV: {args.out}")


if __name__ == "__main__":
    main()
